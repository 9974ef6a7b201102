"""All tensor traffic between ranks: zero-copy MPI buffers for torch tensors.

MPI sees tensors through views that share their memory, never through pickles:
  - CPU tensors as NumPy arrays (`tensor.numpy()` shares storage);
  - CUDA tensors as CuPy arrays handed straight to a CUDA-aware MPI, after the
    current stream is synchronised (MPI cannot see kernels still queued);
  - CUDA tensors with an MPI that is not CUDA-aware: staged through a pinned
    host buffer, copied back when the operation completes.

Reductions of bfloat16/float16 run in float32: bf16 has no MPI datatype, and
Open MPI would otherwise sum its raw bytes as integers without complaint.
Point-to-point traffic of bf16 is plain bytes, so it goes as int16 unchanged.

At the end, the collectives that autograd sees (copy_to_parallel, reduce_from_parallel,
gather_from_parallel, scatter_to_parallel): the forward and backward of parallel layers.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from typing import Protocol

import torch
from mpi4py import MPI

from hpcllm.runtime.watchdog import WATCHDOG

_REDUCE_IN_FP32 = (torch.bfloat16, torch.float16)


def detect_cuda_aware(setting: str = "auto") -> bool:
    """Whether CUDA buffers may be handed to MPI directly.

    `setting` is parallel.cuda_aware ('auto', 'yes', 'no'); the environment
    variable HPCLLM_CUDA_AWARE=yes|no overrides it, for a quick switch on a cluster.
    """
    setting = os.environ.get("HPCLLM_CUDA_AWARE", setting).lower()
    if setting in ("yes", "1", "true"):
        return True
    if setting in ("no", "0", "false"):
        return False
    # Open MPI's extension says if the library was built with CUDA and the runtime supports it.
    try:
        return bool(ctypes.CDLL(None).MPIX_Query_cuda_support())
    except (AttributeError, OSError):
        pass
    # Cray MPICH and MVAPICH2 enable GPU buffers through these variables.
    return (
        os.environ.get("MPICH_GPU_SUPPORT_ENABLED") == "1" or os.environ.get("MV2_USE_CUDA") == "1"
    )


class Pending(Protocol):
    """Anything that completes later: a Work, or a reduction of several phases that advances
    them inside test() and wait() (hpcllm/distributed/compression.py)."""

    def test(self) -> bool: ...

    def wait(self) -> None: ...


class Work:
    """A pending MPI operation on a tensor; `wait()` completes it and copies results back."""

    __slots__ = ("finish", "request", "result", "what")

    def __init__(
        self,
        request: MPI.Request,
        finish: Callable[[], None] | None,
        what: str,
        result: torch.Tensor | None = None,
    ):
        self.request = request
        self.finish = finish
        self.what = what
        self.result = result  # the tensor that holds the outcome after wait(), where there is one

    def wait(self) -> None:
        with WATCHDOG.watch(self.what):
            self.request.Wait()
        if self.finish is not None:
            self.finish()
            self.finish = None

    def test(self) -> bool:
        """Drive MPI progress; True once complete (results are copied back by wait())."""
        return self.request.Test()


class TensorComm:
    """Tensor collectives and point-to-point on one MPI communicator.

    `wait_seconds` accumulates the time spent blocked in wait(), which the
    training loop reports as the communication share of a step.
    """

    def __init__(self, comm: MPI.Comm, cuda_aware: bool = False, name: str = "world"):
        self.comm = comm
        self.name = name
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.cuda_aware = cuda_aware
        self.wait_seconds = 0.0

    def split(self, color: int | None, name: str) -> TensorComm | None:
        """Collective: the ranks of each `color` in a communicator of their own, in this
        communicator's rank order; None on the ranks of color None."""
        comm = self.comm.Split(MPI.UNDEFINED if color is None else color, self.rank)
        return None if color is None else TensorComm(comm, self.cuda_aware, name=name)

    # -- buffers ---------------------------------------------------------------

    def _buffer(self, tensor: torch.Tensor, *, reduce: bool, incoming: bool):
        """An MPI-ready view of `tensor`, and how to bring results back into it.

        `incoming` says the operation writes into the buffer (reductions, receives),
        so a staged or upcast copy must be copied back when it completes.
        """
        if not tensor.is_contiguous():
            raise ValueError("MPI buffers must be contiguous tensors")
        if tensor.is_cpu and tensor.dtype not in _REDUCE_IN_FP32:
            # The common case, kept short: each microsecond here is ~2% of a 1 MiB all-gather.
            return (tensor.detach() if tensor.requires_grad else tensor).numpy(), None
        src = tensor.detach()
        if reduce and src.dtype in _REDUCE_IN_FP32:
            src = src.float()
        elif src.dtype == torch.bfloat16 or src.dtype == torch.float16:
            src = src.view(torch.int16)
        if src.is_cuda and not self.cuda_aware:
            host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            host.copy_(src)  # synchronous D2H: the host copy is complete when MPI reads it
            src = host
        if src.is_cuda:
            import cupy  # the GPU extra; imported only when CUDA tensors reach MPI

            torch.cuda.current_stream(src.device).synchronize()
            buf = cupy.from_dlpack(src)
        else:
            buf = src.numpy()
        copy_back = None
        if incoming and src.data_ptr() != tensor.data_ptr():
            target = tensor.detach()
            if target.dtype != src.dtype and src.dtype == torch.int16:
                target = target.view(torch.int16)

            def copy_back():
                target.copy_(src)

        return buf, copy_back

    # -- collectives -----------------------------------------------------------

    def allreduce_(self, tensor: torch.Tensor, op: MPI.Op = MPI.SUM) -> torch.Tensor:
        """In-place blocking all-reduce."""
        if self.size == 1:
            # The identity: skip the buffers, which on a GPU without CUDA-aware MPI would be
            # a round trip of the tensor through host memory (measured: 85 ms a step for the
            # gradients of a 350M model on one H200).
            return tensor
        buf, copy_back = self._buffer(tensor, reduce=True, incoming=True)
        start = time.perf_counter()
        with WATCHDOG.watch(f"all-reduce on {self.name}"):
            self.comm.Allreduce(MPI.IN_PLACE, buf, op=op)
        self.wait_seconds += time.perf_counter() - start
        if copy_back:
            copy_back()
        return tensor

    def iallreduce_(self, tensor: torch.Tensor, op: MPI.Op = MPI.SUM) -> Work:
        """In-place non-blocking all-reduce; the tensor holds the result after wait()."""
        if self.size == 1:
            return Work(MPI.REQUEST_NULL, None, f"all-reduce on {self.name}", tensor)
        buf, copy_back = self._buffer(tensor, reduce=True, incoming=True)
        return Work(
            self.comm.Iallreduce(MPI.IN_PLACE, buf, op=op), copy_back, f"all-reduce on {self.name}"
        )

    def allgather(self, tensor: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Every rank's `tensor` concatenated along dim 0 in rank order, shape (size * n, ...).

        Written into `out` if given (size times `tensor`'s elements, same dtype). Any dtype:
        nothing is reduced, so bf16/fp16 travel as their raw bits.
        """
        if out is None:
            out = tensor.new_empty((self.size * tensor.shape[0], *tensor.shape[1:]))
        self._check_chunks("all-gather", whole=out, chunk=tensor)
        send, _ = self._buffer(tensor, reduce=False, incoming=False)
        recv, copy_back = self._buffer(out, reduce=False, incoming=True)
        start = time.perf_counter()
        with WATCHDOG.watch(f"all-gather on {self.name}"):
            self.comm.Allgather(send, recv)
        self.wait_seconds += time.perf_counter() - start
        if copy_back:
            copy_back()
        return out

    def reduce_scatter(
        self, tensor: torch.Tensor, out: torch.Tensor | None = None, op: MPI.Op = MPI.SUM
    ) -> torch.Tensor:
        """`tensor` (size * n, ...) reduced over the ranks; rank r gets the r-th n rows.

        Written into `out` if given. The rows must divide evenly between the ranks: pad a
        flat buffer to a multiple of `size` first. bf16/fp16 are reduced in fp32 and rounded
        once, as in allreduce_.
        """
        work = self.ireduce_scatter(tensor, out, op)
        self.wait(work)
        assert work.result is not None  # ireduce_scatter always names its output
        return work.result

    def ireduce_scatter(
        self, tensor: torch.Tensor, out: torch.Tensor | None = None, op: MPI.Op = MPI.SUM
    ) -> Work:
        """Non-blocking reduce_scatter: after wait(), `out` (also `Work.result`) holds this
        rank's reduced rows. Same buffer paths and padding rule as reduce_scatter; `tensor`
        must not change until then."""
        if tensor.dim() == 0 or tensor.shape[0] % self.size:
            raise ValueError(
                f"reduce-scatter on {self.name}: dim 0 of the input (shape {tuple(tensor.shape)}) "
                f"must be a multiple of the {self.size} ranks; pad it"
            )
        if out is None:
            out = tensor.new_empty((tensor.shape[0] // self.size, *tensor.shape[1:]))
        self._check_chunks("reduce-scatter", whole=tensor, chunk=out)
        if self.size == 1:
            out.copy_(tensor)
            return Work(MPI.REQUEST_NULL, None, f"reduce-scatter on {self.name}", out)
        send, _ = self._buffer(tensor, reduce=True, incoming=False)
        recv, copy_back = self._buffer(out, reduce=True, incoming=True)

        def finish() -> None:
            if copy_back:
                copy_back()
            # Naming `send` holds a staged or upcast copy of the input until MPI is done with it.
            assert send is not None

        request = self.comm.Ireduce_scatter_block(send, recv, op=op)
        return Work(request, finish, f"reduce-scatter on {self.name}", out)

    def iallgather_(self, tensor: torch.Tensor) -> Work:
        """Non-blocking in-place all-gather: `tensor` (size * n, ...) is `size` chunks along
        dim 0; this rank's chunk (index `rank`) goes to every rank, and after wait() every
        chunk holds its owner's values. Any dtype: nothing is reduced."""
        if tensor.dim() == 0 or tensor.shape[0] % self.size:
            raise ValueError(
                f"all-gather on {self.name}: dim 0 of the buffer (shape {tuple(tensor.shape)}) "
                f"must be a multiple of the {self.size} ranks; pad it"
            )
        if self.size == 1:
            return Work(MPI.REQUEST_NULL, None, f"all-gather on {self.name}", tensor)
        buf, copy_back = self._buffer(tensor, reduce=False, incoming=True)
        request = self.comm.Iallgather(MPI.IN_PLACE, buf)
        return Work(request, copy_back, f"all-gather on {self.name}", tensor)

    def ialltoall(self, tensor: torch.Tensor, out: torch.Tensor) -> Work:
        """Non-blocking all-to-all: `tensor` (size * n, ...) is `size` chunks along dim 0,
        chunk i for rank i; after wait() chunk j of `out` (same shape) holds what rank j sent
        this rank. Any dtype: nothing is reduced, so bf16/fp16 travel as their raw bits."""
        if tensor.dim() == 0 or tensor.shape[0] % self.size or out.shape != tensor.shape:
            raise ValueError(
                f"all-to-all on {self.name}: dim 0 of the input (shape {tuple(tensor.shape)}) "
                f"must be a multiple of the {self.size} ranks and the output "
                f"({tuple(out.shape)}) the same shape; pad it"
            )
        self._check_chunks("all-to-all", whole=out, chunk=tensor[: tensor.shape[0] // self.size])
        send, _ = self._buffer(tensor, reduce=False, incoming=False)
        recv, copy_back = self._buffer(out, reduce=False, incoming=True)

        def finish() -> None:
            if copy_back:
                copy_back()
            assert send is not None  # holds a staged copy of the input until MPI is done

        return Work(self.comm.Ialltoall(send, recv), finish, f"all-to-all on {self.name}", out)

    def alltoallv(
        self,
        tensor: torch.Tensor,
        send_counts: list[int],
        out: torch.Tensor,
        recv_counts: list[int],
    ) -> torch.Tensor:
        """Blocking all-to-all of uneven chunks of flat tensors: the first send_counts[0]
        elements of `tensor` go to rank 0, the next send_counts[1] to rank 1, ...; `out` gets
        recv_counts[j] elements from rank j, in rank order. Any dtype: nothing is reduced."""
        if self.size == 1:
            out[: send_counts[0]].copy_(tensor[: send_counts[0]])
            return out
        send, _ = self._buffer(tensor, reduce=False, incoming=False)
        recv, copy_back = self._buffer(out, reduce=False, incoming=True)

        def displacements(counts: list[int]) -> list[int]:
            return [sum(counts[:j]) for j in range(len(counts))]

        start = time.perf_counter()
        with WATCHDOG.watch(f"all-to-all on {self.name}"):
            self.comm.Alltoallv(
                [send, (send_counts, displacements(send_counts))],
                [recv, (recv_counts, displacements(recv_counts))],
            )
        self.wait_seconds += time.perf_counter() - start
        if copy_back:
            copy_back()
        return out

    def _check_chunks(self, what: str, *, whole: torch.Tensor, chunk: torch.Tensor) -> None:
        if whole.numel() != self.size * chunk.numel() or whole.dtype != chunk.dtype:
            raise ValueError(
                f"{what} on {self.name}: the whole buffer ({whole.numel()} x {whole.dtype}) must "
                f"hold {self.size} ranks' chunks ({chunk.numel()} x {chunk.dtype})"
            )

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        buf, copy_back = self._buffer(tensor, reduce=False, incoming=self.rank != root)
        with WATCHDOG.watch(f"broadcast on {self.name}"):
            self.comm.Bcast(buf, root=root)
        if copy_back:
            copy_back()
        return tensor

    # -- point to point --------------------------------------------------------

    def isend(self, tensor: torch.Tensor, dest: int, tag: int = 0) -> Work:
        buf, _ = self._buffer(tensor, reduce=False, incoming=False)
        # Keep the (possibly staged) buffer alive until the send completes.
        return Work(
            self.comm.Isend(buf, dest=dest, tag=tag),
            lambda: buf,
            f"send to {self.name} rank {dest}",
        )

    def irecv(self, tensor: torch.Tensor, source: int, tag: int = 0) -> Work:
        buf, copy_back = self._buffer(tensor, reduce=False, incoming=True)
        return Work(
            self.comm.Irecv(buf, source=source, tag=tag),
            copy_back,
            f"receive from {self.name} rank {source}",
        )

    def recv_init(self, tensor: torch.Tensor, source: int, tag: int = 0) -> PersistentRecv:
        """A persistent receive into `tensor` (MPI Recv_init): described once, started per message."""
        return PersistentRecv(self, tensor, source, tag)

    def wait(self, work: Work) -> None:
        """Wait for `work`, counting the blocked time as communication."""
        start = time.perf_counter()
        work.wait()
        self.wait_seconds += time.perf_counter() - start


class PersistentRecv:
    """A receive of a fixed shape from one peer, set up once with MPI Recv_init and started
    for each message: a message then costs one Start and one Wait, with no buffer to describe
    and no request to build. Every message overwrites `tensor`; use it before the next start.

    The buffer code is TensorComm's: a CUDA tensor with an MPI that is not CUDA-aware is
    received into a pinned host buffer, itself persistent, and copied to the device on wait().
    """

    __slots__ = ("_copy_back", "_sync_device", "comm", "request", "tensor", "what")

    def __init__(self, comm: TensorComm, tensor: torch.Tensor, source: int, tag: int):
        self.comm = comm
        self.tensor = tensor
        buf, self._copy_back = comm._buffer(tensor, reduce=False, incoming=True)
        # MPI writes device memory behind the stream's back: kernels still reading the
        # previous message must be done before the next one lands.
        self._sync_device = tensor.is_cuda and comm.cuda_aware
        self.request = comm.comm.Recv_init(buf, source=source, tag=tag)
        self.what = f"receive from {comm.name} rank {source}"

    def start(self) -> None:
        if self._sync_device:
            torch.cuda.current_stream(self.tensor.device).synchronize()
        self.request.Start()

    def wait(self) -> torch.Tensor:
        """Complete the started receive (time counted as communication); returns `tensor`."""
        start = time.perf_counter()
        with WATCHDOG.watch(self.what):
            self.request.Wait()
        self.comm.wait_seconds += time.perf_counter() - start
        if self._copy_back is not None:
            self._copy_back()
        return self.tensor

    def free(self) -> None:
        """Release the MPI request (the receive must not be in progress)."""
        self.request.Free()


# -- collectives inside autograd ---------------------------------------------------------
# The four mappings of a tensor-parallel layer (Megatron's mappings.py). A region of tp ranks
# holds either a full tensor replicated on every rank, or one shard per rank of its last dim.


class _CopyToParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: TensorComm) -> torch.Tensor:
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.comm.allreduce_(grad.contiguous().clone()), None


class _ReduceFromParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: TensorComm) -> torch.Tensor:
        return comm.allreduce_(x.contiguous().clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _gather_last_dim(x: torch.Tensor, comm: TensorComm) -> torch.Tensor:
    stacked = comm.allgather(x.contiguous().unsqueeze(0))  # (size, *x.shape)
    return torch.cat(stacked.unbind(0), dim=-1)


def _my_shard_last_dim(x: torch.Tensor, comm: TensorComm) -> torch.Tensor:
    if x.shape[-1] % comm.size:
        raise ValueError(
            f"last dim {x.shape[-1]} does not split evenly between the {comm.size} ranks of {comm.name}"
        )
    return x.chunk(comm.size, dim=-1)[comm.rank].contiguous()


class _GatherFromParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: TensorComm) -> torch.Tensor:
        ctx.comm = comm
        return _gather_last_dim(x, comm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _my_shard_last_dim(grad, ctx.comm), None


class _ScatterToParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: TensorComm) -> torch.Tensor:
        ctx.comm = comm
        return _my_shard_last_dim(x, comm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather_last_dim(grad, ctx.comm), None


def copy_to_parallel(x: torch.Tensor, comm: TensorComm) -> torch.Tensor:
    """Identity forward, all-reduce backward: a replicated input entering a parallel region
    (before a column-parallel linear), whose gradient is the sum of every rank's part."""
    return x if comm.size == 1 else _CopyToParallel.apply(x, comm)


def reduce_from_parallel(x: torch.Tensor, comm: TensorComm) -> torch.Tensor:
    """All-reduce forward, identity backward: partial sums leaving a parallel region (after a
    row-parallel linear); the replicated output's gradient goes to every rank unchanged."""
    return x if comm.size == 1 else _ReduceFromParallel.apply(x, comm)


def gather_from_parallel(x: torch.Tensor, comm: TensorComm) -> torch.Tensor:
    """All-gather of last-dim shards forward (rank order), this rank's shard of the gradient
    backward: e.g. the full logits from a column-parallel LM head."""
    return x if comm.size == 1 else _GatherFromParallel.apply(x, comm)


def scatter_to_parallel(x: torch.Tensor, comm: TensorComm) -> torch.Tensor:
    """This rank's last-dim shard of a replicated tensor forward, all-gather of the gradient
    backward: the mirror of gather_from_parallel."""
    return x if comm.size == 1 else _ScatterToParallel.apply(x, comm)
