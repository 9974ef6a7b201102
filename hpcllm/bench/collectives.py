"""`python -m hpcllm.bench collectives`: all-gather and reduce-scatter through hpcllm's comm
layer (TensorComm.allgather, reduce_scatter, iallgather_, ireduce_scatter) against raw mpi4py
on NumPy buffers of the same bytes (Allgather, Reduce_scatter_block, Iallgather in place,
Ireduce_scatter_block), interleaved iteration by iteration. The raw calls run on the torch
tensors' own memory and on NumPy arrays (which get transparent huge pages; see _variants).

    mpirun -np 2 python -m hpcllm.bench collectives --mb 1 8 64 --iters 20
    mpirun -np 2 python -m hpcllm.bench collectives --device cuda   # CUDA tensors vs host MPI
    THP_MEM_ALLOC_ENABLE=1 mpirun -x THP_MEM_ALLOC_ENABLE -np 2 python -m hpcllm.bench collectives
"""

from __future__ import annotations

import os
import statistics

import numpy as np
import torch
from mpi4py import MPI

from hpcllm.bench.common import ForeignLoad, environment, slowest, table, timed
from hpcllm.distributed.comm import TensorComm, detect_cuda_aware
from hpcllm.runtime.spmd import print0


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
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where hpcllm's tensors live (default cpu); with cuda they go through MPI directly "
        "where it is CUDA-aware, staged through pinned host memory where not (parallel.cuda_aware "
        "auto), and the raw calls stay on host memory: the ratio is the cost of the GPU path",
    )


def _variants(comm: TensorComm, world: MPI.Comm, numel: int, device: str = "cpu") -> dict:
    """Per operation on a whole buffer of `numel` fp32 elements: hpcllm on torch tensors, raw
    mpi4py on those tensors' memory (`.numpy()` views), raw mpi4py on NumPy's own arrays.

    The two raw variants differ in memory only: NumPy asks the kernel for transparent huge
    pages on large arrays (madvise), torch's CPU allocator does not unless the environment
    says THP_MEM_ALLOC_ENABLE=1, and MPI's shared-memory copies of large messages run at
    about half the speed on 4 KiB pages. With `device` cuda hpcllm's tensors are on the GPU
    (each call ends with the device synchronised) and the raw calls on host memory."""
    size = world.Get_size()
    chunk = numel // size
    whole_h, chunk_h = torch.ones(numel), torch.ones(chunk)
    whole_v, chunk_v = whole_h.numpy(), chunk_h.numpy()
    whole_t, chunk_t = whole_h.to(device), chunk_h.to(device)

    def synced(fn):  # a GPU call is done when the device is, not when the host returns
        if device != "cuda":
            return fn

        def call():
            fn()
            torch.cuda.synchronize()

        return call

    whole_n, chunk_n = np.ones(numel, dtype=np.float32), np.ones(chunk, dtype=np.float32)
    return {
        "allgather": {
            "hpcllm": synced(lambda: comm.allgather(chunk_t, whole_t)),
            "raw torch mem": lambda: world.Allgather(chunk_v, whole_v),
            "raw numpy": lambda: world.Allgather(chunk_n, whole_n),
        },
        "reduce_scatter": {
            "hpcllm": synced(lambda: comm.reduce_scatter(whole_t, chunk_t)),
            "raw torch mem": lambda: world.Reduce_scatter_block(whole_v, chunk_v),
            "raw numpy": lambda: world.Reduce_scatter_block(whole_n, chunk_n),
        },
        "iallgather_": {
            "hpcllm": synced(lambda: comm.iallgather_(whole_t).wait()),
            "raw torch mem": lambda: world.Iallgather(MPI.IN_PLACE, whole_v).Wait(),
            "raw numpy": lambda: world.Iallgather(MPI.IN_PLACE, whole_n).Wait(),
        },
        "ireduce_scatter": {
            "hpcllm": synced(lambda: comm.ireduce_scatter(whole_t, chunk_t).wait()),
            "raw torch mem": lambda: world.Ireduce_scatter_block(whole_v, chunk_v).Wait(),
            "raw numpy": lambda: world.Ireduce_scatter_block(whole_n, chunk_n).Wait(),
        },
    }


def run(args, world: MPI.Comm) -> dict:
    size = world.Get_size()
    torch.set_num_threads(1)
    cuda_aware = False
    if args.device == "cuda":
        torch.cuda.set_device(world.Get_rank() % torch.cuda.device_count())
        cuda_aware = detect_cuda_aware("auto")
    comm = TensorComm(world, cuda_aware=cuda_aware, name="bench")
    results = []
    load = ForeignLoad(world)
    for mb in args.mb:
        numel = int(mb * 2**20) // 4 // size * size
        for op, fns in _variants(comm, world, numel, args.device).items():
            times: dict[str, list[float]] = {name: [] for name in fns}
            for it in range(args.warmup + args.iters):
                # Rotate which goes first, so a slow spell of the machine hits all alike.
                names = list(fns)[it % len(fns) :] + list(fns)[: it % len(fns)]
                for name in names:
                    # An untimed call first, so each variant is timed with its own buffers
                    # in cache whatever ran before it (two of them share memory).
                    fns[name]()
                    seconds = timed(world, fns[name])
                    if it >= args.warmup:
                        times[name].append(seconds)
            ms = {k: 1e3 * statistics.median(slowest(world, v)) for k, v in times.items()}
            results.append(
                {
                    "op": op,
                    "mib": numel * 4 / 2**20,
                    **{f"{k}_ms": v for k, v in ms.items()},
                    "ratio_same_memory": ms["raw torch mem"] / ms["hpcllm"],
                    "ratio_numpy": ms["raw numpy"] / ms["hpcllm"],
                }
            )
    foreign = load.share()
    where = "host" if args.device == "cpu" else f"CUDA ({'CUDA-aware' if cuda_aware else 'staged'})"
    print0(
        f"all-gather and reduce-scatter of fp32 buffers on {size} ranks: hpcllm's TensorComm "
        f"on {where} tensors vs raw mpi4py on NumPy; medians of {args.iters} interleaved iterations after "
        f"{args.warmup} warmup, each timed by its slowest rank; other processes used "
        f"{100 * foreign:.0f}% of the CPUs"
    )
    columns = ["mib", "hpcllm_ms", "raw torch mem_ms", "raw numpy_ms"]
    columns += ["ratio_same_memory", "ratio_numpy"]
    rows = [[r["op"], *(r[k] for k in columns)] for r in results]
    headers = ["operation", "MiB", "hpcllm ms", "raw ms, torch mem", "raw ms, numpy"]
    print0(table([*headers, "raw/hpcllm same mem", "raw numpy/hpcllm"], rows))
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    print0(
        f"lowest ratio (target >= 0.95): {min(r['ratio_same_memory'] for r in results):.3f} "
        f"on the same memory, {min(r['ratio_numpy'] for r in results):.3f} against NumPy's "
        f"arrays (THP_MEM_ALLOC_ENABLE={thp})"
    )
    return {
        "benchmark": "collectives",
        "ranks": size,
        "device": args.device,
        "cuda_aware": cuda_aware,
        "iters": args.iters,
        "warmup": args.warmup,
        "results": results,
        "foreign_load": foreign,
        "env": environment(),
    }
