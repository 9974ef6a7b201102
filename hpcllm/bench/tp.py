"""`python -m hpcllm.bench tp`: tensor parallelism's cost on 2 ranks. The same model and
global batch as dp 2 x tp 1 and as tp 2 (one micro-batch of twice the sequences), in
alternating rounds: ms per step, the share of it spent in the tp all-reduces (blocking, so
their time is the tp communicator's wait time), and the bytes they carried beside the
planner's prediction (`hpcllm.planner`).

    mpirun -np 2 python -m hpcllm.bench tp --steps 10 --warmup 2 --rounds 4
"""

from __future__ import annotations

import statistics
import time

from mpi4py import MPI

from hpcllm.bench.common import ForeignLoad, environment, slowest, table
from hpcllm.bench.layouts import (
    CountingComm,
    add_model_arguments,
    bench_config,
    build,
    random_batches,
    take_step,
)
from hpcllm.config import Config
from hpcllm.planner import make_plan
from hpcllm.runtime.spmd import print0


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per round (default 2)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds tp 1, tp 2, ... (default 4)")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per dp rank at tp 1")
    add_model_arguments(parser, seq_len=128, n_layer=4, n_head=4, d_model=256, vocab=4096)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")


def layout(args, tp: int) -> Config:
    import torch

    torch.set_num_threads(args.threads)
    # The global batch stays 2 x micro-batch: two dp ranks, or one tp group with all of it.
    return bench_config(args, micro_batch=args.micro_batch * tp, tp=tp)


def run(args, world: MPI.Comm) -> dict:
    if world.Get_size() != 2:
        raise ValueError("run `python -m hpcllm.bench tp` under mpirun -np 2")
    times: dict[int, list[float]] = {1: [], 2: []}
    tp_share: dict[int, list[float]] = {1: [], 2: []}
    measured: dict[int, int] = {}
    rounds = []
    for r in range(max(2, args.rounds)):
        tp = 1 + r % 2
        rank = build(layout(args, tp), world, CountingComm)
        tp_comm = rank.comms["tp"]
        assert isinstance(tp_comm, CountingComm)
        for i in range(args.warmup):
            take_step(rank, random_batches(rank, i))
        load = ForeignLoad(world)
        seconds, in_tp, before = [], [], tp_comm.payload
        for i in range(args.warmup, args.warmup + args.steps):
            batches = random_batches(rank, i)
            waited = tp_comm.wait_seconds
            start = time.perf_counter()
            take_step(rank, batches)
            seconds.append(time.perf_counter() - start)
            in_tp.append(tp_comm.wait_seconds - waited)
        measured[tp] = (tp_comm.payload - before) // args.steps
        foreign = load.share()
        seconds = slowest(world, seconds)
        times[tp] += seconds
        tp_share[tp] += [w / s for w, s in zip(slowest(world, in_tp), seconds, strict=True)]
        rank.grid.free()
        rounds.append(
            {"tp": tp, "median_ms": 1e3 * statistics.median(seconds), "foreign_load": foreign}
        )
        print0(
            f"round {r + 1}: tp {tp} median {rounds[-1]['median_ms']:.1f} ms/step, other processes used {100 * foreign:.0f}% of the CPUs"
        )

    result: dict = {"benchmark": "tp", "ranks": 2, "rounds": rounds, "env": environment()}
    rows = []
    for tp in (1, 2):
        stage = make_plan(layout(args, tp), 2).stages[0]
        ms = 1e3 * statistics.median(times[tp])
        share = statistics.median(tp_share[tp])
        result[f"tp{tp}"] = {
            "median_ms": ms,
            "tp_share": share,
            "tp_payload_measured": measured[tp],
            "tp_payload_planned": stage.payload["tp"],
            "tp_sent_planned": stage.sent["tp"],
        }
        rows.append(
            [
                f"dp {3 - tp} x tp {tp}",
                ms,
                f"{100 * share:.1f}%",
                measured[tp] / 2**20,
                stage.payload["tp"] / 2**20,
                stage.sent["tp"] / 2**20,
            ]
        )
    print0(
        f"tp 2 vs dp 2 on 2 ranks x {args.threads} thread(s): GPT {args.n_layer} x {args.d_model}, "
        f"vocab {args.vocab}, global batch {2 * args.micro_batch} x {args.seq_len}; medians of "
        f"{args.steps} steps per round after {args.warmup} warmup"
    )
    print0(
        table(
            [
                "layout",
                "ms/step",
                "in tp all-reduce",
                "tp MiB measured",
                "tp MiB planned",
                "planned sent MiB",
            ],
            rows,
        )
    )
    result["tp2_over_tp1_time"] = result["tp2"]["median_ms"] / result["tp1"]["median_ms"]
    print0(f"tp 2 / tp 1 step time: {result['tp2_over_tp1_time']:.3f}")
    return result
