"""ZeRO-1 (`parallel.zero 1`): sharded AdamW equals the replicated one, resumes across layouts.

In-process tests (tests/mpi_batch.py) train the same tiny GPT under zero 0 and zero 1 side by
side on the same ranks and compare every step; end-to-end tests run `python -m hpcllm.train`
in several layouts against one rank and resume a ZeRO-1 checkpoint under other layouts.
"""

import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from helpers import (
    assert_close_dicts,
    assert_reordered_close,
    losses,
    read_metrics,
    resume_elsewhere,
)

STEPS = 10


def build(comm, *, zero: int, bucket_mb: float, init_seed: int = 3, optim: str = "adamw"):
    """(model, DataParallel, optimizer, schedule, pp communicator) of the tiny GPT on dp =
    comm's ranks, trained by AdamW or by Muon (`optim`), built by hpcllm.train's own
    `build_rank` (overlapped reduction)."""
    from hpcllm.config import Config, OptimConfig, ParallelConfig, TrainConfig
    from hpcllm.distributed.build import build_rank
    from hpcllm.distributed.comm import TensorComm
    from hpcllm.distributed.topology import AXES, Grid
    from hpcllm.models.gpt import ModelConfig

    cfg = Config(
        model=ModelConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, d_model=32),
        train=TrainConfig(seq_len=16, micro_batch_size=2, seed=init_seed),
        parallel=ParallelConfig(bucket_mb=bucket_mb, zero=zero, overlap="on"),
        optim=OptimConfig(name=optim, lr=3e-3, muon_lr=0.02, weight_decay=0.1),
    )
    grid = Grid.build(comm)
    comms = {a: TensorComm(grid.comm(a), name=a) for a in AXES}
    rank = build_rank(cfg, grid, torch.device("cpu"), comms)
    return rank.model, rank.ddp, rank.optimizer, rank.schedule, rank.comms["pp"]


def micro_batches(step: int, rank: int, accum: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, 61, (accum, 2, 17), generator=g)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


@pytest.mark.numerics
@pytest.mark.mpi(ranks=2, timeout=180)
def test_zero1_equals_zero0_every_step_every_parameter(comm):
    """10 steps with clipping, changing lr and grad accumulation 1 and 2; buckets small enough
    that parameters straddle the shard boundary and decay/no-decay meet inside a shard."""
    from hpcllm.distributed.steps import clip_grad_norm, mean_over_grid, train_step

    bucket_mb = 0.01
    runs = [build(comm, zero=z, bucket_mb=bucket_mb) for z in (0, 1)]
    _, ddp1, opt1, _, _ = runs[1]
    size = comm.size
    straddles = [
        p.numel()
        for b in ddp1.buckets
        for p, off in zip(b.params, b.offsets, strict=True)
        if off < b.shard_range(0, size)[1] < off + p.numel()
    ]
    assert straddles, "no parameter is cut by the shard boundary: shrink bucket_mb"
    assert len(ddp1.buckets) > 2
    assert all(b.buffer.numel() % size == 0 for b in ddp1.buckets)
    # Owned segments of both weight-decay classes: the per-range decay split is exercised.
    assert all(g["params"] for g in opt1.param_groups)

    for step in range(STEPS):
        accum = 1 + step % 2
        batches = micro_batches(step, comm.rank, accum)
        results = []
        for model, ddp, optimizer, schedule, pp_comm in runs:
            for group in optimizer.param_groups:
                group["lr"] = 3e-3 * (step + 1) / STEPS
            loss_sum = train_step(schedule, ddp, batches, nullcontext())
            norm = clip_grad_norm(model, 0.5, [pp_comm], ddp=ddp)
            optimizer.step()
            loss = mean_over_grid(loss_sum, accum, [ddp.comm])
            results.append((loss, norm))
        (loss0, norm0), (loss1, norm1) = results
        assert loss1 == pytest.approx(loss0, rel=1e-7, abs=1e-7), step
        assert norm1 == pytest.approx(norm0, rel=1e-7), step
        assert norm0 > 0.5 or step > 0, "clipping never engaged: lower max_norm"
        for (name, p0), p1 in zip(
            runs[0][0].named_parameters(), runs[1][0].parameters(), strict=True
        ):
            # Reduce-scatter + all-gather sum in another order than the all-reduce.
            assert_reordered_close(p1, p0, steps=step + 1, msg=f"step {step}: {name}")


