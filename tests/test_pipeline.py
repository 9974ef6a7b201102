"""Tests of pipeline parallelism: every layout and schedule against the single-rank result.

In-process tests build the grid, stages, schedules and data parallelism directly on the
test's communicator with a tiny GPT and random tokens drawn identically on every rank;
one 4-rank test runs many layouts so that mpirun starts once. End-to-end tests run
`mpirun -np N python -m hpcllm.train` on a few kilobytes of byte-tokenized text:
checkpoints moving between pipeline layouts, validation, sampling, a rank dying
mid-schedule, and layouts refused before training.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn
from mpi4py import MPI

from hpcllm.config import Config, OptimConfig, ParallelConfig, TrainConfig
from hpcllm.data.loader import step_positions
from hpcllm.distributed.build import build_rank
from hpcllm.distributed.comm import TensorComm
from hpcllm.distributed.pipeline import (
    ActivationMeter,
    PipelineStage,
    Schedule,
    rank_chunks,
    split_layers,
)
from hpcllm.distributed.steps import (
    clip_grad_norm,
    evaluate,
    mean_over_grid,
    stage_inputs,
    train_step,
)
from hpcllm.distributed.topology import AXES, Grid
from hpcllm.models.gpt import GPT, ModelConfig, cross_entropy, param_groups

from helpers import (
    TINY,
    assert_close_dicts,
    assert_reordered_close,
    losses,
    merged_params,
    prepare_data,
    read_metrics,
    refusal,
    resume_elsewhere,
)
from helpers import train as launch_train

VOCAB, SEQ_LEN, D_MODEL, N_LAYER, N_HEAD = 64, 16, 32, 4, 2
GPT_CFG = ModelConfig(
    vocab_size=VOCAB,
    block_size=SEQ_LEN,
    n_layer=N_LAYER,
    n_head=N_HEAD,
    d_model=D_MODEL,
)
INIT_SEED = 7
STEPS, VAL_BATCHES, VAL_SEED = 10, 3, 10_000
LR, GRAD_CLIP = 3e-3, 0.5
CPU = torch.device("cpu")
# fp32 throughout: a correct pipeline changes only the order of a few sums (the gradient
# norm is summed per stage), data parallelism also the sums over samples, so results
# differ from the single rank's by rounding only: parameters within helpers.reordered_tol,
# losses and norms (sums of many terms, each well above 0) within 1e-5 relative (~84 ulps).
TOL = {"atol": 1e-6, "rtol": 1e-5}
# AdamW's default eps (1e-8, as hpcllm.train uses) turns a gradient that is zero in exact
# arithmetic but ~1e-11 of rounding noise in practice (the attention key bias: softmax
# ignores a shift common to all keys) into steps of ~lr/1000 in the noise's direction,
# which another summation order (a norm summed per stage, a batch split over dp) reverses.
# eps 1e-6 keeps such steps below the tolerance and is still far below real gradients (~1e-3).
ADAM_EPS = 1e-6


# ---------------------------------------------------------------- split_layers


def test_split_layers_balanced():
    assert split_layers(4, 1) == [range(0, 4)]
    assert split_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert split_layers(4, 4) == [range(i, i + 1) for i in range(4)]
    # The remainder goes to the earlier stages; every block is on exactly one stage, in order.
    assert [len(r) for r in split_layers(10, 4)] == [3, 3, 2, 2]
    for n_layer, pp in [(7, 3), (12, 5), (5, 5), (1, 1)]:
        ranges = split_layers(n_layer, pp)
        assert len(ranges) == pp and [i for r in ranges for i in r] == list(range(n_layer))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_split_layers_explicit():
    assert split_layers(8, 4, "3,2,2,1") == [range(0, 3), range(3, 5), range(5, 7), range(7, 8)]
    assert split_layers(4, 2, "3,1") == [range(0, 3), range(3, 4)]
    assert split_layers(4, 1, "4") == [range(0, 4)]


def test_split_layers_interleaved():
    """pp x V chunks in pipeline order; pp rank r holds virtual stages r, pp + r, ..."""
    layers = split_layers(8, 2, virtual_stages=2)
    assert layers == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert rank_chunks(layers, 2, 0) == [range(0, 2), range(4, 6)]
    assert rank_chunks(layers, 2, 1) == [range(2, 4), range(6, 8)]
    assert split_layers(5, 2, "1,2,1,1", virtual_stages=2)[1] == range(1, 3)
    with pytest.raises(ValueError, match=r"must give 4 positive block counts \(one per virtual"):
        split_layers(4, 2, "2,2", virtual_stages=2)
    with pytest.raises(ValueError, match=r"6 pipeline chunks .* model.n_layer = 4 blocks"):
        split_layers(4, 2, virtual_stages=3)


@pytest.mark.parametrize(
    "n_layer, pp, explicit, message",
    [
        (2, 4, "", r"parallel.pp = 4 stages but the model has only model.n_layer = 2 blocks"),
        (4, 2, "1,1", r"must give 2 positive block counts .* adding up to model.n_layer = 4"),
        (4, 2, "2,2,0", r"must give 2 positive block counts"),
        (4, 3, "4,0,0", r"must give 3 positive block counts"),
        (4, 2, "5,-1", r"must give 2 positive block counts"),
        (4, 2, "2;2", r"must be comma-separated block counts"),
        (4, 2, "two,two", r"must be comma-separated block counts"),
    ],
)
def test_split_layers_errors(n_layer, pp, explicit, message):
    with pytest.raises(ValueError, match=message):
        split_layers(n_layer, pp, explicit)


def test_unknown_schedule_is_refused():
    stage = PipelineStage(
        nn.Linear(2, 2),
        TensorComm(MPI.COMM_SELF),
        stage=0,
        num_stages=1,
        act_shape=(1, 2),
        device=CPU,
    )
    with pytest.raises(
        ValueError, match=r"parallel.schedule must be one of 1f1b, gpipe, got 'zigzag'"
    ):
        Schedule(stage, "zigzag")


def test_schedule_applies_its_loss_function_to_the_last_stage_output():
    """The model returns logits; the loss is whatever function the schedule is given."""
    model = GPT(GPT_CFG, init_seed=INIT_SEED)
    stage = PipelineStage(
        model,
        TensorComm(MPI.COMM_SELF),
        stage=0,
        num_stages=1,
        act_shape=(2, SEQ_LEN, D_MODEL),
        device=CPU,
    )
    seen = []

    def squared_logits(logits, targets):
        seen.append((logits.shape, targets))
        return logits.float().pow(2).mean()

    schedule = Schedule(stage, "1f1b", loss_fn=squared_logits)
    batches = step_batches(0, num_micro=2, micro_batch=2, dp_rank=0, dp_size=1)
    loss_sum = schedule.run(batches, nullcontext(), lambda i: None)
    assert [shape for shape, _ in seen] == [(2, SEQ_LEN, VOCAB)] * 2
    assert all(t is y for (_, t), (_, y) in zip(seen, batches, strict=True))
    reference = GPT(GPT_CFG, init_seed=INIT_SEED)
    expected = [squared_logits(reference(x), y) for x, y in batches]
    torch.testing.assert_close(loss_sum, sum(e.detach() for e in expected))
    (sum(expected) / 2).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    torch.testing.assert_close(schedule.forward_only(batches, nullcontext()), loss_sum)


# ---------------------------------------------------------------- ActivationMeter


def test_activation_meter_counts_activations_not_parameters():
    meter = ActivationMeter()
    linear = nn.Linear(D_MODEL, 4 * D_MODEL)
    x = torch.randn(2, SEQ_LEN, D_MODEL, requires_grad=True)
    with meter.hooks():
        y = linear(x)  # saves its input and its weight (as the view weight.t())
        z = torch.tanh(y)  # saves its output
    # The input and tanh's output are activations; the weight is not, however it is saved.
    assert meter.current == meter.peak == (x.numel() + z.numel()) * 4
    peak = meter.peak
    z.sum().backward()  # frees what was saved
    assert meter.current == 0 and meter.peak == peak


# ---------------------------------------------------------------- in-process layouts


def layout_config(
    cfg: ModelConfig, parallel: ParallelConfig, *, micro_batch: int, num_micro: int, eps: float
) -> Config:
    """The in-process layouts' config: `cfg`'s model (weights from INIT_SEED) trained by
    AdamW at LR with weight decay 0.1 and AdamW's `eps`, in `parallel`'s layout."""
    train = TrainConfig(
        seq_len=SEQ_LEN, micro_batch_size=micro_batch, grad_accum_steps=num_micro, seed=INIT_SEED
    )
    optim = OptimConfig(name="adamw", lr=LR, weight_decay=0.1, eps=eps)
    return Config(model=cfg, train=train, parallel=parallel, optim=optim)


def step_batches(
    seed: int,
    *,
    num_micro: int,
    micro_batch: int,
    dp_rank: int,
    dp_size: int,
    vocab: int = VOCAB,
) -> list[tuple]:
    """This dp rank's micro-batches (x, y) of one step of random tokens.

    The tokens depend only on the seed and the global batch (num_micro * micro_batch *
    dp_size), and are cut as hpcllm.data.loader cuts them, so every layout with the same
    global batch trains on the same samples in the same micro-steps.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(
        vocab, (num_micro * micro_batch * dp_size, SEQ_LEN + 1), generator=generator
    )
    picks = step_positions(
        0,
        micro_batch_size=micro_batch,
        grad_accum_steps=num_micro,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    return [(tokens[torch.from_numpy(p), :-1], tokens[torch.from_numpy(p), 1:]) for p in picks]


def run_layout(
    comm,
    *,
    pp: int,
    dp: int,
    schedule: str,
    num_micro: int,
    micro_batch: int,
    steps: int = STEPS,
    stage_layers: str = "",
    cfg: ModelConfig = GPT_CFG,
    virtual_stages: int = 1,
) -> dict | None:
    """Train the tiny GPT (or `cfg`'s model) for `steps` steps on `comm` laid out as pp x dp
    (`virtual_stages` chunks per pp rank), built by hpcllm.train's own `build_rank`.

    Returns, on rank 0 of `comm` only, the losses, gradient norms and final validation
    loss, the parameters of every stage under their global names, and the activation
    meter's peak of every rank; None on the other ranks.
    """
    grid = Grid.build(comm, dp=dp, pp=pp)
    parallel = ParallelConfig(
        dp=dp, pp=pp, schedule=schedule, stage_layers=stage_layers, virtual_stages=virtual_stages
    )
    rank = build_rank(
        layout_config(cfg, parallel, micro_batch=micro_batch, num_micro=num_micro, eps=ADAM_EPS),
        grid,
        CPU,
        {a: TensorComm(grid.comm(a), name=a) for a in AXES},
    )
    model, ddp, sched, optimizer = rank.model, rank.ddp, rank.schedule, rank.optimizer
    pp_comm, dp_comm = rank.comms["pp"], rank.comms["dp"]
    reads_data = grid.is_first_stage or grid.is_last_stage

    def inputs(seed: int, count: int) -> list[tuple]:
        # Middle stages get (None, None), as the loader gives them.
        batches = (
            step_batches(
                seed, num_micro=count, micro_batch=micro_batch, dp_rank=grid.rank("dp"), dp_size=dp
            )
            if reads_data
            else [(None, None)] * count
        )
        return stage_inputs(batches, grid, CPU)

    losses, grad_norms = [], []
    for step in range(steps):
        loss_sum = train_step(sched, ddp, inputs(step, num_micro), nullcontext())
        grad_norms.append(clip_grad_norm(model, GRAD_CLIP, [pp_comm]))
        optimizer.step()
        losses.append(
            mean_over_grid(loss_sum, num_micro if grid.is_last_stage else 0, [pp_comm, dp_comm])
        )
    val_loss = evaluate(sched, inputs(VAL_SEED, VAL_BATCHES), [pp_comm, dp_comm], nullcontext())

    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    meter = sched.meter
    pieces = comm.gather(
        (grid.rank("pp"), grid.rank("dp"), state, meter.peak, meter.current, meter), root=0
    )
    grid.free()
    if comm.rank != 0:
        return None
    params, replicas_differ = {}, []
    for _, dp_rank, piece, *_ in pieces:
        for name, tensor in piece.items():
            if name not in params:
                params[name] = tensor
            elif not torch.equal(params[name], tensor):  # dp replicas must stay bitwise identical
                replicas_differ.append(f"{name} (dp rank {dp_rank})")
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "val_loss": val_loss,
        "params": params,
        "replicas_differ": replicas_differ,
        "peaks": {(s, d): peak for s, d, _, peak, *_ in pieces},
        "still_saved": {(s, d): cur for s, d, _, _, cur, _ in pieces},
        "meters": {(s, d): meter for s, d, *_, meter in pieces},
    }


