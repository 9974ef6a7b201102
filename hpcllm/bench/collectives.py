"""`python -m hpcllm.bench collectives`: all-gather and reduce-scatter through hpcllm's comm
layer (TensorComm.allgather, reduce_scatter, iallgather_, ireduce_scatter) against raw mpi4py
on NumPy buffers of the same bytes (Allgather, Reduce_scatter_block, Iallgather in place,
Ireduce_scatter_block), interleaved iteration by iteration.

    mpirun -np 2 python -m hpcllm.bench collectives --mb 1 8 64 --iters 20
"""

from __future__ import annotations

import statistics

import numpy as np
import torch
from mpi4py import MPI

from hpcllm.bench.common import ForeignLoad, environment, slowest, table, timed
from hpcllm.comm import TensorComm
from hpcllm.runtime import print0


def add_arguments(parser) -> None:
    parser.add_argument(
        "--mb",
        type=float,
        nargs="+",
        default=[1.0, 8.0, 64.0],
        help="MiB of the whole (gathered / reduced) fp32 buffer (default 1 8 64)",
    )
    parser.add_argument("--iters", type=int, default=20, help="timed iterations (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations (default 3)")


def _pairs(comm: TensorComm, world: MPI.Comm, numel: int) -> dict:
    """(hpcllm, raw) callables of each operation on a whole buffer of `numel` fp32 elements."""
    size = world.Get_size()
    chunk = numel // size
    whole_t, chunk_t = torch.ones(numel), torch.ones(chunk)
    whole_n, chunk_n = np.ones(numel, dtype=np.float32), np.ones(chunk, dtype=np.float32)
    return {
        "allgather": (
            lambda: comm.allgather(chunk_t, whole_t),
            lambda: world.Allgather(chunk_n, whole_n),
        ),
        "reduce_scatter": (
            lambda: comm.reduce_scatter(whole_t, chunk_t),
            lambda: world.Reduce_scatter_block(whole_n, chunk_n),
        ),
        "iallgather_": (
            lambda: comm.iallgather_(whole_t).wait(),
            lambda: world.Iallgather(MPI.IN_PLACE, whole_n).Wait(),
        ),
        "ireduce_scatter": (
            lambda: comm.ireduce_scatter(whole_t, chunk_t).wait(),
            lambda: world.Ireduce_scatter_block(whole_n, chunk_n).Wait(),
        ),
    }


def run(args, world: MPI.Comm) -> dict:
    size = world.Get_size()
    torch.set_num_threads(1)
    comm = TensorComm(world, name="bench")
    results = []
    load = ForeignLoad(world)
    for mb in args.mb:
        numel = int(mb * 2**20) // 4 // size * size
        for op, (ours, raw) in _pairs(comm, world, numel).items():
            times: dict[str, list[float]] = {"hpcllm": [], "raw": []}
            for it in range(args.warmup + args.iters):
                # Alternate which goes first, so a slow spell of the machine hits both.
                order = [("hpcllm", ours), ("raw", raw)][:: 1 if it % 2 else -1]
                for name, fn in order:
                    seconds = timed(world, fn)
                    if it >= args.warmup:
                        times[name].append(seconds)
            ms = {k: 1e3 * statistics.median(slowest(world, v)) for k, v in times.items()}
            results.append(
                {
                    "op": op,
                    "mib": numel * 4 / 2**20,
                    "hpcllm_ms": ms["hpcllm"],
                    "raw_ms": ms["raw"],
                    "ratio": ms["raw"] / ms["hpcllm"],
                }
            )
    foreign = load.share()
    print0(
        f"all-gather and reduce-scatter of fp32 buffers on {size} ranks: hpcllm's TensorComm "
        f"vs raw mpi4py on NumPy; medians of {args.iters} interleaved iterations after "
        f"{args.warmup} warmup, each timed by its slowest rank; other processes used "
        f"{100 * foreign:.0f}% of the CPUs"
    )
    rows = [[r["op"], r["mib"], r["hpcllm_ms"], r["raw_ms"], r["ratio"]] for r in results]
    print0(table(["operation", "MiB", "hpcllm ms", "raw ms", "raw / hpcllm"], rows))
    print0(f"lowest ratio (target >= 0.95): {min(r['ratio'] for r in results):.3f}")
    return {
        "benchmark": "collectives",
        "ranks": size,
        "iters": args.iters,
        "warmup": args.warmup,
        "results": results,
        "foreign_load": foreign,
        "env": environment(),
    }