@pytest.mark.mpi(ranks=[2, 3], timeout=240)
def test_muon_zero1_equals_zero0_and_each_momentum_lives_on_its_owner(comm):
    """Muon under ZeRO-1: every hidden matrix is cut between the dp ranks' shards (buckets of
    one matrix each), gathered at its owner, orthogonalised there and its update sent back;
    10 steps with clipping, a changing lr and accumulation equal Muon at zero 0, and the
    optimizer state is no longer replicated: each momentum on one rank, AdamW's in shards."""
    from hpcllm.distributed.steps import clip_grad_norm, mean_over_grid, train_step
    from hpcllm.optim.zero import ShardedMuon, optimizer_state_bytes

    runs = [build(comm, zero=z, bucket_mb=0.01, optim="muon") for z in (0, 1)]
    opt1 = runs[1][2]
    assert isinstance(opt1, ShardedMuon)
    matrices = [p for g in opt1.param_groups if g["muon"] for p in g["params"]]
    spans = [opt1._spans[id(p)] for p in matrices]
    assert sum(1 for s in spans if sum(b > a for a, b in s) == comm.size) >= 4  # cut everywhere
    for step in range(STEPS):
        accum = 1 + step % 2
        batches = micro_batches(step, comm.rank, accum)
        results = []
        for model, ddp, optimizer, schedule, pp_comm in runs:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * (step + 1) / STEPS
            loss_sum = train_step(schedule, ddp, batches, nullcontext())
            norm = clip_grad_norm(model, 0.5, [pp_comm], ddp=ddp)
            optimizer.step()
            results.append((mean_over_grid(loss_sum, accum, [ddp.comm]), norm))
        (loss0, norm0), (loss1, norm1) = results
        # The dp sums (all-reduce vs reduce-scatter) and the fp64 norms of other cuts may
        # differ in the last bit; 10 steps keep that within a few fp32 ulps of O(1) values.
        assert loss1 == pytest.approx(loss0, rel=1e-6), step
        assert norm1 == pytest.approx(norm0, rel=1e-6), step
        for (name, p0), p1 in zip(
            runs[0][0].named_parameters(), runs[1][0].parameters(), strict=True
        ):
            assert_reordered_close(p1, p0, steps=step + 1, msg=f"step {step}: {name}")

    # Each matrix's momentum on exactly one rank (its owner), equal to zero 0's.
    opt0 = runs[0][2]
    held = [id(p) for p in matrices if "momentum_buffer" in opt1.state.get(p, {})]
    assert sum(comm.allgather(len(held))) == len(matrices)
    for p0, p1 in zip(
        [p for g in opt0.param_groups if g["muon"] for p in g["params"]], matrices, strict=True
    ):
        if id(p1) in held:
            assert_reordered_close(
                opt1.state[p1]["momentum_buffer"], opt0.state[p0]["momentum_buffer"], steps=STEPS
            )
    # Together the ranks hold zero 0's state once (plus padding and step counters).
    replicated, mine = optimizer_state_bytes(opt0), optimizer_state_bytes(opt1)
    assert sum(comm.allgather(mine)) == pytest.approx(replicated, rel=0.02)
    assert max(comm.allgather(mine)) < 0.7 * replicated


@pytest.mark.mpi(ranks=2, timeout=120)
def test_zero1_optimizer_state_is_half_per_rank_on_dp2(comm):
    from hpcllm.distributed.steps import clip_grad_norm, train_step
    from hpcllm.optim.zero import optimizer_state_bytes

    measured = {}
    for zero in (0, 1):
        model, ddp, optimizer, schedule, pp_comm = build(comm, zero=zero, bucket_mb=0.01)
        train_step(schedule, ddp, micro_batches(0, comm.rank, 1), nullcontext())
        clip_grad_norm(model, 1.0, [pp_comm], ddp=ddp)
        optimizer.step()
        measured[zero] = optimizer_state_bytes(optimizer)
        total = sum(p.numel() for p in model.parameters())
    assert measured[0] >= 2 * 4 * total  # two fp32 moments of every parameter
    # Half of the moments, plus padding of under dp elements per bucket and a few step counters.
    assert measured[1] == pytest.approx(measured[0] / comm.size, rel=0.02)
    assert measured[1] < 0.55 * measured[0]


