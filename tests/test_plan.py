"""The layout planner (`--dry-run --world-size N`) against what real ranks hold and send.

One 2-rank test trains one step of a tiny GPT under dp 2, dp 2 + ZeRO-1, tp 2 and pp 2 (1f1b,
4 micro-batches), built as hpcllm.train builds it, with communicators that count the bytes
handed to MPI; each rank compares its parameters, gradients and optimizer state (exactly),
its activations (ActivationMeter's peak) and its traffic (within 10%) with the plan.
"""

import sys
from contextlib import nullcontext

import pytest
import torch
from mpi4py import MPI

from hpcllm.comm import TensorComm
from hpcllm.config import Config, ParallelConfig, TrainConfig
from hpcllm.model import ModelConfig
from hpcllm.optim import build_optimizer
from hpcllm.parallel.data_parallel import DataParallel
from hpcllm.parallel.parallelize import build_stage, loss_function
from hpcllm.parallel.pipeline import PipelineStage, Schedule
from hpcllm.parallel.steps import clip_grad_norm, stage_inputs, train_step
from hpcllm.parallel.zero import optimizer_state_bytes
from hpcllm.plan import make_plan, rank_memory
from hpcllm.topology import Grid

from helpers import run

CPU = torch.device("cpu")


class CountingComm(TensorComm):
    """A TensorComm that adds up the bytes of every tensor it hands to MPI."""

    def __init__(self, comm, name):
        super().__init__(comm, name=name)
        self.payload = 0

    def _count(self, tensor):
        self.payload += tensor.numel() * tensor.element_size()

    def allreduce_(self, tensor, op=MPI.SUM):
        self._count(tensor)
        return super().allreduce_(tensor, op)

    def iallreduce_(self, tensor, op=MPI.SUM):
        self._count(tensor)
        return super().iallreduce_(tensor, op)

    def ireduce_scatter(self, tensor, out=None, op=MPI.SUM):
        self._count(tensor)
        return super().ireduce_scatter(tensor, out, op)

    def iallgather_(self, tensor):
        self._count(tensor)
        return super().iallgather_(tensor)

    def isend(self, tensor, dest, tag=0):
        self._count(tensor)
        return super().isend(tensor, dest, tag)


