"""Gradient compression for the dp reduction (`parallel.grad_compression`).

A compressor replaces the plain fp32 all-reduce of a bucket (`DataParallel._start_reduction`)
with a reduction that puts fewer bytes on the wire. Each leaves the SUM over dp in the
bucket's buffer, as the all-reduce does (DataParallel.finish divides by dp), and is a Work:
its phases advance inside test() (called from the backward hooks, so they overlap backward)
and wait().

- `bf16` / `fp16`: each rank casts its bucket to 16 bits and sends the dp ranks their 1/dp
  chunks (Ialltoall); each rank sums its chunk of every rank's copy in fp32 (MPI cannot add
  bf16: Open MPI sums its raw bytes as integers), rounds the sum to 16 bits once, and an
  Iallgather brings every chunk to every rank. Per rank (dp-1)/dp of the bucket goes out
  twice at 2 bytes an element: half the 2(dp-1)/dp x 4 bytes of a ring all-reduce in fp32.
  fp16 carries a power-of-two scale per chunk (its exponent travels in one extra 16-bit
  slot of the chunk), chosen from the chunk's max-abs so that the largest value sits near
  2^14: no overflow, and small gradients keep fp16's precision instead of flushing to zero.
  Both are stateless: every rank ends with the same rounded sum.
- `powersgd` (Vogels et al., 2019): each gradient matrix M (n x m, a parameter viewed as
  dim 0 by the rest) with its error feedback E: M' = M + E, P = M'Q summed over dp and
  orthonormalised, Q = M'^T P summed over dp, approximation P Q^T, E = M' - P Q^T / dp.
  Q is warm-started from the previous step (the first from a generator seeded by the
  parameter's name, identically on every rank and in every pipeline layout). Vectors, and matrices where rank x (n + m) >= n x m, travel uncompressed
  in the same all-reduce as the P's; the Q's go in a second one. The first `warmup` steps
  are plain all-reduces. E and Q are per-rank state (`state_dict`), saved in checkpoints so
  that a resumed run continues exactly; the step count is the training step's. Under ZeRO-1
  every rank still reconstructs the whole approximate sum (each needs all of it for its own
  E), then keeps its shard of it: the same values and the same state as without ZeRO-1.

Every bucket's phases run on a communicator of its own (a Dup of dp): a bucket's second
phase starts when its first completes, which ranks may observe in a different order between
buckets, and MPI requires the collectives of one communicator to start in the same order
on every rank.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn as nn

from hpcllm.distributed.comm import TensorComm, Work

if TYPE_CHECKING:
    from hpcllm.distributed.data_parallel import Bucket
    from hpcllm.distributed.hierarchical import HierarchicalAllreduce

# fp16's largest finite value is 65504 (~2^16): scaled chunks peak at 2^14, so the sum of
# their rounded values stays finite after the cast (dp ranks' sums are rescaled first).
_FP16_PEAK_EXP = 14
# Keep 2^k a finite fp32 however small or large the gradients (fp32 spans 2^-149..2^128).
_FP16_MAX_SHIFT = 100


def allreduce_wire_bytes(nbytes: int, size: int) -> int:
    """Bytes one rank sends in a bandwidth-optimal (ring) all-reduce of `nbytes`."""
    return 2 * (size - 1) * nbytes // size


def reduce_scatter_wire_bytes(nbytes: int, size: int) -> int:
    """Bytes one rank sends in a ring reduce-scatter of `nbytes` (ZeRO-1's reduction)."""
    return (size - 1) * nbytes // size


class Reduction(Protocol):
    """A bucket's reduction in flight (a Pending) that knows what this rank sends for it."""

    wire_bytes: int

    def test(self) -> bool: ...

    def wait(self) -> None: ...


class PhasedWork:
    """A reduction in phases. Each phase does local work and returns the MPI Work it
    started, or None when the reduction is complete; the next phase runs once that Work
    is done. Satisfies the Work protocol (test(), wait())."""

    __slots__ = ("_current", "_phases", "wire_bytes")

    def __init__(self, phases: list[Callable[[], Work | None]], wire_bytes: int):
        self._phases = iter(phases)
        self._current: Work | None = None
        self.wire_bytes = wire_bytes  # what this rank sends over the whole reduction
        self._advance()

    def _advance(self) -> None:
        self._current = None
        for phase in self._phases:
            self._current = phase()
            if self._current is not None:
                return

    def test(self) -> bool:
        """Advance as far as MPI has progressed, without blocking; True once complete."""
        while self._current is not None and self._current.test():
            self._current.wait()  # already complete: copies results back
            self._advance()
        return self._current is None

    def wait(self) -> None:
        while self._current is not None:
            self._current.wait()
            self._advance()


class Compressor(ABC):
    """Reduces one bucket at a time, each on its own communicator (see the module doc)."""

    def __init__(self, comm: TensorComm, buckets: list[Bucket]):
        self.comm = comm
        # Optimizer steps reduced so far: reductions of the first bucket (a resume sets it).
        self.steps = 0
        self.first = id(buckets[0]) if buckets else None
        self.bucket_comms = {
            id(b): TensorComm(comm.comm.Dup(), comm.cuda_aware, name=f"{comm.name} bucket {i}")
            for i, b in enumerate(buckets)
        }

    @abstractmethod
    def start(self, bucket: Bucket) -> Reduction:
        """Start summing `bucket.buffer` over dp; the buffer holds the sum after wait()."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's state (names to tensors) for a checkpoint; empty if stateless."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> str | None:
        """Restore `state_dict()`'s tensors; returns why it could not (the state then
        starts afresh), or None."""
        return None


class HalfSum:
    """The 16-bit sum of one flat fp32 buffer of `numel` elements over `size` ranks: each rank
    sends every rank its 1/size chunk (all-to-all), sums its chunk of every rank's copy in
    fp32 and rounds the sum to 16 bits once; then either an all-gather brings every rounded
    chunk to every rank (the all-reduce form) or the rank keeps its own (the reduce-scatter
    form, for ZeRO-1): the same rounded values either way. Used for whole buckets over dp
    (`HalfPrecision`) and for the cross-node phase of a hierarchical reduction."""

    def __init__(self, size: int, numel: int, dtype: torch.dtype, device: torch.device):
        # fp16: one extra 16-bit slot per chunk carries the chunk's scale exponent.
        self.extra = 1 if dtype == torch.float16 else 0
        self.numel = numel
        chunk = -(-numel // size) + self.extra
        # (size, chunk): what this rank sends (later: what it gathers), and what it receives.
        self.send = torch.zeros(size, chunk, dtype=dtype, device=device)
        self.recv = torch.zeros(size, chunk, dtype=dtype, device=device)

    def phases(
        self,
        comm: TensorComm,
        values: torch.Tensor,
        shard: torch.Tensor | None = None,
        gather_comm: TensorComm | None = None,
    ) -> list[Callable[[], Work | None]]:
        """PhasedWork's phases summing `values` over `comm`: into `values`, or with `shard`
        only this rank's chunk, into `shard` (`values` then holds its own addend still). The
        all-gather goes on `gather_comm` (the same group) if given."""
        send, recv, n = self.send, self.recv, self.numel
        data = send.shape[1] - self.extra  # elements of the buffer per chunk
        mine = send[comm.rank : comm.rank + 1]

        def scatter() -> Work:
            self._pack(values, send, n)
            return comm.ialltoall(send, recv)

        def reduce() -> None:
            # The sum of this rank's chunk over every rank's copy, in fp32, rounded once.
            total = self._unpack(recv).sum(0)  # (data,)
            self._pack(total, mine, data)

        def gather() -> Work:
            reduce()
            return (gather_comm or comm).iallgather_(send)

        def unpack() -> None:
            if self.extra:
                values.copy_(self._unpack(send).reshape(-1)[:n])
            else:  # bf16: cast straight into the buffer, no fp32 copy in between
                values.copy_(send.view(-1)[:n])

        def keep() -> None:
            assert shard is not None
            reduce()
            shard.copy_(self._unpack(mine).reshape(-1)[: shard.numel()])

        return [scatter, gather, unpack] if shard is None else [scatter, keep]

    def wire_bytes(self, size: int, shard: bool) -> int:
        """What one rank sends: all-to-all, and all-gather unless it keeps its shard."""
        chunk_bytes = self.send.shape[1] * self.send.element_size()
        return (1 if shard else 2) * (size - 1) * chunk_bytes

    def _pack(self, values: torch.Tensor, out: torch.Tensor, n: int) -> None:
        """Cast the first `n` elements of `values` into `out`'s (rows, chunk) data slots;
        under fp16 each row scaled by a power of two, its exponent in the row's last slot."""
        rows, data = out.shape[0], out.shape[1] - self.extra
        if not self.extra:
            out.view(-1)[:n].copy_(values[:n])
            return
        padded = values.new_zeros(rows * data)
        padded[:n] = values[:n]
        padded = padded.view(rows, data)
        peak = padded.abs().amax(1)  # (rows,)
        # 2^shift brings the row's largest magnitude to at most 2^_FP16_PEAK_EXP.
        _, exponent = torch.frexp(peak)
        shift = torch.where(peak > 0, _FP16_PEAK_EXP - exponent, torch.zeros_like(exponent))
        shift = shift.clamp(-_FP16_MAX_SHIFT, _FP16_MAX_SHIFT)
        out[:, :data].copy_(torch.ldexp(padded, shift[:, None].float()))
        out[:, data].view(torch.int16).copy_(shift)

    def _unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(rows, data) fp32 values of `_pack`'s output, unscaled."""
        if not self.extra:
            return packed.float()
        data = packed.shape[1] - 1
        shift = packed[:, data].view(torch.int16).float()
        return torch.ldexp(packed[:, :data].float(), -shift[:, None])