@pytest.mark.mpi(ranks=2, timeout=120)
def test_reduce_scatter_is_launched_from_the_hooks_while_backward_runs(comm):
    from hpcllm.distributed.comm import TensorComm

    _, ddp, _, schedule, _ = build(comm, zero=1, bucket_mb=0.01)
    pending_at_launch = []
    launch = TensorComm.ireduce_scatter

    def recording(self, tensor, out=None, op=None):
        # How many gradients of the whole model were still to come when a bucket was launched.
        pending_at_launch.append(sum(b.pending for b in ddp.buckets))
        return launch(self, tensor, out) if op is None else launch(self, tensor, out, op)

    ddp.comm.ireduce_scatter = recording.__get__(ddp.comm)  # type: ignore[method-assign]  # a spy
    ddp.zero_grad()
    schedule.run(micro_batches(0, comm.rank, 1), nullcontext(), lambda i: None)
    # Every bucket was reduce-scattered from the hooks, the first ones long before the last
    # gradients existed: the exchange overlaps backward, and finish() launches nothing more.
    assert len(pending_at_launch) == len(ddp.buckets)
    assert pending_at_launch[0] > 0 and pending_at_launch == sorted(pending_at_launch, reverse=True)
    ddp.finish()
    assert len(pending_at_launch) == len(ddp.buckets)


@pytest.mark.mpi(ranks=2, timeout=120)
def test_each_rank_writes_and_reads_only_its_own_ranges(comm, tmp_path, monkeypatch):
    from test_checkpoint import run_extra

    from hpcllm import checkpoint
    from hpcllm.checkpoint import index as ix
    from hpcllm.config import Config
    from hpcllm.distributed.steps import clip_grad_norm, train_step
    from hpcllm.distributed.topology import Grid
    from hpcllm.training.state import stateful_parts

    root = Path(comm.bcast(str(tmp_path) if comm.rank == 0 else None))
    grid = Grid.build(comm, dp=2)
    trained = {}
    for zero in (0, 1):
        model, ddp, optimizer, schedule, pp_comm = build(comm, zero=zero, bucket_mb=0.01)
        for step in range(2):
            train_step(schedule, ddp, micro_batches(step, comm.rank, 1), nullcontext())
            clip_grad_norm(model, 1.0, [pp_comm], ddp=ddp)
            optimizer.step()
        trained[zero] = (model, ddp, optimizer, schedule, pp_comm)
    model, _, optimizer, _, _ = trained[1]
    cfg = Config()
    folder = checkpoint.save(
        str(root),
        2,
        grid=grid,
        parts=stateful_parts(grid, model, optimizer),
        extra=run_extra(cfg, 2),
    )
    # Both dp ranks wrote (their own ranges); nobody wrote a whole replica.
    assert sorted(p.name for p in folder.glob("*-pp*")) == [
        f"{kind}-pp0-dp{d}-tp0.safetensors" for kind in ("model", "optim") for d in (0, 1)
    ]

    reads: list[tuple[str, ix.Region]] = []
    read = checkpoint.TensorFiles.read

    def spy(self, name, entry, region=None):
        reads.append((name, region))
        return read(self, name, entry, region)

    monkeypatch.setattr(checkpoint.TensorFiles, "read", spy)
    resumed = []
    for zero in (1, 0):
        # Fresh weights (another seed) and no optimizer state: everything comes from the file.
        run = build(comm, zero=zero, bucket_mb=0.01, init_seed=9)
        fresh, _, fresh_opt, _, _ = run
        reads.clear()
        found = checkpoint.load_newest(
            str(root), grid=grid, parts=stateful_parts(grid, fresh, fresh_opt)
        )
        assert found is not None and found[0] == folder
        moments = [(n, r) for n, r in reads if n.endswith("/exp_avg")]
        assert moments
        if zero == 1:
            # Only this rank's ranges: about half the moments' elements, each a range it owns.
            owned = {p.name: (p.start, p.stop) for p in fresh_opt.parts}
            assert {n.split("/")[1] for n, _ in moments} == set(owned)
            for n, r in moments:
                assert isinstance(r, ix.Flat) and (r.start, r.stop) == owned[n.split("/")[1]]
            total = sum(p.numel() for p in fresh.parameters())
            assert sum(r.stop - r.start for _, r in moments) < 0.55 * total
        resumed.append(run)
    # Resumed under zero 1 and under zero 0, the next step equals the uninterrupted zero 0
    # run's: weights and moments were both restored (a fresh Adam state would step differently).
    for model, ddp, optimizer, schedule, pp_comm in [*resumed, trained[0]]:
        train_step(schedule, ddp, micro_batches(2, comm.rank, 1), nullcontext())
        clip_grad_norm(model, 1.0, [pp_comm], ddp=ddp)
        optimizer.step()
    reference = dict(trained[0][0].named_parameters())
    for zero, (model, *_) in zip((1, 0), resumed, strict=True):
        for name, p in model.named_parameters():
            assert_reordered_close(p, reference[name], steps=3, msg=(zero, name))
    grid.free()


