"""Gradient compression (`parallel.grad_compression`): the reduction math on 2 ranks, then
training end to end against the uncompressed run, with accumulation, pp and exact resume."""

import math
import shutil

import pytest
import torch
import torch.nn as nn

from hpcllm.config import Config, ConfigError, validate

from helpers import losses, prepare_data, read_metrics, train


class Shapes(nn.Module):
    """Parameters of the shapes a GPT has: matrices, a vector, an odd-sized one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(12, 7))
        self.b = nn.Parameter(torch.zeros(5))
        self.c = nn.Parameter(torch.zeros(9, 16))
        self.d = nn.Parameter(torch.zeros(3, 2, 4))


def reduce_once(ddp, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put `grads` into the parameters' .grad (views into the buckets), reduce, return the
    averages. Every bucket is launched by finish(), in order, as for unused parameters."""
    ddp.zero_grad()
    for bucket in ddp.buckets:
        for p in bucket.params:
            p.grad.copy_(grads[ddp.names[id(p)]])
    ddp.finish()
    return {ddp.names[id(p)]: p.grad.clone() for b in ddp.buckets for p in b.params}


def make_ddp(comm, mode: str, bucket_mb: float, shard: bool = False, **powersgd):
    from hpcllm.distributed import compression
    from hpcllm.distributed.comm import TensorComm
    from hpcllm.distributed.data_parallel import DataParallel

    model = Shapes()
    ddp = DataParallel(model, TensorComm(comm, name="dp"), bucket_mb, shard=shard)
    if mode == "powersgd":
        names = {id(p): n for n, p in model.named_parameters()}
        ddp.compressor = compression.PowerSGD(ddp.comm, ddp.buckets, names, **powersgd)
    else:
        ddp.compressor = compression.build(mode, ddp.comm, ddp.buckets, model)
    ddp.names = {id(p): n for n, p in model.named_parameters()}
    return model, ddp


@pytest.mark.numerics
@pytest.mark.mpi(ranks=2, timeout=120)
def test_reduction_math_of_each_mode(comm):
    """bf16: exactly the fp32 sum of the bf16-rounded inputs, rounded once; fp16: close to
    the exact mean for huge and tiny gradients alike (scaled per chunk); powersgd at full
    rank: the exact mean, step after step; the bytes each puts on the wire."""
    size, rank = comm.size, comm.rank
    gen = torch.Generator().manual_seed(7)
    shapes = {n: p.shape for n, p in Shapes().named_parameters()}
    # Every rank draws every rank's gradients: each knows the exact result.
    every = [{n: torch.randn(s, generator=gen) for n, s in shapes.items()} for _ in range(size)]
    exact = {n: sum(g[n] for g in every) / size for n in shapes}

    _, ddp = make_ddp(comm, "bf16", bucket_mb=1e-4)  # several buckets of a few params
    assert len(ddp.buckets) > 1
    got = reduce_once(ddp, every[rank])
    for n in shapes:
        rounded = sum(g[n].bfloat16().float() for g in every).bfloat16().float() / size
        assert torch.equal(got[n], rounded), n
    numel = sum(b.buffer.numel() for b in ddp.buckets)
    # Half the 2 (p-1)/p x 4 bytes of a fp32 ring all-reduce (chunks padded to p).
    assert numel * 2 <= ddp.wire_bytes <= numel * 2 + 4 * len(ddp.buckets)

    _, ddp = make_ddp(comm, "fp16", bucket_mb=1e-4)
    for scale in (1e6, 1e-7):  # beyond fp16's range; below its smallest subnormal (6e-8)
        got = reduce_once(ddp, {n: g * scale for n, g in every[rank].items()})
        for n in shapes:
            torch.testing.assert_close(got[n], exact[n] * scale, rtol=2e-3, atol=2e-3 * scale)

    _, ddp = make_ddp(
        comm, "powersgd", bucket_mb=1, rank=16, warmup=0, seed=1, compressible=lambda *a: True
    )
    plans = ddp.compressor.plans[id(ddp.buckets[0])]
    assert len(plans[0]) == 3 and len(plans[1]) == 1  # three matrices, one vector
    for step in range(3):
        grads = [{n: g * (step + 1) for n, g in gs.items()} for gs in every]
        got = reduce_once(ddp, grads[rank])
        for n in shapes:
            torch.testing.assert_close(got[n], exact[n] * (step + 1), rtol=1e-4, atol=1e-5)