class HalfPrecision(Compressor):
    """bf16 or fp16 on the wire, summed in fp32 (`HalfSum` per bucket, over dp); under ZeRO-1
    (buckets with a `grad_shard`) the reduce-scatter form. With `hierarchical` the buckets
    are reduced in two levels instead, and 16 bits travel in the cross-node phase only."""

    def __init__(
        self,
        comm: TensorComm,
        buckets: list[Bucket],
        dtype: torch.dtype,
        hierarchical: HierarchicalAllreduce | None = None,
    ):
        super().__init__(comm, buckets)
        self.hierarchical = hierarchical
        if hierarchical is None:
            self.sums = {
                id(b): HalfSum(comm.size, b.buffer.numel(), dtype, b.buffer.device) for b in buckets
            }
        else:  # the cross-node phase sums 1/local of a bucket over the nodes
            local, cross = hierarchical.local.size, hierarchical.cross.size
            self.sums = {
                id(b): HalfSum(cross, b.buffer.numel() // local, dtype, b.buffer.device)
                for b in buckets
            }

    def start(self, bucket: Bucket) -> Reduction:
        if self.hierarchical is not None:
            return self.hierarchical.start(bucket.buffer, bucket.grad_shard, self.sums[id(bucket)])
        comm, half = self.bucket_comms[id(bucket)], self.sums[id(bucket)]
        shard = bucket.grad_shard
        return PhasedWork(
            half.phases(comm, bucket.buffer, shard), half.wire_bytes(comm.size, shard is not None)
        )


def worth_compressing(n: int, m: int, rank: int) -> bool:
    """Whether rank-`rank` factors (n + m) x rank are smaller than the n x m matrix."""
    return rank * (n + m) < n * m


class PowerSGD(Compressor):
    """Rank-r PowerSGD with error feedback and warm-started Q (see the module doc).

    `names` gives each parameter's name for the checkpoint state; `compressible(n, m, r)`
    decides which matrices are compressed (tests force the exact full-rank case with it).
    """

    def __init__(
        self,
        comm: TensorComm,
        buckets: list[Bucket],
        names: dict[int, str],
        *,
        rank: int,
        warmup: int,
        seed: int,
        compressible: Callable[[int, int, int], bool] = worth_compressing,
    ):
        super().__init__(comm, buckets)
        self.rank = rank
        self.warmup = warmup
        # Per bucket: [(name, gradient matrix view, E, Q)], the uncompressed views, and the
        # flat buffers that carry the P's (and the uncompressed values) and the Q's.
        self.plans: dict[int, tuple[list, list[torch.Tensor], torch.Tensor, torch.Tensor]] = {}
        for b in buckets:
            matrices, vectors = [], []
            p_numel = q_numel = 0
            for p, offset in zip(b.params, b.offsets, strict=True):
                grad = b.buffer[offset : offset + p.numel()]
                n = p.shape[0] if p.dim() >= 2 else 1
                m = p.numel() // n
                r = min(rank, n, m)
                if p.dim() >= 2 and compressible(n, m, r):
                    # Seeded per parameter name, as the weights are: the same Q whatever the
                    # pipeline layout or bucket order puts beside it.
                    gen = torch.Generator().manual_seed(seed + zlib.crc32(names[id(p)].encode()))
                    q = torch.randn(m, r, generator=gen).to(b.buffer.device)
                    error = torch.zeros(n, m, device=b.buffer.device)
                    matrices.append((names[id(p)], grad.view(n, m), error, q))
                    p_numel += n * r
                    q_numel += m * r
                else:
                    vectors.append(grad)
            p_numel += sum(v.numel() for v in vectors)
            device = b.buffer.device
            self.plans[id(b)] = (
                matrices,
                vectors,
                torch.zeros(p_numel, device=device),
                torch.zeros(q_numel, device=device),
            )

    def start(self, bucket: Bucket) -> PhasedWork:
        comm = self.bucket_comms[id(bucket)]
        if id(bucket) == self.first:
            self.steps += 1
        keep = _keep_shard(bucket, comm)
        if self.steps <= self.warmup:
            # Uncompressed warm-up steps: the plain all-reduce, on the bucket's communicator.
            nbytes = bucket.buffer.numel() * bucket.buffer.element_size()
            return PhasedWork(
                [lambda: comm.iallreduce_(bucket.buffer), *keep],
                allreduce_wire_bytes(nbytes, comm.size),
            )
        matrices, vectors, p_buf, q_buf = self.plans[id(bucket)]
        ps = _views(p_buf, [(e.shape[0], q.shape[1]) for _, _, e, q in matrices])
        qs = _views(q_buf, [q.shape for _, _, _, q in matrices])

        def project() -> Work:
            for (_, grad, error, q), p in zip(matrices, ps, strict=True):
                error.add_(grad)  # E now holds M' = M + E
                torch.matmul(error, q, out=p)
            at = sum(p.numel() for p in ps)
            for v in vectors:
                p_buf[at : at + v.numel()].copy_(v)
                at += v.numel()
            return comm.iallreduce_(p_buf)

        def back_project() -> Work:
            at = sum(p.numel() for p in ps)
            for v in vectors:
                v.copy_(p_buf[at : at + v.numel()])
                at += v.numel()
            for (_, _, error, _), p, q in zip(matrices, ps, qs, strict=True):
                p.copy_(torch.linalg.qr(p).Q)
                torch.matmul(error.T, p, out=q)
            return comm.iallreduce_(q_buf)

        def decompress() -> None:
            for (_, grad, error, q), p, q_sum in zip(matrices, ps, qs, strict=True):
                torch.matmul(p, q_sum.T, out=grad)  # the sum over dp of the approximations
                error.sub_(grad, alpha=1 / comm.size)  # E = M' - the mean approximation
                q.copy_(q_sum).div_(comm.size)  # warm start of the next step

        nbytes = 4 * (p_buf.numel() + q_buf.numel())
        return PhasedWork(
            [project, back_project, decompress, *keep], allreduce_wire_bytes(nbytes, comm.size)
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for matrices, _, _, _ in self.plans.values():
            for name, _, error, q in matrices:
                state[f"{name}/error"] = error
                state[f"{name}/q"] = q
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> str | None:
        mine = self.state_dict()
        missing = sorted(set(mine) - set(state))
        if missing:
            return f"the checkpoint has no {missing[0]}"
        for key, t in mine.items():
            if state[key].shape != t.shape:
                return f"{key} has shape {list(state[key].shape)} there, {list(t.shape)} here"
        for key, t in mine.items():
            t.copy_(state[key])
        return None


def _keep_shard(bucket: Bucket, comm: TensorComm) -> list[Callable[[], None]]:
    """Under ZeRO-1 (a bucket with a `grad_shard`): the last phase of a reduction that leaves
    the whole sum in the buffer, keeping this rank's shard of it; none otherwise."""
    shard = bucket.grad_shard
    if shard is None:
        return []
    lo, hi = bucket.shard_range(comm.rank, comm.size)

    def keep() -> None:
        shard.copy_(bucket.buffer[lo:hi])

    return [keep]


def _views(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    views, at = [], 0
    for n, m in shapes:
        views.append(flat[at : at + n * m].view(n, m))
        at += n * m
    return views


def build(
    mode: str,
    comm: TensorComm,
    buckets: list[Bucket],
    model: nn.Module,
    *,
    rank: int = 4,
    warmup: int = 0,
    seed: int = 0,
    hierarchical: HierarchicalAllreduce | None = None,
) -> Compressor | None:
    """The compressor of `mode` (parallel.grad_compression) for DataParallel's `buckets`, or
    None for 'none' (the plain fp32 all-reduce). With `hierarchical` (parallel.allreduce),
    bf16/fp16 compress the cross-node phase of its two-level reduction (config.validate
    refuses powersgd with it)."""
    if mode == "none":
        return None
    if mode in ("bf16", "fp16"):
        dtype = torch.bfloat16 if mode == "bf16" else torch.float16
        return HalfPrecision(comm, buckets, dtype, hierarchical)
    assert mode == "powersgd", mode  # config.validate() refuses other values
    names = {id(p): n for n, p in model.named_parameters()}
    return PowerSGD(comm, buckets, names, rank=rank, warmup=warmup, seed=seed)