def test_parallel_zero_is_range_checked():
    from hpcllm.config import ConfigError, parse_args

    for optim in ("adamw", "muon"):
        cfg = parse_args(["--parallel.zero", "1", "--optim.name", optim])[0]
        assert (cfg.parallel.zero, cfg.optim.name) == (1, optim)
    with pytest.raises(
        ConfigError, match=r"parallel.zero = 2 is out of range: it must be in \[0, 1\]"
    ):
        parse_args(["--parallel.zero", "2"])


# ----------------------------------------------------------------- end to end


def job(shards, **more) -> dict:
    """A 2-step-accumulation global batch of 8 sequences whatever the layout (dp x accum = 4),
    checkpointing at step 5: the settings of the runs below (conftest's reference_run trains
    each once, shared between the tests)."""
    return {
        "data.path": shards,
        "train.max_steps": STEPS,
        "train.grad_accum_steps": 4,
        "parallel.bucket_mb": 0.01,
        "optim.grad_clip": 0.5,
        "checkpoint.every": 5,
        **more,
    }


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    from hpcllm.checkpoint import find_latest, read_meta, read_model

    folder, _ = find_latest(str(run_dir))
    assert folder is not None
    return read_model(folder, read_meta(folder))


DP2_ZERO1 = {"parallel.dp": 2, "parallel.zero": 1, "train.grad_accum_steps": 2}
# Another order of the same sums (dp, tp, micro-batches): fp32 rounding over at most 10 steps.
LOSS_TOL = {"rtol": 1e-5, "atol": 0.0}


def test_layouts_with_zero_0_and_1_equal_one_rank(reference_run, shards):
    ref_dir, _ = reference_run(None, job(shards))
    ref_records = read_metrics(ref_dir)[0]
    ref_params = final_params(ref_dir)
    layouts = [
        (2, {"parallel.dp": 2, "parallel.zero": 0, "train.grad_accum_steps": 2}),
        (2, DP2_ZERO1),
        (4, {"parallel.dp": 2, "parallel.pp": 2, "parallel.zero": 1, "train.grad_accum_steps": 2}),
    ]
    for np_, layout in layouts:
        run_dir, _ = reference_run(np_, job(shards, **layout))
        records = read_metrics(run_dir)[0]
        assert len(records) == STEPS
        for got, ref in zip(records, ref_records, strict=True):
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), (layout, got, ref)
            assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), (layout, got)
        params = final_params(run_dir)
        assert params.keys() == ref_params.keys()
        for name, p in params.items():
            assert_reordered_close(p, ref_params[name], steps=STEPS, msg=(layout, name))


def test_zero1_checkpoint_is_sharded_and_resumes_under_other_layouts(
    reference_run, shards, tmp_path
):
    ref_dir, _ = reference_run(2, job(shards, **DP2_ZERO1))

    # Each dp rank wrote its own flat ranges: two writers per sharded tensor, no overlap.
    half = ref_dir / "checkpoints" / "step_000005"
    meta = json.loads((half / "meta.json").read_text())
    for name in ("model/blocks.0.mlp.fc.weight", "optim/blocks.0.mlp.fc.weight/exp_avg"):
        pieces = meta["tensors"][name]["pieces"]
        assert sorted(p["file"].split("-")[2] for p in pieces) == ["dp0", "dp1"], name
        (a0, b0), (a1, b1) = sorted(p["flat"] for p in pieces)
        assert a0 == 0 and b0 == a1 and b1 == 32 * 128, name
    assert len(meta["tensors"]["optim/blocks.0.mlp.fc.weight/step"]["pieces"]) == 1

    for np_, other in [
        (4, {"parallel.dp": 4, "parallel.zero": 1, "train.grad_accum_steps": 1}),
        (2, {"parallel.dp": 2, "parallel.zero": 0, "train.grad_accum_steps": 2}),
        (None, {"parallel.dp": 1, "parallel.zero": 0, "train.grad_accum_steps": 4}),
    ]:
        target = tmp_path / f"resume-dp{other['parallel.dp']}-zero{other['parallel.zero']}"
        resume_elsewhere(ref_dir, 5, target, np_, job(shards, **other), loss_tol=LOSS_TOL)


