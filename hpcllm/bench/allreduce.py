"""`python -m hpcllm.bench allreduce`: DataParallel's bucketed gradient all-reduce, driven
through its hooks by a real backward as in training, against one MPI Allreduce of the same
bytes.

    mpirun -np 2 python -m hpcllm.bench allreduce --mb 64 --bucket-mb 25 --iters 20
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from mpi4py import MPI

from hpcllm.bench.common import ClockedComm, ForeignLoad, environment, slowest, table, timed
from hpcllm.model import GPT, ModelConfig
from hpcllm.parallel.data_parallel import DataParallel
from hpcllm.runtime import print0


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


def gradient_model(mb: float) -> GPT:
    """A GPT (d_model 512, vocab 4096) with the number of blocks that brings it nearest `mb` MiB."""
    cfg = ModelConfig(vocab_size=4096, block_size=128, n_layer=1, n_head=8, d_model=512)
    d = cfg.d_model
    fixed = 4 * (
        2 * cfg.vocab_size * d + cfg.block_size * d + 2 * d
    )  # embeddings, head, final norm
    cfg.n_layer = max(1, round((mb * 2**20 - fixed) / (4 * (12 * d * d + 13 * d))))
    return GPT(cfg)


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
    coef = torch.tensor(float(rank + 1))  # every gradient on rank r is r + 1

    def reduce_pieces():
        for piece in raw_pieces:
            world.Allreduce(MPI.IN_PLACE, piece)

    def backward(sync: bool):
        # d loss / d p = coef everywhere: backward is about one pass over the gradients, and
        # the hooks fire parameter by parameter, last layers first, as in training.
        dp.zero_grad()
        dp.sync = sync
        comm.first_launch = None
        loss = torch.stack([(p * coef).sum() for p in params]).sum()
        return lambda: (loss.backward(), dp.finish() if sync else None)

    times: dict[str, list[float]] = {
        k: [] for k in ("raw", "pieces", "comm", "added", "bucketed", "backward")
    }
    load = ForeignLoad(world)
    for it in range(args.warmup + args.iters):
        raw_s = timed(world, lambda: world.Allreduce(MPI.IN_PLACE, raw))
        pieces_s = timed(world, reduce_pieces)
        backward_s = timed(world, backward(sync=False))  # the compute inside the bucketed time
        bucketed_s = timed(world, backward(sync=True))
        assert comm.first_launch is not None  # the synced backward launched its buckets
        window_s = time.perf_counter() - comm.first_launch
        if it >= args.warmup:
            for key, t in (
                ("raw", raw_s),
                ("pieces", pieces_s),
                ("comm", window_s),
                ("added", bucketed_s - backward_s),
                ("bucketed", bucketed_s),
                ("backward", backward_s),
            ):
                times[key].append(t)
    foreign = load.share()
    if not all(torch.all(b.buffer == (size + 1) / 2) for b in dp.buckets):
        raise RuntimeError(
            f"rank {rank}: DataParallel's average is wrong (expected {(size + 1) / 2})"
        )

    ms = {k: 1e3 * statistics.median(slowest(world, v)) for k, v in times.items()}
    # Bus bandwidth as nccl-tests define it: algorithm bandwidth (bytes / time) x 2 (n - 1) / n,
    # what each rank sends in a bandwidth-optimal all-reduce; comparable across rank counts.
    busbw = {k: 2 * (size - 1) / size * nbytes / ms[k] / 1e6 for k in ms if k != "backward"}
    labels = {
        "raw": "raw: one MPI Allreduce, all bytes",
        "pieces": "raw: one MPI Allreduce per bucket",
        "comm": "bucketed: first launch -> finish()",
        "added": "bucketed: time added to backward",
        "bucketed": "bucketed: backward + finish()",
        "backward": "backward alone, no reduction",
    }
    rows = [
        [labels[k], ms[k], "-" if k == "backward" else nbytes / ms[k] / 1e6, busbw.get(k, "-")]
        for k in labels
    ]
    ratios = {k: ms["raw"] / ms[k] for k in ("comm", "added", "bucketed")}
    print0(
        f"all-reduce of {nbytes / 2**20:.1f} MiB of fp32 gradients on {size} ranks: GPT of "
        f"{model.cfg.n_layer} blocks, {len(params)} tensors, {len(dp.buckets)} bucket(s) of <= "
        f"{args.bucket_mb} MiB; medians of {args.iters} interleaved iterations after {args.warmup} "
        f"warmup; other processes used {100 * foreign:.0f}% of the CPUs"
    )
    print0(table(["path", "ms", "algbw GB/s", "busbw GB/s"], rows))
    print0(
        f"bucketed / raw bandwidth (target >= 0.95): {ratios['comm']:.3f} over the communication "
        f"window, {ratios['added']:.3f} over the time added to backward, "
        f"{ratios['bucketed']:.3f} over backward + finish()"
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
        "busbw_GBps": busbw,
        "ratio_vs_raw": ratios,
        "foreign_load": foreign,
        "env": environment(),
    }
