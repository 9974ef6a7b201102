"""Data parallelism: gradients averaged over the dp communicator while backward runs.

Parameters are packed, in reverse order (backward produces the last layers'
gradients first), into flat fp32 buckets of about `bucket_mb` MiB. Each
parameter's `.grad` is a view into its bucket, so autograd accumulates straight
into the buffer MPI reduces: no copies in or out. When the last gradient of a
bucket has been accumulated, a hook starts a non-blocking `Iallreduce` on it;
`finish()` waits for all of them before the optimizer step.

Buckets are launched strictly in index order on every rank: MPI requires all
ranks to start their collectives in the same order.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from hpcllm.comm import TensorComm, Work


class _Bucket:
    __slots__ = ("buffer", "params", "pending", "work")

    def __init__(self, buffer: torch.Tensor, params: list[nn.Parameter]):
        self.buffer = buffer
        self.params = params
        self.pending = len(params)
        self.work: Work | None = None


class DataParallel:
    """Bucketed, overlapped gradient averaging for `model` over `comm`.

    Use: `zero_grad()` before a step; set `sync = False` for all but the last
    micro-batch of a step (their gradients only accumulate locally); after the
    last backward, `finish()` returns once every gradient is the dp average.
    """

    def __init__(self, model: nn.Module, comm: TensorComm, bucket_mb: float = 25.0):
        self.comm = comm
        self.sync = True
        self.wait_seconds = 0.0
        params = [p for p in model.parameters() if p.requires_grad]
        if any(p.dtype != torch.float32 for p in params):
            raise ValueError("DataParallel expects fp32 parameters (use autocast for bf16 compute)")
        self.buckets = self._make_buckets(list(reversed(params)), int(bucket_mb * 2**20))
        self._bucket_of: dict[int, _Bucket] = {}
        for bucket in self.buckets:
            offset = 0
            for p in bucket.params:
                p.grad = bucket.buffer[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                self._bucket_of[id(p)] = bucket
                p.register_post_accumulate_grad_hook(self._on_grad_ready)
        self._next_launch = 0

    @staticmethod
    def _make_buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[_Bucket]:
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
        return [
            _Bucket(torch.zeros(sum(p.numel() for p in g), dtype=torch.float32, device=device), g)
            for g in groups
        ]

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
            bucket.work = self.comm.iallreduce_(bucket.buffer)
            self._next_launch += 1

    def finish(self) -> float:
        """Wait for every bucket's all-reduce and average; returns seconds spent waiting."""
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
            bucket.buffer.div_(self.comm.size)
            bucket.pending = len(bucket.params)
            bucket.work = None
        self._next_launch = 0
        return waited
