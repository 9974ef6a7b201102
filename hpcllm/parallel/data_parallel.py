"""Data parallelism: gradients averaged over the dp communicator while backward runs.

Parameters are packed, in reverse order (backward produces the last layers'
gradients first), into flat fp32 buckets of about `bucket_mb` MiB. Each
parameter's `.grad` is a view into its bucket, so autograd accumulates straight
into the buffer MPI reduces: no copies in or out. When the last gradient of a
bucket has been accumulated, a hook starts a non-blocking `Iallreduce` on it;
`finish()` waits for all of them before the optimizer step.

Buckets are launched strictly in index order on every rank: MPI requires all
ranks to start their collectives in the same order.

With `shard=True` (ZeRO-1, `parallel.zero 1`) every bucket is padded to a multiple of
the dp size and dp rank r owns the r-th contiguous 1/dp of it. A non-blocking
`Ireduce_scatter_block` replaces the all-reduce, launched from the same hooks, so each
rank ends up with the average of its own shard only (`Bucket.grad_shard`). The
parameters become views into one flat fp32 buffer per bucket with the same layout:
the optimizer (`hpcllm.parallel.zero.ShardedAdamW`) updates this rank's range of it and
`gather_params()` all-gathers the ranges, so every rank has the whole model again.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from hpcllm.comm import TensorComm, Work

if TYPE_CHECKING:
    from hpcllm.parallel.hierarchical import HierarchicalAllreduce


class Bucket:
    """Parameters whose gradients are reduced together: `buffer` holds their gradients
    back to back (`offsets[i]` is where params[i] starts), padded under ZeRO-1."""

    __slots__ = ("buffer", "grad_shard", "offsets", "param_buffer", "params", "pending", "work")

    def __init__(self, buffer: torch.Tensor, params: list[nn.Parameter]):
        self.buffer = buffer
        self.params = params
        self.offsets = [0]
        for p in params[:-1]:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.pending = len(params)
        self.work: Work | None = None
        # ZeRO-1 only: the parameters' flat buffer, and this rank's averaged gradient shard.
        self.param_buffer: torch.Tensor | None = None
        self.grad_shard: torch.Tensor | None = None

    def shard_range(self, rank: int, size: int) -> tuple[int, int]:
        """The elements [start, stop) of the (padded) buffer that dp rank `rank` owns."""
        n = self.buffer.numel() // size
        return rank * n, (rank + 1) * n


class DataParallel:
    """Bucketed, overlapped gradient averaging for `model` over `comm`.

    Use: `zero_grad()` before a step; set `sync = False` for all but the last
    micro-batch of a step (their gradients only accumulate locally); after the
    last backward, `finish()` returns once every gradient is the dp average.
    With `hierarchical` (hpcllm.parallel.hierarchical, parallel.allreduce) buckets are summed
    in two levels, node then across nodes, and padded to a multiple of the ranks per node.
    """

    def __init__(
        self,
        model: nn.Module,
        comm: TensorComm,
        bucket_mb: float = 25.0,
        shard: bool = False,
        hierarchical: HierarchicalAllreduce | None = None,
    ):
        if shard and hierarchical is not None:
            raise ValueError("ZeRO-1 reduce-scatters its buckets: no hierarchical all-reduce")
        self.comm = comm
        self.shard = shard
        self.hierarchical = hierarchical
        self.sync = True
        self.wait_seconds = 0.0
        params = [p for p in model.parameters() if p.requires_grad]
        if any(p.dtype != torch.float32 for p in params):
            raise ValueError("DataParallel expects fp32 parameters (use autocast for bf16 compute)")
        self.buckets = self._make_buckets(
            list(reversed(params)),
            int(bucket_mb * 2**20),
            comm.size if shard else hierarchical.multiple if hierarchical else 1,
        )
        self._bucket_of: dict[int, Bucket] = {}
        for bucket in self.buckets:
            if shard:
                bucket.param_buffer = torch.zeros_like(bucket.buffer)
                start, stop = bucket.shard_range(comm.rank, comm.size)
                bucket.grad_shard = torch.zeros_like(bucket.buffer[start:stop])
            for p, offset in zip(bucket.params, bucket.offsets, strict=True):
                p.grad = bucket.buffer[offset : offset + p.numel()].view_as(p)
                if bucket.param_buffer is not None:
                    view = bucket.param_buffer[offset : offset + p.numel()].view_as(p)
                    view.copy_(p.detach())
                    p.data = view
                self._bucket_of[id(p)] = bucket
                p.register_post_accumulate_grad_hook(self._on_grad_ready)
        self._next_launch = 0

    @staticmethod
    def _make_buckets(params: list[nn.Parameter], bucket_bytes: int, multiple: int) -> list[Bucket]:
        groups: list[list[nn.Parameter]] = [[]]
        size = 0
        for p in params:
            # A parameter larger than a bucket gets a bucket of its own.
            if groups[-1] and size + p.numel() * 4 > bucket_bytes:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += p.numel() * 4
        device = params[0].device
        buckets = []
        for g in groups:
            numel = -(-sum(p.numel() for p in g) // multiple) * multiple  # padded to split evenly
            buckets.append(Bucket(torch.zeros(numel, dtype=torch.float32, device=device), g))
        return buckets

    def zero_grad(self) -> None:
        for bucket in self.buckets:
            bucket.buffer.zero_()

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if not self.sync:
            return
        bucket = self._bucket_of[id(param)]
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch_ready()
        # Open MPI progresses non-blocking collectives only inside MPI calls: poke
        # the ones in flight so they advance while backward computes.
        for b in self.buckets[: self._next_launch]:
            if b.work is not None:
                b.work.test()

    def _launch_ready(self, force: bool = False) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if bucket.pending and not force:
                return
            bucket.work = self._start_reduction(bucket)
            self._next_launch += 1

    def _start_reduction(self, bucket: Bucket) -> Work:
        """Start summing `bucket` over dp: the whole buffer, or only this rank's shard of it
        under ZeRO-1. The one place a bucket's reduction is chosen."""
        if bucket.grad_shard is not None:
            return self.comm.ireduce_scatter(bucket.buffer, bucket.grad_shard)
        if self.hierarchical is not None:
            return self.hierarchical.start(bucket.buffer)
        return self.comm.iallreduce_(bucket.buffer)

    def finish(self) -> float:
        """Wait for every bucket's all-reduce (reduce-scatter under ZeRO-1) and average;
        returns seconds spent waiting."""
        # Buckets whose parameters got no gradient this step (unused parameters)
        # never became ready through hooks; reduce them now, still in order.
        self._launch_ready(force=True)
        start = time.perf_counter()
        for bucket in self.buckets:
            assert bucket.work is not None  # every bucket was launched just above
            bucket.work.wait()
        waited = time.perf_counter() - start
        self.wait_seconds += waited
        for bucket in self.buckets:
            (bucket.buffer if bucket.grad_shard is None else bucket.grad_shard).div_(self.comm.size)
            bucket.pending = len(bucket.params)
            bucket.work = None
        self._next_launch = 0
        return waited

    def grad_shards(self) -> list[torch.Tensor]:
        """This rank's part of the averaged gradient after finish(): every gradient under
        plain dp, only its own shard of each bucket under ZeRO-1 (where the parameters'
        `.grad` then hold this rank's local, unreduced sums)."""
        if not self.shard:
            return [p.grad for b in self.buckets for p in b.params if p.grad is not None]
        return [b.grad_shard for b in self.buckets if b.grad_shard is not None]

    def grad_pieces(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """ZeRO-1: (parameter, the run of its averaged gradient in this rank's shards), for
        sums that must know whose elements they add (a norm counting each parameter once)."""
        pieces = []
        for b in self.buckets:
            if b.grad_shard is None:
                continue
            lo, hi = b.shard_range(self.comm.rank, self.comm.size)
            for p, offset in zip(b.params, b.offsets, strict=True):
                start, stop = max(lo, offset), min(hi, offset + p.numel())
                if start < stop:
                    pieces.append((p, b.grad_shard[start - lo : stop - lo]))
        return pieces

    def gather_params(self) -> None:
        """ZeRO-1: every rank's updated range of the parameters, all-gathered over dp."""
        works = [
            self.comm.iallgather_(b.param_buffer)
            for b in self.buckets
            if b.param_buffer is not None
        ]
        start = time.perf_counter()
        for work in works:
            work.wait()
        self.wait_seconds += time.perf_counter() - start
