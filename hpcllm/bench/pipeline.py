"""`python -m hpcllm.bench pipeline`: pipeline schedules against their analytic bubble.

    mpirun -np 2 python -m hpcllm.bench pipeline --iters 10

Every rank is one stage (dp = 1) of a GPT with `--layers-per-stage` blocks per stage. For
m = p, 2p, 4p, 8p micro-batches and both schedules it measures the step time and compares
it with the ideal (m + p - 1) * t, where t is one micro-batch's forward + backward on the
slowest stage without communication; the measured bubble is 1 - m t / step, the analytic
one (p - 1) / (m + p - 1). It also reports each stage's peak activation memory (saved
tensors, measured by the schedule's ActivationMeter) and the activation send/receive
throughput of TensorComm against raw MPI Send/Recv of the same bytes.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext

import numpy as np
import torch
from mpi4py import MPI

from hpcllm.bench.common import slowest, table, timed
from hpcllm.comm import TensorComm
from hpcllm.model import GPT, ModelConfig
from hpcllm.parallel.pipeline import PipelineStage, Schedule
from hpcllm.runtime import print0


def add_arguments(parser) -> None:
    parser.add_argument("--layers-per-stage", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--iters", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--messages", type=int, default=50, help="messages per p2p round")
    parser.add_argument("--p2p-only", action="store_true", help="only the send/receive throughput")


def _stage(args, world: MPI.Comm, schedule: str) -> Schedule:
    """This rank's stage of a GPT cut into world-size stages, blocks balanced."""
    p, rank = world.Get_size(), world.Get_rank()
    per = args.layers_per_stage
    cfg = ModelConfig(
        vocab_size=args.vocab,
        block_size=args.seq_len,
        n_layer=per * p,
        n_head=args.n_head,
        d_model=args.d_model,
    )
    module = GPT(
        cfg, layers=range(rank * per, (rank + 1) * per), first=rank == 0, last=rank == p - 1
    )
    stage = PipelineStage(
        module,
        TensorComm(world, name="pp"),
        stage=rank,
        num_stages=p,
        act_shape=(args.micro_batch, args.seq_len, args.d_model),
        device=torch.device("cpu"),
    )
    return Schedule(stage, schedule)


def _batches(args, stage: PipelineStage, m: int) -> list:
    gen = torch.Generator().manual_seed(0)
    shape = (args.micro_batch, args.seq_len)
    out = []
    for _ in range(m):
        x, y = (
            torch.randint(0, args.vocab, shape, generator=gen),
            torch.randint(0, args.vocab, shape, generator=gen),
        )
        out.append((x if stage.is_first else None, y if stage.is_last else None))
    return out


def micro_batch_compute(args, world: MPI.Comm) -> float:
    """Forward + backward of one micro-batch on the slowest stage, no communication: the t
    of the ideal step time (m + p - 1) t."""
    schedule = _stage(args, world, "1f1b")
    stage = schedule.stage
    x, y = _batches(args, stage, 1)[0]
    act = torch.randn(args.micro_batch, args.seq_len, args.d_model)
    grad = torch.randn_like(act)

    def one():
        inp = x if stage.is_first else act.clone().requires_grad_()
        out = stage.module(inp)
        if stage.is_last:
            out = schedule.loss_fn(out, y)
        torch.autograd.backward(out, None if stage.is_last else grad)

    for _ in range(args.warmup):
        one()
    times = []
    for _ in range(args.iters * 2):
        start = time.perf_counter()
        one()
        times.append(time.perf_counter() - start)
    t = np.array([statistics.median(times)])
    world.Allreduce(MPI.IN_PLACE, t, op=MPI.MAX)
    return float(t[0])


