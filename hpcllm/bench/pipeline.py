"""`python -m hpcllm.bench pipeline`: pipeline schedules against their analytic bubble.

    mpirun -np 2 python -m hpcllm.bench pipeline --iters 10

Every rank is one stage (dp = 1) of a GPT with `--layers-per-stage` blocks per stage. For
m = p, 2p, 4p, 8p micro-batches and both schedules, and 1f1b interleaved (the same blocks
per rank in `--virtual-stages` chunks), it measures the step time and compares it with the
ideal (m + (p - 1) / V) * t (V = 1 without interleaving), where t is one micro-batch's
forward + backward on the slowest stage without communication; the measured bubble is
1 - m t / step, the analytic one (p - 1) / V / (m + (p - 1) / V). It also reports each stage's peak memory (saved tensors, measured
by the schedule's ActivationMeter, alone and with the stage's message buffers: receive pools
and sends in flight) and the activation send/receive throughput of the pipeline's verbs and
of plain TensorComm isend/irecv against raw MPI Send/Recv of the same bytes.
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import nullcontext

import numpy as np
import torch
from mpi4py import MPI

from hpcllm.bench.common import slowest, table, timed
from hpcllm.distributed.comm import TensorComm
from hpcllm.distributed.pipeline import (
    PipelineStage,
    Schedule,
    chunk_stages,
    rank_chunks,
    split_layers,
)
from hpcllm.models.gpt import GPT, ModelConfig
from hpcllm.runtime.spmd import print0


def add_arguments(parser) -> None:
    parser.add_argument("--layers-per-stage", type=int, default=2)
    parser.add_argument(
        "--virtual-stages", type=int, default=2, help="chunks per rank of the interleaved runs"
    )
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--iters", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--messages", type=int, default=50, help="messages per p2p round")
    parser.add_argument("--p2p-only", action="store_true", help="only the send/receive throughput")


def _stage(args, world: MPI.Comm, schedule: str, virtual_stages: int = 1) -> Schedule:
    """This rank's stage of a GPT cut into world-size stages, blocks balanced (in
    `virtual_stages` chunks per rank)."""
    p, rank = world.Get_size(), world.Get_rank()
    per = args.layers_per_stage
    if per % virtual_stages:
        raise ValueError(
            f"--layers-per-stage {per} must be a multiple of --virtual-stages {virtual_stages}"
        )
    cfg = ModelConfig(
        vocab_size=args.vocab,
        block_size=args.seq_len,
        n_layer=per * p,
        n_head=args.n_head,
        d_model=args.d_model,
    )
    chunks = rank_chunks(split_layers(cfg.n_layer, p, virtual_stages=virtual_stages), p, rank)
    module = GPT(
        cfg,
        layers=chunks[0] if virtual_stages == 1 else chunks,
        first=rank == 0,
        last=rank == p - 1,
    )
    stages = chunk_stages(
        module,
        TensorComm(world, name="pp"),
        virtual_stages=virtual_stages,
        act_shape=(args.micro_batch, args.seq_len, args.d_model),
        device=torch.device("cpu"),
    )
    return Schedule(stages, schedule)


def _batches(args, schedule: Schedule, m: int) -> list:
    gen = torch.Generator().manual_seed(0)
    shape = (args.micro_batch, args.seq_len)
    out = []
    for _ in range(m):
        x, y = (
            torch.randint(0, args.vocab, shape, generator=gen),
            torch.randint(0, args.vocab, shape, generator=gen),
        )
        out.append((x if schedule.stage.is_first else None, y if schedule.is_last else None))
    return out


def micro_batch_compute(args, world: MPI.Comm) -> float:
    """Forward + backward of one micro-batch on the slowest stage, no communication: the t
    of the ideal step time (m + p - 1) t."""
    schedule = _stage(args, world, "1f1b")
    stage = schedule.stage
    x, y = _batches(args, schedule, 1)[0]
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
    V = args.virtual_stages
    for m in (p, 2 * p, 4 * p, 8 * p):
        for kind, virtual in (("gpipe", 1), ("1f1b", 1), ("1f1b", V)):
            sched = _stage(args, world, kind, virtual)
            label = f"{kind} interleaved V={virtual}" if virtual > 1 else kind
            batches = _batches(args, sched, m)

            def step(sched=sched, batches=batches):
                sched.run(batches, nullcontext(), lambda i: None)
                sched.stage.module.zero_grad(set_to_none=True)

            for _ in range(args.warmup):
                step()
            sched.meter.reset_peaks()
            measured = statistics.median(
                slowest(world, [timed(world, step) for _ in range(args.iters)])
            )
            peaks = world.allgather(sched.meter.peak)
            totals = world.allgather(sched.meter.total_peak)
            fill = (p - 1) / virtual  # interleaving shrinks the fill and drain V-fold
            ideal, analytic = (m + fill) * t_mb, fill / (m + fill)
            bubble = 1 - m * t_mb / measured
            runs.append(
                {
                    "schedule": kind,
                    "virtual_stages": virtual,
                    "m": m,
                    "p": p,
                    "step_s": measured,
                    "ideal_s": ideal,
                    "bubble_measured": bubble,
                    "bubble_analytic": analytic,
                    "peak_activation_bytes_per_stage": peaks,
                    "peak_bytes_with_buffers_per_stage": totals,
                }
            )
            rows.append(
                [
                    label,
                    m,
                    1000 * measured,
                    1000 * ideal,
                    measured / ideal,
                    f"{100 * bubble:.1f}%",
                    f"{100 * analytic:.1f}%",
                    " / ".join(f"{b / 2**20:.1f}" for b in peaks),
                    " / ".join(f"{b / 2**20:.1f}" for b in totals),
                ]
            )
    print0(
        f"pipeline: {p} stages x {args.layers_per_stage} blocks (d_model {args.d_model}), micro-batch "
        f"{args.micro_batch} x {args.seq_len}; one micro-batch fwd+bwd on the slowest stage "
        f"t = {1000 * t_mb:.1f} ms; ideal step (m + (p - 1) / V) t; medians of {args.iters} steps"
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
                "with message buffers",
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
    """Activation messages stage 0 -> stage 1, interleaved rounds of `args.messages` messages:
    the pipeline's verbs (send_forward / recv_forward: persistent receives posted one ahead),
    TensorComm's plain isend/irecv + wait (the pipeline's path before persistent receives), and
    raw MPI Send/Recv, all three on the same memory."""
    rank = world.Get_rank()
    shape = (args.micro_batch, args.seq_len, args.d_model)
    comm = TensorComm(world, name="pp")
    tensor = torch.randn(shape)
    stage = PipelineStage(
        torch.nn.Identity(),
        comm,
        stage=min(rank, 1),
        num_stages=2,
        act_shape=shape,
        device=torch.device("cpu"),
    )
    n = args.messages

    def stage_round():
        for k in range(n):
            if rank == 0:
                stage.send_forward(tensor)
            elif rank == 1:
                stage.recv_forward(more_coming=k + 1 < n)
                stage.free_input()
        stage.finish_sends()

    stage_round()  # allocates the receive buffers the other two then use as well
    # Where a buffer lies changes shared-memory copy speed by more than the layer under test
    # costs, so all three receive into the stage's pool (two buffers, alternately).
    pool = [r.tensor for r in stage._idle[0]] if rank == 1 else [tensor, tensor]
    raw = [t.numpy() for t in pool]

    def plain_round():
        for k in range(n):
            if rank == 0:
                comm.wait(comm.isend(tensor, 1, 0))
            elif rank == 1:
                comm.wait(comm.irecv(pool[k % 2], 0, 0))

    def raw_round():
        for k in range(n):
            if rank == 0:
                world.Send(raw[0], dest=1, tag=0)
            elif rank == 1:
                world.Recv(raw[k % 2], source=0, tag=0)

    rounds = {"pipeline": stage_round, "plain": plain_round, "raw": raw_round}
    for _ in range(2):
        for fn in rounds.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in rounds}
    for _ in range(args.iters):
        for name, fn in rounds.items():
            times[name].append(timed(world, fn))
    nbytes = tensor.numel() * tensor.element_size()
    gbps = {
        name: nbytes * n / statistics.median(slowest(world, t)) / 1e9 for name, t in times.items()
    }
    result = {
        "message_bytes": nbytes,
        "pipeline_GBps": gbps["pipeline"],
        "plain_GBps": gbps["plain"],
        "raw_GBps": gbps["raw"],
        "ratio": gbps["pipeline"] / gbps["raw"],
        "plain_ratio": gbps["plain"] / gbps["raw"],
        "load_avg": os.getloadavg(),
    }
    print0(
        f"activation send/receive, {nbytes / 2**20:.2f} MiB messages, stage 0 -> 1: pipeline verbs "
        f"(persistent receives) {gbps['pipeline']:.2f} GB/s, plain TensorComm isend/irecv "
        f"{gbps['plain']:.2f} GB/s, raw MPI Send/Recv {gbps['raw']:.2f} GB/s; ratio to raw "
        f"{result['ratio']:.3f} (target >= 0.95), plain {result['plain_ratio']:.3f}; load average "
        f"{result['load_avg'][0]:.1f}"
    )
    return result
