"""Data parallelism: gradients averaged over the dp communicator while backward runs.

Parameters are packed, in reverse order (backward produces the last layers'
gradients first), into flat fp32 buckets of about `bucket_mb` MiB. Each
parameter's `.grad` is a view into its bucket, so autograd accumulates straight
into the buffer MPI reduces: no copies in or out. When the last gradient of a
bucket has been accumulated, a hook starts a non-blocking `Iallreduce` on it;
`finish()` waits for all of them before the optimizer step.

Buckets are launched strictly in index order on every rank: MPI requires all
ranks to start their collectives in the same order.

Scheduling (`overlap`, the config's `parallel.overlap`): 'on' starts each bucket's reduction
as soon as it is ready, 'off' reduces the buckets one after another once backward is done
(nothing runs beside backward), and 'auto' times both on the first steps and keeps the faster,
the same choice on every dp rank. With `comm_thread`, 'on' hands ready buckets to a
communication thread that owns the MPI calls of the reduction (Horovod's background thread):
the gradient hook only enqueues, so on a GPU the autograd thread never waits for the device.
Every mode reduces the same buffers with the same collective, so the sums are bit-identical.

With `shard=True` (ZeRO-1, `parallel.zero 1`) every bucket is padded to a multiple of
the dp size and dp rank r owns the r-th contiguous 1/dp of it. A non-blocking
`Ireduce_scatter_block` replaces the all-reduce, launched from the same hooks, so each
rank ends up with the average of its own shard only (`Bucket.grad_shard`). The
parameters become views into one flat fp32 buffer per bucket with the same layout:
the optimizer (`hpcllm.optim.zero.ShardedAdamW`) updates this rank's range of it and
`gather_params()` all-gathers the ranges, so every rank has the whole model again.

With a `compressor` (`parallel.grad_compression`, hpcllm/distributed/compression.py) a bucket's
reduction is its compressed one instead; it leaves the sum in the buffer all the same (under
ZeRO-1, this rank's shard of it in `grad_shard`: bf16/fp16 reduce-scatter, PowerSGD
reconstructs the whole sum on every rank and keeps the shard). With `hierarchical` (parallel.allreduce) the
reduction has two levels, node then across nodes, in either form; compression then applies
to its cross-node phase (hpcllm/distributed/hierarchical.py states the policy).
`wire_bytes` counts what this rank has sent for gradient reduction, from the message sizes
and each algorithm's traffic.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from mpi4py import MPI

from hpcllm.config import OVERLAP_MODES
from hpcllm.distributed.comm import Pending, TensorComm
from hpcllm.distributed.compression import (
    Compressor,
    Reduction,
    allreduce_wire_bytes,
    reduce_scatter_wire_bytes,
)
from hpcllm.distributed.tied import TiedGradients, shared_weight
from hpcllm.runtime.watchdog import WATCHDOG

# parallel.overlap auto: the modes of its first steps. The first step warms up (allocations,
# first touches) and is not counted; then off and on take turns, two steps each, so a slow
# minute on a shared machine does not fall on one mode only.
AUTO_PLAN = ("on",) + ("off", "off", "on", "on") * 2
# How long the communication thread sleeps between MPI progress calls while reductions are
# in flight and no new bucket is queued (a new bucket wakes it at once). Open MPI advances
# non-blocking collectives only inside MPI calls; shorter polls steal more of the CPU.
_POLL_S = 2e-4

if TYPE_CHECKING:
    from hpcllm.distributed.hierarchical import HierarchicalAllreduce


class _Done:
    """A reduction that completed when it was started (the blocking calls of overlap off)."""

    def test(self) -> bool:
        return True

    def wait(self) -> None:
        return None


DONE = _Done()


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
        self.work: Pending | None = None
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
    With `hierarchical` (hpcllm.distributed.hierarchical, parallel.allreduce) buckets are summed
    in two levels, node then across nodes, and padded to a multiple of the ranks per node
    (of the dp size under ZeRO-1, as without it).
    """

    def __init__(
        self,
        model: nn.Module,
        comm: TensorComm,
        bucket_mb: float = 25.0,
        shard: bool = False,
        overlap: str = "on",
        comm_thread: bool = False,
        log: Callable[[str], None] | None = None,
        hierarchical: HierarchicalAllreduce | None = None,
    ):
        self.comm = comm
        self.shard = shard
        self.hierarchical = hierarchical
        self.sync = True
        self.wait_seconds = 0.0
        self.wire_bytes = 0
        self.compressor: Compressor | None = None  # set by compression.build's caller
        # pp x tied embeddings: the first and last stage's sum of the shared weight's gradient
        # (hpcllm/distributed/tied.py), set by the caller; train_step runs it after finish().
        self.tied: TiedGradients | None = None
        self._log = log or (lambda message: None)
        self._thread: _CommThread | None = None
        params = [p for p in model.parameters() if p.requires_grad]
        if any(p.dtype != torch.float32 for p in params):
            raise ValueError("DataParallel expects fp32 parameters (use autocast for bf16 compute)")
        self.buckets = self._make_buckets(
            list(reversed(params)),
            int(bucket_mb * 2**20),
            comm.size if shard else hierarchical.multiple if hierarchical else 1,
            alone=shared_weight(model),
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
        self.set_overlap(overlap, comm_thread)

    def set_overlap(self, overlap: str, comm_thread: bool = False) -> None:
        """Choose how reductions are scheduled (see the module docstring); between steps only.

        `comm_thread` needs MPI_THREAD_MULTIPLE (the thread's collectives run while this thread
        sends pipeline activations or tensor-parallel sums); where MPI granted less, 'on'
        launches from the hooks on this thread instead, and says so through `log`.
        """
        if overlap not in OVERLAP_MODES:
            raise ValueError(
                f"parallel.overlap must be one of {', '.join(OVERLAP_MODES)}, got '{overlap}'"
            )
        self.overlap = overlap
        # With one dp rank nothing travels, so there is nothing to overlap or to time.
        self.choice: str | None = overlap
        if overlap == "auto":
            self.choice = None if self.comm.size > 1 else "off"
        self._mode = "on" if self.choice is None else self.choice
        self._trial = 0
        self._trial_seconds: dict[str, list[float]] = {"off": [], "on": []}
        self._step_start = 0.0
        comm_thread = comm_thread and self.choice != "off"
        if comm_thread and MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            self._log(
                "parallel.comm_thread: MPI granted thread level "
                f"{MPI.Query_thread()}, not MPI_THREAD_MULTIPLE; reductions launch from the "
                "gradient hooks instead"
            )
            comm_thread = False
        if comm_thread and self._thread is None:
            self._thread = _CommThread(self._start_reduction, self.buckets[0].buffer.device)
        elif not comm_thread and self._thread is not None:
            self._thread.close()
            self._thread = None

    def close(self) -> None:
        """End the communication thread, if any (it is a daemon: a process may also just exit)."""
        if self._thread is not None:
            self._thread.close()
            self._thread = None

    @staticmethod
    def _make_buckets(
        params: list[nn.Parameter], bucket_bytes: int, multiple: int, alone: nn.Parameter | None
    ) -> list[Bucket]:
        groups: list[list[nn.Parameter]] = [[]]
        size = 0
        for p in params:
            # A parameter larger than a bucket gets a bucket of its own, and so does `alone`
            # (a weight tied across pipeline stages: its ZeRO-1 shards then cover the same
            # elements on both stages).
            if groups[-1] and (
                size + p.numel() * 4 > bucket_bytes or alone is p or alone is groups[-1][-1]
            ):
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
        """Start a step: clear the gradients (and, under overlap auto, pick this step's mode)."""
        if self.choice is None:
            self._mode = AUTO_PLAN[self._trial]
        self._step_start = time.perf_counter()
        for bucket in self.buckets:
            bucket.buffer.zero_()

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if not self.sync:
            return
        bucket = self._bucket_of[id(param)]
        bucket.pending -= 1
        if self._mode == "off":
            return
        if bucket.pending == 0:
            self._launch_ready()
        if self._thread is None:
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
            if self._thread is not None:
                self._thread.submit(bucket)
            else:
                bucket.work = self._start_reduction(bucket)
            self._next_launch += 1

    def _start_reduction(self, bucket: Bucket, blocking: bool = False) -> Pending:
        """Start summing `bucket` over dp: the whole buffer, or only this rank's shard of it
        under ZeRO-1; compressed, in two levels, or both. The one place a bucket's reduction
        is chosen.

        `blocking` (overlap off) completes a one-call reduction before returning: Open MPI's
        blocking Allreduce and Reduce_scatter are faster than their non-blocking forms
        (measured: 6.5 vs 13 ms for 64 MiB at np 2), and nothing overlaps them anyway."""
        work: Reduction
        if self.compressor is not None:
            work = self.compressor.start(bucket)
            self.wire_bytes += work.wire_bytes
            return work
        if self.hierarchical is not None:
            work = self.hierarchical.start(bucket.buffer, bucket.grad_shard)
            self.wire_bytes += work.wire_bytes
            return work
        nbytes = bucket.buffer.numel() * bucket.buffer.element_size()
        if bucket.grad_shard is not None:
            self.wire_bytes += reduce_scatter_wire_bytes(nbytes, self.comm.size)
            if blocking:
                self.comm.reduce_scatter(bucket.buffer, bucket.grad_shard)
                return DONE
            return self.comm.ireduce_scatter(bucket.buffer, bucket.grad_shard)
        self.wire_bytes += allreduce_wire_bytes(nbytes, self.comm.size)
        if blocking:
            self.comm.allreduce_(bucket.buffer)
            return DONE
        return self.comm.iallreduce_(bucket.buffer)

    def finish(self, average: bool = True) -> float:
        """Wait for every bucket's all-reduce (reduce-scatter under ZeRO-1) and average;
        returns seconds spent waiting.

        `average=False`: only sum, for callers that divided each loss by the dp size already
        (train_step does), which saves a pass over the gradients.
        """
        start, counted = time.perf_counter(), self.comm.wait_seconds
        if self._mode == "off":
            # One bucket after another, each waited before the next starts.
            for bucket in self.buckets:
                bucket.work = self._start_reduction(bucket, blocking=True)
                bucket.work.wait()
        else:
            # Buckets whose parameters got no gradient this step (unused parameters)
            # never became ready through hooks; reduce them now, still in order.
            self._launch_ready(force=True)
            if self._thread is not None:
                self._thread.drain(f"gradient reduction on {self.comm.name} (communication thread)")
            for bucket in self.buckets:
                assert bucket.work is not None  # every bucket was launched just above
                bucket.work.wait()
        waited = time.perf_counter() - start
        # Blocking calls (overlap off) already counted their time in the comm's own total.
        self.wait_seconds += waited - (self.comm.wait_seconds - counted)
        for bucket in self.buckets:
            if average:
                (bucket.buffer if bucket.grad_shard is None else bucket.grad_shard).div_(
                    self.comm.size
                )
            bucket.pending = len(bucket.params)
            bucket.work = None
        self._next_launch = 0
        if self.choice is None:
            self._time_trial(time.perf_counter() - self._step_start)
        return waited

    def _time_trial(self, seconds: float) -> None:
        """overlap auto: count a trial step; after the last, every dp rank keeps the same mode."""
        if self._trial > 0:  # the first step is the warm-up
            self._trial_seconds[self._mode].append(seconds)
        self._trial += 1
        if self._trial < len(AUTO_PLAN):
            return
        # The slowest rank's median step of each mode decides, for every rank alike: a step
        # lasts as long as its slowest rank, and one rank's clock must not pick the schedule.
        medians = torch.tensor(
            [statistics.median(self._trial_seconds[m]) for m in ("off", "on")], dtype=torch.float64
        )
        self.comm.allreduce_(medians, op=MPI.MAX)
        off_s, on_s = medians.tolist()
        self.choice = self._mode = "on" if on_s <= off_s else "off"
        how = "communication thread" if self._thread is not None else "hooks"
        self._log(
            f"parallel.overlap auto: {self.choice} (median step {1e3 * on_s:.1f} ms "
            f"overlapped by the {how}, {1e3 * off_s:.1f} ms reducing after backward; "
            f"slowest of {self.comm.size} dp ranks)"
        )

    def grad_shards(self) -> list[torch.Tensor]:
        """This rank's part of the averaged gradient after finish(): every gradient under
        plain dp, only its own shard of each bucket under ZeRO-1 (where the parameters'
        `.grad` then hold this rank's local, unreduced sums, or PowerSGD's unaveraged one)."""
        if not self.shard:
            return [p.grad for b in self.buckets for p in b.params if p.grad is not None]
        return [b.grad_shard for b in self.buckets if b.grad_shard is not None]

    def reduce_tied(self) -> None:
        """After the step's backward (and finish()): sum the gradient of a weight tied across
        pipeline stages between the first and the last stage; under ZeRO-1 this rank's
        shard of it (its bucket holds it alone)."""
        if self.tied is not None:
            self.tied.reduce(self._bucket_of[id(self.tied.weight)].grad_shard)

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


class _CommThread:
    """A thread that owns the MPI calls of the gradient reductions during backward.

    The gradient hook only enqueues a ready bucket (`submit`); the thread starts its
    reduction (DataParallel._start_reduction, so any kind of Work runs here), and drives
    every one in flight with test() until all are complete; `drain` waits for that on the
    training thread. The training thread calls MPI only once the thread is idle (finish's
    wait(), which then has nothing left to do but copy results back), so every MPI call on
    the dp communicator during a step is made by this one thread, in bucket order.

    CUDA: the hook records an event on the stream that produced the gradients, and the
    thread waits for that event alone, not for the whole stream, so the autograd thread
    goes on launching kernels. The thread's own current stream is a side stream with
    nothing queued, so TensorComm's stream synchronisation before handing a buffer to MPI
    costs nothing there.
    """

    def __init__(self, start: Callable[[Bucket], Pending], device: torch.device):
        self._start = start
        self._cv = threading.Condition()
        self._queue: deque[tuple[Bucket, torch.cuda.Event | None]] = deque()
        self._unfinished = 0  # submitted, not yet complete
        self._error: BaseException | None = None
        self._closing = False
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # A daemon: a job that fails while reductions are in flight ends through MPI_Abort
        # (runtime.spmd_main), which must not wait for this thread.
        self._thread = threading.Thread(target=self._run, name="hpcllm-dp-comm", daemon=True)
        self._thread.start()

    def submit(self, bucket: Bucket) -> None:
        event = None
        if bucket.buffer.is_cuda:
            event = torch.cuda.Event()
            event.record()  # on the stream that computed these gradients
        with self._cv:
            self._queue.append((bucket, event))
            self._unfinished += 1
            self._cv.notify_all()

    def drain(self, what: str) -> None:
        """Block until every submitted reduction is complete; re-raise the thread's error."""
        with WATCHDOG.watch(what), self._cv:
            while self._unfinished and self._error is None:
                self._cv.wait()
        if self._error is not None:
            raise RuntimeError(f"the communication thread failed: {self._error!r}") from self._error

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join()

    def _run(self) -> None:
        if self._stream is not None:
            torch.cuda.set_device(self._stream.device)
            torch.cuda.set_stream(self._stream)
        in_flight: list[Bucket] = []
        try:
            while True:
                with self._cv:
                    while not (self._queue or in_flight or self._closing):
                        self._cv.wait()
                    if self._closing:
                        return
                    if not self._queue:
                        self._cv.wait(_POLL_S)  # a submit wakes it at once
                    ready = list(self._queue)
                    self._queue.clear()
                for bucket, event in ready:
                    if event is not None:
                        event.synchronize()
                    bucket.work = self._start(bucket)
                    in_flight.append(bucket)
                done = [b for b in in_flight if b.work is not None and b.work.test()]
                if done:
                    in_flight = [b for b in in_flight if b not in done]
                    with self._cv:
                        self._unfinished -= len(done)
                        self._cv.notify_all()
        except BaseException as e:  # handed to the training thread, which raises it
            with self._cv:
                self._error = e
                self._cv.notify_all()