def test_zero1_under_tp_checkpoint_tiles_and_resumes_under_another_layout(
    reference_run, shards, tmp_path
):
    """Written by (dp 2, tp 2, zero 1): every rank writes the boxes of its flat ranges of the
    tp-sliced tensors, tp rank 0 alone those of the replicated ones; resumed under (dp 2,
    tp 1, zero 1), whose ranges cut the tensors elsewhere, steps 6-10 repeat the
    uninterrupted run's losses."""
    ref_dir, _ = reference_run(4, job(shards, **DP2_ZERO1, **{"parallel.tp": 2}))

    half = ref_dir / "checkpoints" / "step_000005"
    tensors = json.loads((half / "meta.json").read_text())["tensors"]

    def writers(name: str) -> list[str]:
        return sorted({p["file"].split("-", 2)[2][:7] for p in tensors[name]["pieces"]})

    fc = tensors["optim/blocks.0.mlp.fc.weight/exp_avg"]
    assert writers("optim/blocks.0.mlp.fc.weight/exp_avg") == [
        "dp0-tp0",
        "dp0-tp1",
        "dp1-tp0",
        "dp1-tp1",
    ]
    for name in ("optim/blocks.0.ln_1.weight/exp_avg", "optim/blocks.0.mlp.fc.weight/step"):
        assert all(w.endswith("tp0") for w in writers(name)), (name, writers(name))
    assert all("length" in p for p in fc["pieces"])
    assert sum(p["length"][0] * p["length"][1] for p in fc["pieces"]) == 128 * 32

    target = tmp_path / "resume-dp2-tp1-zero1"
    resume_elsewhere(ref_dir, 5, target, 2, job(shards, **DP2_ZERO1), loss_tol=LOSS_TOL)


MUON = {"optim.name": "muon", "optim.muon_lr": 0.02}


def test_muon_zero1_checkpoint_resumes_exactly_and_under_zero0(reference_run, shards, tmp_path):
    """Muon under ZeRO-1 (dp 2): each hidden matrix's momentum is written whole by its owner,
    AdamW's moments as each rank's flat ranges. Resumed in the same layout, steps 6-10 repeat
    the uninterrupted run bit for bit; under (dp 1, zero 0), to fp32 rounding."""
    layout = {**DP2_ZERO1, **MUON}
    ref_dir, _ = reference_run(2, job(shards, **layout))

    half = ref_dir / "checkpoints" / "step_000005"
    tensors = json.loads((half / "meta.json").read_text())["tensors"]
    (momentum,) = tensors["optim/blocks.0.mlp.fc.weight/momentum_buffer"]["pieces"]
    assert momentum["flat"] == [0, 32 * 128]  # whole, from one rank
    writers = [p["file"].split("-")[2] for p in tensors["optim/wte.weight/exp_avg"]["pieces"]]
    assert sorted(writers) == ["dp0", "dp1"]
    assert "optim/blocks.0.mlp.fc.weight/exp_avg" not in tensors

    exact = {"rtol": 0.0, "atol": 0.0}  # the same layout: the same operations
    resume_elsewhere(ref_dir, 5, tmp_path / "same", 2, job(shards, **layout), loss_tol=exact)
    dp1 = {"parallel.dp": 1, "parallel.zero": 0, "train.grad_accum_steps": 4, **MUON}
    resume_elsewhere(ref_dir, 5, tmp_path / "dp1", None, job(shards, **dp1), loss_tol=LOSS_TOL)


def test_muon_zero1_under_tp_equals_one_rank(reference_run, shards):
    """dp 2 x tp 2 x zero 1 with Muon: each matrix's owners (one per tp rank, the same dp
    rank) gather their ranges' gradients, assemble the whole matrix over tp, orthogonalise it
    and return each range's slice of the update: one rank's Muon, to fp32 rounding."""
    one, _ = reference_run(None, job(shards, **MUON))
    layout = {**DP2_ZERO1, "parallel.tp": 2}
    dp2_tp2, _ = reference_run(4, job(shards, **layout, **MUON))
    ref, got = losses(one), losses(dp2_tp2)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    assert_close_dicts(got, ref, **LOSS_TOL)
