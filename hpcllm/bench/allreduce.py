"""`python -m hpcllm.bench allreduce`: DataParallel's bucketed gradient all-reduce, driven
through its hooks by a real backward as in training, in each of its schedules (overlap off,
on from the hooks, on from the communication thread, auto's choice, and main's path), against
backward followed by blocking MPI Allreduces of the same buckets, all in the same run.

    mpirun -np 2 python -m hpcllm.bench allreduce --mb 64 --bucket-mb 25 --iters 20
"""

from __future__ import annotations

import resource
import statistics
import time
from functools import partial

import numpy as np
import torch
from mpi4py import MPI

from hpcllm.bench.common import ClockedComm, ForeignLoad, environment, slowest, table, timed
from hpcllm.distributed.data_parallel import AUTO_PLAN, DataParallel
from hpcllm.models.gpt import GPT, ModelConfig
from hpcllm.runtime.spmd import keep_large_allocations, print0


def add_arguments(parser) -> None:
    parser.add_argument(
        "--mb", type=float, default=64.0, help="MiB of gradients in all, >= 28 (default 64)"
    )
    parser.add_argument(
        "--bucket-mb", type=float, default=25.0, help="DataParallel bucket size, MiB (default 25)"
    )
    parser.add_argument("--iters", type=int, default=20, help="timed iterations (default 20)")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed iterations first (default 3)"
    )
    parser.add_argument(
        "--comm-thread",
        action="store_true",
        help="overlap auto compares off with the communication thread (parallel.comm_thread)",
    )


def gradient_model(mb: float) -> GPT:
    """A GPT (d_model 512, vocab 4096) with the number of blocks that brings it nearest `mb` MiB."""
    cfg = ModelConfig(vocab_size=4096, block_size=128, n_layer=1, n_head=8, d_model=512)
    d = cfg.d_model
    fixed = 4 * (
        2 * cfg.vocab_size * d + cfg.block_size * d + 2 * d
    )  # embeddings, head, final norm
    cfg.n_layer = max(1, round((mb * 2**20 - fixed) / (4 * (12 * d * d + 13 * d))))
    return GPT(cfg)


# The scheduling paths timed against each other: (key, parallel.overlap, comm_thread, label).
PATHS = [
    ("main", "on", False, "backward + finish(), main's path: hooks, then / dp in finish"),
    ("off", "off", False, "backward + finish(), overlap off: bucket after bucket"),
    ("hooks", "on", False, "backward + finish(), overlap on: hooks launch"),
    ("thread", "on", True, "backward + finish(), overlap on: communication thread"),
]