def single_rank_reference(
    num_micro: int,
    micro_batch: int = 2,
    steps: int = STEPS,
    cfg: ModelConfig = GPT_CFG,
    eps: float = ADAM_EPS,
) -> dict:
    """The same training in plain PyTorch: the whole GPT, no MPI and nothing of hpcllm.distributed."""
    model = GPT(cfg, init_seed=INIT_SEED)
    optimizer = torch.optim.AdamW(
        param_groups(model, 0.1), lr=LR, betas=(0.9, 0.95), eps=eps, foreach=False
    )

    def batches(seed: int, count: int) -> list[tuple]:
        return step_batches(
            seed,
            num_micro=count,
            micro_batch=micro_batch,
            dp_rank=0,
            dp_size=1,
            vocab=cfg.vocab_size,
        )

    losses, grad_norms = [], []
    for step in range(steps):
        optimizer.zero_grad()
        total = 0.0
        for x, y in batches(step, num_micro):
            loss = cross_entropy(model(x), y)
            (loss / num_micro).backward()  # the step's gradient is the mean over micro-batches
            total += loss.item()
        grad_norms.append(nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP).item())
        optimizer.step()
        losses.append(total / num_micro)
    model.eval()
    with torch.no_grad():
        val = [cross_entropy(model(x), y).item() for x, y in batches(VAL_SEED, VAL_BATCHES)]
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "val_loss": sum(val) / len(val),
        "params": {name: t.detach().clone() for name, t in model.state_dict().items()},
    }