@pytest.mark.mpi(ranks=[2, 3], timeout=120)
def test_powersgd_under_zero1_keeps_its_shard_of_the_zero0_result(comm):
    """PowerSGD with ZeRO-1, over a warm-up step and compressed ones: each rank's gradient
    shard holds bit for bit the values PowerSGD without ZeRO-1 leaves there, and its per-rank
    state (error feedback, warm-start Q) is the same bit for bit (the same operations)."""
    size, rank = comm.size, comm.rank
    gen = torch.Generator().manual_seed(13 + rank)  # each rank its own gradients
    shapes = {n: p.shape for n, p in Shapes().named_parameters()}
    settings = {"rank": 2, "warmup": 1, "seed": 3}
    _, whole = make_ddp(comm, "powersgd", bucket_mb=1e-4, **settings)
    _, sharded = make_ddp(comm, "powersgd", bucket_mb=1e-4, shard=True, **settings)
    assert len(sharded.buckets) > 1
    for step in range(4):
        grads = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
        reduce_once(whole, grads)
        reduce_once(sharded, grads)
        for b0, b1 in zip(whole.buckets, sharded.buckets, strict=True):
            lo, hi = b1.shard_range(rank, size)
            n = max(0, min(hi, b0.buffer.numel()) - lo)  # the rest is padding
            assert b1.grad_shard is not None and b1.grad_shard[:n].any()
            assert torch.equal(b1.grad_shard[:n], b0.buffer[lo : lo + n]), step
            assert not b1.grad_shard[n:].any()
    state, mine = whole.compressor.state_dict(), sharded.compressor.state_dict()
    assert set(mine) == set(state) and any(k.endswith("/error") for k in state)
    for key, value in state.items():
        assert value.any() and torch.equal(mine[key], value), key


@pytest.mark.mpi(ranks=[2, 3], timeout=120)
def test_half_precision_under_zero1_keeps_the_rounded_sum_of_its_shard(comm):
    """bf16/fp16 with ZeRO-1: the compressed reduce-scatter leaves each rank the values the
    compressed all-reduce gives at its shard (the same sums, rounded the same way: bit for
    bit), within 16-bit rounding of the fp32 reduce-scatter's, for half the bytes."""
    size, rank = comm.size, comm.rank
    gen = torch.Generator().manual_seed(11)
    shapes = {n: p.shape for n, p in Shapes().named_parameters()}
    every = [{n: torch.randn(s, generator=gen) for n, s in shapes.items()} for _ in range(size)]
    # bf16's unit roundoff is 2^-8 (fp16's, scaled per chunk, smaller): each addend rounds by
    # at most 2^-8 of itself and the sum by 2^-8 of it, so by 2^-7 of the sum of |addends|.
    bound = {n: 2**-7 * sum(g[n].abs() for g in every) / size for n in shapes}
    _, fp32 = make_ddp(comm, "none", bucket_mb=1e-4, shard=True)
    reduce_once(fp32, every[rank])
    for mode in ("bf16", "fp16"):
        _, whole = make_ddp(comm, mode, bucket_mb=1e-4)
        _, sharded = make_ddp(comm, mode, bucket_mb=1e-4, shard=True)
        assert len(sharded.buckets) > 1
        reduce_once(whole, every[rank])
        reduce_once(sharded, every[rank])
        for b0, b1, ref in zip(whole.buckets, sharded.buckets, fp32.buckets, strict=True):
            lo, hi = b1.shard_range(rank, size)
            n = max(0, min(hi, b0.buffer.numel()) - lo)  # the rest is padding
            assert torch.equal(b1.grad_shard[:n], b0.buffer[lo : lo + n]), mode
            assert not b1.grad_shard[n:].any()
            for p, offset in zip(b1.params, b1.offsets, strict=True):
                a, b = max(lo, offset), min(hi, offset + p.numel())
                if a < b:
                    name = sharded.names[id(p)]
                    err = (b1.grad_shard[a - lo : b - lo] - ref.grad_shard[a - lo : b - lo]).abs()
                    assert (err <= bound[name].view(-1)[a - offset : b - offset]).all(), mode
        assert sharded.wire_bytes * 2 == whole.wire_bytes, mode


def test_phased_work_advances_its_phases_inside_test():
    """A bucket's later phases start from test() (the backward hooks call it) as soon as the
    earlier MPI work is done, without waiting; a pending phase holds the rest back."""
    from hpcllm.distributed.compression import PhasedWork

    class Fake:
        def __init__(self, done: bool):
            self.done = done

        def test(self) -> bool:
            return self.done

        def wait(self) -> None:
            self.done = True

    started = []
    second = Fake(done=False)
    work = PhasedWork(
        [
            lambda: started.append(1) or Fake(done=True),
            lambda: started.append(2) or second,
            lambda: started.append(3),
        ],
        wire_bytes=0,
    )
    assert started == [1]
    assert not work.test() and started == [1, 2]
    assert not work.test() and started == [1, 2]
    second.done = True
    assert work.test() and started == [1, 2, 3]


# ----------------------------------------------------------------- training end to end

STEPS = 12


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("compression-data") / "shards")