def _faulted(world: MPI.Comm, fn) -> tuple[float, int]:
    """(seconds, minor page faults) of `fn()` on this rank, all ranks starting together: fresh
    pages touched, e.g. temporaries that glibc maps anew on every call."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds = timed(world, fn)
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _then(first, second) -> None:
    first()
    second()


def run(args, world: MPI.Comm) -> dict:
    rank, size = world.Get_rank(), world.Get_size()
    torch.set_num_threads(1)
    model = gradient_model(args.mb)
    params = list(model.parameters())
    comm = ClockedComm(world)
    dp = DataParallel(model, comm, args.bucket_mb)
    nbytes = 4 * sum(b.buffer.numel() for b in dp.buckets)
    raw = np.zeros(nbytes // 4, dtype=np.float32)
    # The same bytes cut like the buckets: tells the cost of the sizes from that of the path.
    raw_pieces = np.split(raw, np.cumsum([b.buffer.numel() for b in dp.buckets])[:-1])

    def reduce_pieces():
        for piece in raw_pieces:
            world.Allreduce(MPI.IN_PLACE, piece)

    def backward(sync: bool, folded: bool = True):
        # d loss / d p = coef everywhere: backward is about one pass over the gradients, and
        # the hooks fire parameter by parameter, last layers first, as in training. Every
        # gradient on rank r is r + 1, divided by the dp size in the loss as train_step does
        # (`folded`), or in finish() as main did.
        coef = torch.tensor((rank + 1) / size if folded else float(rank + 1))
        dp.zero_grad()
        dp.sync = sync
        comm.first_launch = None
        loss = torch.stack([(p * coef).sum() for p in params]).sum()
        if not sync:
            return loss.backward
        return lambda: (loss.backward(), dp.finish(average=not folded))

    def check(what: str) -> None:
        if not all(torch.all(b.buffer == (size + 1) / 2) for b in dp.buckets):
            raise RuntimeError(
                f"rank {rank}: {what}: the average is wrong (expected {(size + 1) / 2})"
            )

    # parallel.overlap auto, as in training: its trial steps first, then its choice is timed.
    dp.set_overlap("auto", args.comm_thread)
    for _ in AUTO_PLAN:
        backward(sync=True)()
    check("overlap auto")
    choice = dp.choice
    assert choice is not None  # decided by the last trial step
    paths = [*PATHS, ("auto", choice, args.comm_thread, f"overlap auto's choice ({choice})")]

    keys = ["raw", "pieces", "backward", "baseline", *(k for k, *_ in paths)]
    times: dict[str, list[float]] = {k: [] for k in keys}
    windows: dict[str, list[float]] = {k: [] for k, *_ in paths}
    load = ForeignLoad(world)
    faults: dict[str, list[float]] = {k: [] for k in keys}
    for it in range(args.warmup + args.iters):
        t = {
            "raw": _faulted(world, lambda: world.Allreduce(MPI.IN_PLACE, raw)),
            "pieces": _faulted(world, reduce_pieces),
            "backward": _faulted(world, backward(sync=False)),  # the compute inside each path
            "baseline": _faulted(world, partial(_then, backward(sync=False), reduce_pieces)),
        }
        for key, overlap, comm_thread, _ in paths:
            dp.set_overlap(overlap, comm_thread)
            t[key] = _faulted(world, backward(sync=True, folded=key != "main"))
            assert comm.first_launch is not None  # the synced backward launched its buckets
            windows[key].append(time.perf_counter() - comm.first_launch)
            check(key)
        if it >= args.warmup:
            for key, (seconds, faulted) in t.items():
                times[key].append(seconds)
                faults[key].append(faulted)
    foreign = load.share()
    dp.close()
    malloc_kept = keep_large_allocations()  # set at start-up by spmd_main unless turned off

    ms = {k: 1e3 * statistics.median(slowest(world, v)) for k, v in times.items()}
    faults_per_call = {k: statistics.median(slowest(world, v)) for k, v in faults.items()}
    window_ms = {k: 1e3 * statistics.median(slowest(world, v)) for k, v in windows.items()}
    # Bus bandwidth as nccl-tests define it: algorithm bandwidth (bytes / time) x 2 (n - 1) / n,
    # what each rank sends in a bandwidth-optimal all-reduce; comparable across rank counts.
    busbw = {k: 2 * (size - 1) / size * nbytes / ms[k] / 1e6 for k in ("raw", "pieces")}
    # How much of the communication (the blocking per-bucket time) a path hides behind backward.
    hidden = {k: 1 - (ms[k] - ms["backward"]) / ms["pieces"] for k in ("baseline", *windows)}
    labels = {
        "raw": "raw: one MPI Allreduce, all bytes",
        "pieces": "raw: one MPI Allreduce per bucket",
        "backward": "backward alone, no reduction",
        "baseline": "backward, then blocking Allreduce per bucket",
        **{k: label for k, _, _, label in paths},
    }
    rows = [
        [
            labels[k],
            ms[k],
            window_ms.get(k, "-"),
            busbw.get(k, "-"),
            ms[k] / ms["baseline"] if k in hidden else "-",
            hidden.get(k, "-"),
            int(faults_per_call[k]),
        ]
        for k in keys
    ]
    print0(
        f"all-reduce of {nbytes / 2**20:.1f} MiB of fp32 gradients on {size} ranks: GPT of "
        f"{model.cfg.n_layer} blocks, {len(params)} tensors, {len(dp.buckets)} bucket(s) of <= "
        f"{args.bucket_mb} MiB; medians of {args.iters} interleaved iterations after {args.warmup} "
        f"warmup; other processes used {100 * foreign:.0f}% of the CPUs; glibc keeps freed "
        f"memory <= 32 MiB (HPCLLM_MALLOPT=0 turns it off): {malloc_kept}"
    )
    print0(
        table(
            [
                "path",
                "ms",
                "first launch->end ms",
                "busbw GB/s",
                "/ baseline",
                "comm hidden",
                "page faults",
            ],
            rows,
        )
    )
    print0(
        "targets: every path <= baseline (backward, then blocking per-bucket Allreduce); with a "
        "core free for communication, comm hidden >= 0.5. overlap auto chose "
        f"'{choice}'{' (communication thread)' if args.comm_thread and choice == 'on' else ''}"
    )
    return {
        "benchmark": "allreduce",
        "ranks": size,
        "bytes": nbytes,
        "buckets": len(dp.buckets),
        "bucket_mb": args.bucket_mb,
        "tensors": len(params),
        "iters": args.iters,
        "warmup": args.warmup,
        "median_ms": ms,
        "window_ms": window_ms,
        "busbw_GBps": busbw,
        "comm_hidden": hidden,
        "minor_faults": faults_per_call,
        "auto_choice": choice,
        "foreign_load": foreign,
        "malloc_kept": malloc_kept,
        "env": environment(),
    }