def differences(label: str, got: dict, ref: dict) -> list[str]:
    """What differs between a layout's run and the single-rank reference, as readable lines."""
    problems = (
        [f"{label}: dp replicas differ in {', '.join(got['replicas_differ'][:3])}"]
        if got["replicas_differ"]
        else []
    )
    if set(got["params"]) != set(ref["params"]):
        missing, extra = (
            set(ref["params"]) - set(got["params"]),
            set(got["params"]) - set(ref["params"]),
        )
        return [
            *problems,
            f"{label}: parameter names differ: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}",
        ]
    pairs = [
        (
            key,
            torch.tensor(got[key], dtype=torch.float64),
            torch.tensor(ref[key], dtype=torch.float64),
        )
        for key in ("losses", "grad_norms", "val_loss")
    ]
    for name, a, b in pairs:
        try:
            torch.testing.assert_close(a, b, **TOL)
        except AssertionError as e:
            problems.append(f"{label}: {name}: {str(e).splitlines()[-2:]}")
    for name in sorted(ref["params"]):
        try:
            # Each layout sums in its own order (see helpers.FP32_EPS), over `STEPS` steps.
            assert_reordered_close(got["params"][name], ref["params"][name], steps=STEPS)
        except AssertionError as e:
            problems.append(f"{label}: {name}: {str(e).splitlines()[-2:]}")
    return problems