def unique_bytes(tensors) -> int:
    """Bytes of the distinct storages under `tensors` (views of one bucket count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def measure(comm, cfg: Config) -> dict:
    """One training step of this rank as hpcllm.train sets it up; what it held and sent."""
    p, t = cfg.parallel, cfg.train
    grid = Grid.build(comm, pp=p.pp, tp=p.tp)
    comms = {a: CountingComm(grid.comm(a), a) for a in ("dp", "pp", "tp")}
    model = build_stage(cfg, grid, CPU, comms["tp"])
    ddp = DataParallel(model, comms["dp"], p.bucket_mb, shard=p.zero == 1)
    stage = PipelineStage(
        model,
        comms["pp"],
        stage=grid.rank("pp"),
        num_stages=grid.size("pp"),
        act_shape=(t.micro_batch_size, t.seq_len, cfg.model.d_model),
        device=CPU,
    )
    schedule = Schedule(stage, p.schedule, loss_fn=loss_function(cfg, comms["tp"]))
    optimizer = build_optimizer(model, cfg.optim, comms["dp"], CPU, sharded=ddp if p.zero else None)
    g = torch.Generator().manual_seed(grid.rank("dp"))
    tokens = torch.randint(
        cfg.model.vocab_size, (t.grad_accum_steps, t.micro_batch_size, 17), generator=g
    )
    batches = stage_inputs([(x[:, :-1], x[:, 1:]) for x in tokens], grid, CPU)
    train_step(schedule, ddp, batches, nullcontext())
    clip_grad_norm(model, 1.0, [comms["pp"]], comms["tp"], ddp)
    optimizer.step()
    grads = [q.grad for q in model.parameters()] + [
        b.grad_shard for b in ddp.buckets if b.grad_shard is not None
    ]
    result = {
        "coords": dict(grid.coords),
        "params": unique_bytes(model.parameters()),
        "grads": unique_bytes(grads),
        "optimizer": optimizer_state_bytes(optimizer),
        "activations": schedule.meter.peak,
        "payload": {a: c.payload for a, c in comms.items()},
    }
    grid.free()
    return result


def tiny(**parallel) -> Config:
    model = ModelConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, d_model=32)
    accum = 4 if parallel.get("pp", 1) > 1 else 2
    train = TrainConfig(seq_len=16, micro_batch_size=2, grad_accum_steps=accum)
    return Config(model=model, train=train, parallel=ParallelConfig(bucket_mb=0.002, **parallel))


@pytest.mark.mpi(ranks=2, timeout=180)
def test_plan_matches_what_each_rank_holds_and_sends(comm):
    layouts = {
        "dp2": tiny(),
        "dp2 zero1": tiny(zero=1),
        "tp2": tiny(tp=2),
        "pp2 1f1b": tiny(pp=2),
        "pp2 gpipe": tiny(pp=2, schedule="gpipe"),
    }
    problems = []
    for label, cfg in layouts.items():
        got = measure(comm, cfg)
        plan = make_plan(cfg, comm.size)
        coords = got["coords"]
        s = plan.stages[coords["pp"]]
        # This very rank's figures (the plan's table shows dp rank 0's and tp rank 0's).
        mine = rank_memory(cfg, plan.dims, coords)
        for key in ("params", "grads", "optimizer"):
            if getattr(mine, key) != got[key]:
                problems.append(
                    f"{label} rank {comm.rank}: {key} {getattr(mine, key)} planned, {got[key]} held"
                )
        assert s.memory.params == mine.params and s.memory.grads == mine.grads
        if abs(s.activations - got["activations"]) > 0.1 * got["activations"]:
            problems.append(
                f"{label} rank {comm.rank}: activations {s.activations} planned, {got['activations']} measured"
            )
        for axis, measured in got["payload"].items():
            # The plan leaves out the scalars (a gradient norm's 8 bytes per communicator).
            if abs(s.payload[axis] - measured) > 0.1 * measured + 16:
                problems.append(
                    f"{label} rank {comm.rank}: {axis} payload {s.payload[axis]} planned, {measured} measured"
                )
        if label == "tp2":
            assert got["payload"]["tp"] > 10_000  # the test sees the tp all-reduces at all
        if label.startswith("pp2"):
            assert s.in_flight == (4 if "gpipe" in label else 2 - coords["pp"])
            assert got["payload"]["pp"] > 10_000
    problems = [p for part in comm.allgather(problems) for p in part]
    assert not problems, "\n".join(problems)


def dry_run(*args: str):
    return run(
        [sys.executable, "-m", "hpcllm.train", "--dry-run", *args], timeout=400
    )  # generous: a loaded 2-core machine


def test_dry_run_prints_the_plan_and_refuses_a_bad_layout_in_one_line():
    result = dry_run(
        "--world-size", "1024", "--parallel.pp", "2", "--parallel.tp", "4", "--model.vocab_size", "50257",
        "--model.n_layer", "2", "--model.n_head", "4", "--model.d_model", "64",
    )  # fmt: skip
    assert result.returncode == 0, result
    out = result.stdout
    assert out.startswith("world 1024 = pp 2 x dp 128 x tp 4"), result
    assert "vocab 50257 (padded to 50260)" in out, result
    for text in ("memory per rank", "optimizer", "activations", "traffic per rank", "tp (size 4)"):
        assert text in out, (text, result)
    assert "largest rank:" in out, result

    result = dry_run("--world-size", "6", "--parallel.tp", "4", "--model.vocab_size", "257")
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result
    assert "world size 6" in lines[0] and "tp=4" in lines[0], result