def run_mode(data_dir, run_dir, np: int, mode: str, more: dict | None = None):
    """A 12-step TINY run with checkpoints at 6 and 12; returns {step: loss}, the records."""
    settings = {
        "data.path": data_dir,
        "run.dir": run_dir,
        "train.max_steps": STEPS,
        "checkpoint.every": STEPS // 2,
        "parallel.grad_compression": mode,
        "parallel.powersgd_warmup": 2,
        **(more or {}),
    }
    result = train(np, settings, timeout=240)
    assert result.returncode == 0, result
    return losses(run_dir), read_metrics(run_dir)[0], result


def test_compressed_training_follows_the_uncompressed_run(data_dir, tmp_path):
    """dp 2: bf16 and fp16 within a hair of the fp32 all-reduce's losses, powersgd at rank 8
    close, each with fewer bytes on the wire."""
    ref, ref_records, _ = run_mode(data_dir, tmp_path / "none", 2, "none")
    numel = ref_records[0]["grad_wire_bytes"] // 4  # ring all-reduce on 2 ranks: 4 bytes each
    assert all(r["grad_wire_bytes"] == 4 * numel for r in ref_records)
    assert ref[STEPS] < ref[1] - 0.2
    for mode, tolerance in (("bf16", 1e-4), ("fp16", 1e-4), ("powersgd", 1e-2)):
        got, records, _ = run_mode(
            data_dir, tmp_path / mode, 2, mode, {"parallel.powersgd_rank": 8}
        )
        drift = max(abs(got[s] - ref[s]) / ref[s] for s in ref)
        assert drift < tolerance, (mode, got, ref)
        wire = records[-1]["grad_wire_bytes"]
        assert wire < (0.6 if mode != "powersgd" else 0.5) * 4 * numel, (mode, wire)
    # powersgd's warm-up steps are plain all-reduces.
    assert records[0]["grad_wire_bytes"] == 4 * numel
    # bf16 under ZeRO-1: the compressed reduce-scatter, half of bf16's bytes, bf16's losses
    # (the same rounded sums; AdamW sharded or not differ by fp32 rounding only).
    got, records, _ = run_mode(data_dir, tmp_path / "bf16-zero1", 2, "bf16", {"parallel.zero": 1})
    bf16 = losses(tmp_path / "bf16")
    assert all(got[s] == pytest.approx(bf16[s], rel=1e-5) for s in bf16), (got, bf16)
    assert records[-1]["grad_wire_bytes"] <= 0.3 * 4 * numel


def test_powersgd_with_pp_accumulation_and_zero1_resumes_exactly(data_dir, tmp_path):
    """pp 2 x dp 2 with ZeRO-1, 2 micro-batches a step, rank 1: trains, and a run stopped at
    step 6 and resumed gives the uninterrupted run's losses bit for bit (each rank's error
    feedback and Q are in the checkpoint, beside its shard of AdamW's moments; they are
    ZeRO-0's, bit for bit: see above). Resumed in another layout, the state starts afresh
    with a warning."""
    more = {
        "parallel.pp": 2,
        "parallel.zero": 1,
        "train.grad_accum_steps": 2,
        "parallel.powersgd_rank": 1,
    }
    ref, _, _ = run_mode(data_dir, tmp_path / "ref", 4, "powersgd", more)
    assert ref[STEPS] < ref[1] - 0.2
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ref", resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS:06d}")
    (resumed / "checkpoints" / "latest").write_text(f"step_{STEPS // 2:06d}\n")
    got, _, result = run_mode(data_dir, resumed, 4, "powersgd", more)
    assert f"at step {STEPS // 2}" in result.stdout and "afresh" not in result.stdout
    assert all(got[s] == ref[s] for s in range(STEPS // 2 + 1, STEPS + 1)), (got, ref)

    moved = tmp_path / "moved"
    shutil.copytree(resumed, moved)
    shutil.rmtree(moved / "checkpoints" / f"step_{STEPS:06d}")
    (moved / "checkpoints" / "latest").write_text(f"step_{STEPS // 2:06d}\n")
    got, _, result = run_mode(data_dir, moved, 2, "powersgd", {**more, "parallel.pp": 1})
    assert "state (error feedback, warm-start Q) starts afresh: the layout changed" in (
        result.stdout
    ), result
    assert all(math.isfinite(got[s]) for s in got)


def test_compression_refuses_what_it_does_not_support():
    for settings, words in (
        ({"grad_compression": "int8"}, "must be one of none, bf16, fp16, powersgd"),
        ({"powersgd_rank": 0}, "parallel.powersgd_rank = 0 is out of range"),
    ):
        cfg = Config()
        for key, value in settings.items():
            setattr(cfg.parallel, key, value)
        with pytest.raises(ConfigError, match=words):
            validate(cfg)