def run(args, world: MPI.Comm) -> dict:
    p = world.Get_size()
    if p < 2:
        raise ValueError("the pipeline benchmark needs at least 2 ranks (one per stage)")
    if args.p2p_only:
        return {"p2p": bench_p2p(args, world, timed, slowest)}
    t_mb = micro_batch_compute(args, world)
    rows, runs = [], []
    for m in (p, 2 * p, 4 * p, 8 * p):
        for kind in ("gpipe", "1f1b"):
            sched = _stage(args, world, kind)
            batches = _batches(args, sched.stage, m)

            def step(sched=sched, batches=batches):
                sched.run(batches, nullcontext(), lambda i: None)
                sched.stage.module.zero_grad(set_to_none=True)

            for _ in range(args.warmup):
                step()
            sched.meter.peak = 0
            measured = statistics.median(
                slowest(world, [timed(world, step) for _ in range(args.iters)])
            )
            peaks = world.allgather(sched.meter.peak)
            ideal, analytic = (m + p - 1) * t_mb, (p - 1) / (m + p - 1)
            bubble = 1 - m * t_mb / measured
            runs.append(
                {
                    "schedule": kind,
                    "m": m,
                    "p": p,
                    "step_s": measured,
                    "ideal_s": ideal,
                    "bubble_measured": bubble,
                    "bubble_analytic": analytic,
                    "peak_activation_bytes_per_stage": peaks,
                }
            )
            rows.append(
                [
                    kind,
                    m,
                    1000 * measured,
                    1000 * ideal,
                    measured / ideal,
                    f"{100 * bubble:.1f}%",
                    f"{100 * analytic:.1f}%",
                    " / ".join(f"{b / 2**20:.1f}" for b in peaks),
                ]
            )
    print0(
        f"pipeline: {p} stages x {args.layers_per_stage} blocks (d_model {args.d_model}), micro-batch "
        f"{args.micro_batch} x {args.seq_len}; one micro-batch fwd+bwd on the slowest stage "
        f"t = {1000 * t_mb:.1f} ms; ideal step (m + p - 1) t; medians of {args.iters} steps"
    )
    print0(
        table(
            [
                "schedule",
                "m",
                "step ms",
                "ideal ms",
                "step/ideal",
                "bubble",
                "analytic bubble",
                "peak activations MiB, stage 0 / 1 / ...",
            ],
            rows,
        )
    )
    return {
        "micro_batch_compute_s": t_mb,
        "runs": runs,
        "p2p": bench_p2p(args, world, timed, slowest),
    }


def bench_p2p(args, world: MPI.Comm, timed, slowest) -> dict:
    """Activation messages stage 0 -> stage 1: TensorComm isend/irecv vs raw MPI Send/Recv,
    interleaved rounds of `args.messages` messages of one activation each."""
    rank = world.Get_rank()
    shape = (args.micro_batch, args.seq_len, args.d_model)
    comm = TensorComm(world, name="pp")
    tensor = torch.randn(shape)
    # The same memory for both: where a buffer lies changes shared-memory copy speed by more
    # than the layer under test costs, so a separate NumPy array would not compare like with like.
    raw = tensor.numpy()
    nbytes = raw.nbytes

    def hpcllm_round():
        for _ in range(args.messages):
            if rank == 0:
                comm.wait(comm.isend(tensor, 1, 0))
            elif rank == 1:
                comm.wait(comm.irecv(tensor, 0, 0))

    def raw_round():
        for _ in range(args.messages):
            if rank == 0:
                world.Send(raw, dest=1, tag=0)
            elif rank == 1:
                world.Recv(raw, source=0, tag=0)

    for _ in range(2):
        hpcllm_round()
        raw_round()
    t_h, t_r = [], []
    for _ in range(args.iters):
        t_h.append(timed(world, hpcllm_round))
        t_r.append(timed(world, raw_round))
    t_h, t_r = statistics.median(slowest(world, t_h)), statistics.median(slowest(world, t_r))
    gbps_h, gbps_r = nbytes * args.messages / t_h / 1e9, nbytes * args.messages / t_r / 1e9
    print0(
        f"activation send/receive, {nbytes / 2**20:.2f} MiB messages, stage 0 -> 1: TensorComm {gbps_h:.2f} GB/s, "
        f"raw MPI Send/Recv {gbps_r:.2f} GB/s, ratio {gbps_h / gbps_r:.3f} (target >= 0.95)"
    )
    return {
        "message_bytes": nbytes,
        "tensorcomm_GBps": gbps_h,
        "raw_GBps": gbps_r,
        "ratio": gbps_h / gbps_r,
    }