@pytest.mark.numerics
@pytest.mark.mpi(ranks=4, timeout=150)
def test_pipeline_layouts_match_single_rank(comm):
    """pp=1, pp=2, pp=4 and dp=2 x pp=2, both schedules, m below, equal to and above pp
    micro-batches, and interleaved (2 chunks per pp rank, one block each) under pp=2 and
    dp=2 x pp=2: the same losses, gradient norms, validation loss and updated parameters
    as plain PyTorch on one rank."""
    rank, size = comm.rank, comm.size
    assert size == 4

    # References in plain PyTorch with micro-batches of 2; each rank computes some of them.
    mine = {m: single_rank_reference(m) for m in [16, 8, 4, 2, 1][rank::size]}
    reference = {m: r for part in comm.allgather(mine) for m, r in part.items()}

    runs = []  # (label, num_micro, result on rank 0 of the layout's communicator)
    # pp=1 through hpcllm's schedules and data parallelism (of one rank): ranks 0 and 1.
    if rank < 2:
        kind = ("1f1b", "gpipe")[rank]
        runs.append(
            (
                f"pp=1 {kind} m=4",
                4,
                run_layout(MPI.COMM_SELF, pp=1, dp=1, schedule=kind, num_micro=4, micro_batch=2),
            )
        )
    # pp=2: the two halves of the world run one schedule each, at the same time.
    half = comm.Split(color=rank // 2, key=rank)
    kind = ("1f1b", "gpipe")[rank // 2]
    for m, stage_layers in [(1, ""), (2, ""), (8, ""), (4, "3,1")]:
        result = run_layout(
            half, pp=2, dp=1, schedule=kind, num_micro=m, micro_batch=2, stage_layers=stage_layers
        )
        runs.append((f"pp=2 {kind} m={m} stage_layers='{stage_layers}'", m, result))
    result = run_layout(
        half, pp=2, dp=1, schedule=kind, num_micro=4, micro_batch=2, virtual_stages=2
    )
    runs.append((f"pp=2 x V=2 {kind} m=4", 4, result))
    half.Free()
    for kind in ("1f1b", "gpipe"):
        for m in (1, 4, 16):
            runs.append(
                (
                    f"pp=4 {kind} m={m}",
                    m,
                    run_layout(comm, pp=4, dp=1, schedule=kind, num_micro=m, micro_batch=2),
                )
            )
        # dp=2 x pp=2: each dp rank takes one of the 2 samples of the reference's micro-batch.
        for m in (1, 2, 8):
            runs.append(
                (
                    f"dp=2 x pp=2 {kind} m={m}",
                    m,
                    run_layout(comm, pp=2, dp=2, schedule=kind, num_micro=m, micro_batch=1),
                )
            )

    result = run_layout(
        comm, pp=2, dp=2, schedule="1f1b", num_micro=2, micro_batch=1, virtual_stages=2
    )
    runs.append(("dp=2 x pp=2 x V=2 1f1b m=2", 2, result))
    check_layouts(comm, runs, reference, count=2 + 2 * 5 + 2 * (3 + 3) + 1, moved=reference[8])


def check_layouts(
    comm, runs: list, reference: dict, *, count: int, moved: dict, cfg: ModelConfig = GPT_CFG
) -> None:
    """On rank 0: the `count` runs of all ranks equal their single-rank references, and the
    reference `moved` trained far enough for the comparison to mean something."""
    gathered = comm.gather([run for run in runs if run[2] is not None], root=0)
    if comm.rank != 0:
        return
    results = [run for part in gathered for run in part]
    assert len(results) == count
    problems = []
    for label, m, result in results:
        problems += differences(label, result, reference[m])
    assert not problems, "\n".join(problems)
    # The comparisons mean something: training moved the weights well beyond the tolerance,
    # and gradient clipping, whose norm spans every stage, was active.
    assert max(moved["losses"]) - min(moved["losses"]) > 1e-3
    assert max(moved["grad_norms"]) > GRAD_CLIP
    start = GPT(cfg, init_seed=INIT_SEED).state_dict()
    assert min((moved["params"][n] - start[n]).abs().max().item() for n in start) > 1e-3


# llama with grouped-query attention (2 query heads share 1 key/value head) and QK-norm.
LLAMA_CFG = dataclasses.replace(GPT_CFG, arch="llama", n_kv_head=1, qk_norm=True)


@pytest.mark.mpi(ranks=4, timeout=120)
def test_llama_layouts_match_single_rank(comm):
    """llama under pp=2 (both schedules), dp=2 (both schedules) and dp=2 x pp=2: the same
    losses, gradient norms, validation loss and parameters as plain PyTorch on one rank."""
    rank = comm.rank
    mine = {m: single_rank_reference(m, cfg=LLAMA_CFG) for m in [4, 2][rank::2] if rank < 2}
    reference = {m: r for part in comm.allgather(mine) for m, r in part.items()}

    runs = []
    half = comm.Split(color=rank // 2, key=rank)
    kind = ("1f1b", "gpipe")[rank // 2]
    for label, pp, dp, m, micro_batch in [("pp=2", 2, 1, 4, 2), ("dp=2", 1, 2, 2, 1)]:
        result = run_layout(
            half, pp=pp, dp=dp, schedule=kind, num_micro=m, micro_batch=micro_batch, cfg=LLAMA_CFG
        )
        runs.append((f"llama {label} {kind} m={m}", m, result))
    half.Free()
    result = run_layout(
        comm, pp=2, dp=2, schedule="1f1b", num_micro=2, micro_batch=1, cfg=LLAMA_CFG
    )
    runs.append(("llama dp=2 x pp=2 1f1b m=2", 2, result))
    check_layouts(comm, runs, reference, count=2 * 2 + 1, moved=reference[4], cfg=LLAMA_CFG)
    start = GPT(LLAMA_CFG, init_seed=INIT_SEED).state_dict()
    assert "wpe.weight" not in start and "blocks.0.attn.k_norm.weight" in start


@pytest.mark.mpi(ranks=4, timeout=90)
def test_1f1b_bounds_activations_gpipe_holds_all(comm):
    """With pp=4 and m=8, stage s keeps at most pp - s micro-batches of activations under 1F1B
    and all m under GPipe; the footprint of one micro-batch comes from a 1-micro-batch run."""
    pp, m = comm.size, 8
    peaks = {}
    for kind in ("1f1b", "gpipe"):
        for num_micro in (1, m):
            result = run_layout(
                comm,
                pp=pp,
                dp=1,
                schedule=kind,
                num_micro=num_micro,
                micro_batch=2,
                steps=1,
            )
            if result is not None:
                assert all(v == 0 for v in result["still_saved"].values()), result["still_saved"]
                peaks[kind, num_micro] = {s: peak for (s, _), peak in result["peaks"].items()}
    if comm.rank != 0:
        return
    for s in range(pp):
        one = peaks["1f1b", 1][s]
        assert one > 0 and peaks["gpipe", 1][s] == one, (s, peaks)
        gpipe, one_f_one_b = peaks["gpipe", m][s] / one, peaks["1f1b", m][s] / one
        assert gpipe == pytest.approx(m, abs=0.01), f"stage {s}: GPipe held {gpipe} micro-batches"
        assert one_f_one_b <= pp - s + 0.01, f"stage {s}: 1F1B held {one_f_one_b} micro-batches"
        assert one_f_one_b == pytest.approx(pp - s, abs=0.01), f"stage {s}: 1F1B held {one_f_one_b}"
    assert peaks["1f1b", m][0] / peaks["1f1b", 1][0] == pytest.approx(pp, abs=0.01)


@pytest.mark.mpi(ranks=4, timeout=120)
def test_1f1b_stage_memory_with_message_buffers_does_not_grow_with_m(comm):
    """What a stage holds, its message buffers included, stays within the 1F1B bound as m
    grows: received activations (pp - s in flight, one posted ahead), received gradients and
    sends in flight, each a few buffers whatever m is. Keeping every send's tensor until the
    end of the step (2 m buffers on a middle stage) fails this."""
    pp, message = comm.size, 2 * SEQ_LEN * D_MODEL * 4  # micro-batch 2, fp32
    meters = {}
    for m in (pp, 4 * pp):
        result = run_layout(comm, pp=pp, dp=1, schedule="1f1b", num_micro=m, micro_batch=2, steps=2)
        if result is not None:
            meters[m] = {s: meter for (s, _), meter in result["meters"].items()}
    if comm.rank != 0:
        return
    for s in range(pp):
        small, large = meters[pp][s], meters[4 * pp][s]
        # Receive pools: pp - s + 1 activations (none on the first stage), 2 gradients (none
        # on the last); sends: MAX_SENDS_IN_FLIGHT per direction.
        receives = (pp - s + 1 if s else 0) + (2 if s < pp - 1 else 0)
        bound = (receives + 2 * PipelineStage.MAX_SENDS_IN_FLIGHT) * message
        assert 0 < large.buffers_peak <= bound, (s, large.buffers_peak / message)
        assert large.buffers == receives * message, "only the receive pools outlive a step"
        # The activations are the same whatever m (the existing bound), and so is the total
        # up to sends in flight, whose completion is a matter of timing.
        assert large.peak == small.peak
        slack = 2 * PipelineStage.MAX_SENDS_IN_FLIGHT * message
        assert large.total_peak <= small.total_peak + slack, (s, large.total_peak / message)


# ---------------------------------------------------------------- end to end: python -m hpcllm.train

SETTINGS = {
    "model.n_layer": N_LAYER,
    "model.n_head": N_HEAD,
    "model.d_model": D_MODEL,
    "train.seq_len": SEQ_LEN,
    "train.micro_batch_size": 4,
    "train.grad_accum_steps": 2,
    "train.max_steps": 6,
    "train.log_every": 1,
    "train.eval_every": 3,
    "train.eval_batches": 2,
    "train.threads": 1,
    "optim.lr": LR,
    "optim.warmup_steps": 2,
    "optim.grad_clip": GRAD_CLIP,
    "checkpoint.every": 3,
    "checkpoint.keep": 2,
    "run.sample_tokens": 0,
}


# hpcllm.train's AdamW has eps 1e-8 (see ADAM_EPS): over 6 steps, weights whose exact gradient
# is zero may drift apart by a few lr/1000 between layouts; a real fault moves them by ~lr.
E2E_PARAM_TOL = {"atol": 2e-5, "rtol": 1e-5}


# Losses of a layout's run against another's, and of a resumed run against the uninterrupted one.
LOSS_TOL = {"atol": 1e-5, "rtol": 1e-5}


def one_rank_run(reference_run, shards):
    """The uninterrupted SETTINGS run on one rank (pp 1, tp 1), shared by this file and
    test_tensor_parallel: (run folder, result)."""
    return reference_run(None, {**SETTINGS, "data.path": shards})


def pp2_run(reference_run, shards):
    """SETTINGS on pp 2 interleaved (parallel.virtual_stages 2: blocks 0 and 2 on rank 0, 1 and
    3 on rank 1), with an end-of-run sample: (run folder, result)."""
    return reference_run(
        2,
        {
            **SETTINGS,
            "data.path": shards,
            "parallel.pp": 2,
            "parallel.virtual_stages": 2,
            "run.sample_tokens": 12,
        },
    )


def test_train_pp2_matches_pp1_losses_validation_and_sample(reference_run, shards):
    (pp2, result), (pp1, _) = pp2_run(reference_run, shards), one_rank_run(reference_run, shards)
    train2, val2 = read_metrics(pp2)
    train1, val1 = read_metrics(pp1)
    assert [r["step"] for r in train2] == [r["step"] for r in train1] == list(range(1, 7))
    assert_close_dicts(losses(pp2), losses(pp1), **TOL)
    # Validation runs forward-only through the pipeline; the loss is the single rank's.
    assert [r["step"] for r in val2] == [r["step"] for r in val1] == [3, 6]
    assert_close_dicts(
        {r["step"]: r["val_loss"] for r in val2}, {r["step"]: r["val_loss"] for r in val1}, **TOL
    )
    assert_close_dicts(
        merged_params(pp2 / "checkpoints/step_000006"),
        merged_params(pp1 / "checkpoints/step_000006"),
        **E2E_PARAM_TOL,
    )
    # Each stage wrote its own shard; the end-of-run sample merges them on rank 0.
    assert sorted(p.name for p in (pp2 / "checkpoints/step_000006").glob("model-*")) == [
        "model-pp0-dp0-tp0.safetensors",
        "model-pp1-dp0-tp0.safetensors",
    ]
    out = result.stdout
    assert out.count("sample:\n") == 1, out[-2000:]
    assert len(out.split("sample:\n", 1)[1].strip()) > 0


@pytest.mark.parametrize("written, resumed", [(2, 1), (1, 2)], ids=["pp2-to-pp1", "pp1-to-pp2"])
def test_checkpoint_resumes_under_another_pp(reference_run, shards, tmp_path, written, resumed):
    """The step-3 checkpoint of one layout, alone in a fresh run folder, resumed under the
    other: steps 4-6 repeat the uninterrupted run's losses (step 5 on depends on the
    restored AdamW state), and the final weights match. pp2 was written interleaved
    (2 chunks per rank) and the resumed pp=2 run is not, so each direction also changes
    parallel.virtual_stages."""
    run = pp2_run if written == 2 else one_rank_run
    source, _ = run(reference_run, shards)
    result = resume_elsewhere(
        source,
        3,
        tmp_path / "resumed",
        resumed,
        {**SETTINGS, "data.path": shards, "parallel.pp": resumed},
        loss_tol=LOSS_TOL,
        param_tol=E2E_PARAM_TOL,
    )
    assert (
        f"layout {{'pp': {written}, 'dp': 1, 'tp': 1}} -> {{'pp': {resumed}, 'dp': 1, 'tp': 1}}"
        in result.stdout
    )


def test_rank_dying_mid_schedule_ends_the_job(shards, tmp_path):
    """Rank 1 (the last stage) raises at step 2 while rank 0 waits for its gradients:
    MPI_Abort ends the job with an error naming rank 1 instead of leaving rank 0 hanging."""
    result = launch_train(
        2,
        {
            **SETTINGS,
            "data.path": shards,
            "run.dir": tmp_path / "run",
            "parallel.pp": 2,
            "train.max_steps": 1000,
            "checkpoint.every": 0,
            "train.eval_every": 0,
        },
        timeout=90,
        faults={"FAIL_AT_STEP": 2, "FAIL_RANK": 1},
    )
    assert result.returncode != 0, str(result)
    assert "rank 1/2" in result.stderr and "injected failure at step 2" in result.stderr, str(
        result
    )
    assert result.wall < 45, f"the job took {result.wall:.0f}s to end after a rank died\n{result}"


BAD_LAYOUTS = {
    # name: (settings, the error), refused while each rank builds its stage
    "more-stages-than-blocks": (
        {"model.n_layer": 2, "parallel.pp": 4},
        "parallel.pp = 4 stages but the model has only model.n_layer = 2 blocks",
    ),
    "split-misses-blocks": (
        {"parallel.pp": 2, "parallel.stage_layers": "1,1"},
        "parallel.stage_layers '1,1' must give 2 positive block counts",
    ),
}


@pytest.mark.mpi(ranks=4, timeout=120)
def test_bad_layout_refused_before_training(comm, mpi_tmp_path):
    """hpcllm.train's start-up on 4 ranks (in process: helpers.refusal) refuses each layout
    on every rank with the same message, before training and leaving no run folder."""
    if comm.rank == 0:
        prepare_data(mpi_tmp_path / "shards")
    comm.Barrier()
    for name, (settings, message) in BAD_LAYOUTS.items():
        run_dir = mpi_tmp_path / name
        more = {"data.path": mpi_tmp_path / "shards", "run.dir": run_dir, **settings}
        got = refusal(more, base={**TINY, **SETTINGS})
        assert got.startswith(message), (name, got)  # no "rank N:" prefix: all ranks agree
