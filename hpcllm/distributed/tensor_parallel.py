"""Tensor parallelism (Megatron-style): the layers that hold one tp rank's slice of a weight.

A block's two matrix pairs are cut so that each needs one all-reduce forward and one
backward, on the tp communicator:

    attention:  qkv  column-parallel (each rank: its heads' q, k and v rows)
                     (llama: q, k and v, each column-parallel: 1/tp of the query heads and
                     of the key/value heads, so a query head's key/value head is local)
                proj row-parallel    (each rank: the columns of its heads)
    MLP:        fc   column-parallel (1/tp of the 4 * d_model hidden units per rank)
                     (llama: gate and up, each column-parallel over the same units)
                proj row-parallel

A column-parallel layer's input is replicated: `copy_to_parallel` (identity forward,
all-reduce of the input's gradient backward). Where several column-parallel layers read the
same input (llama's q, k and v; its gate and up), the copy is made once, on the input of the
attention or MLP module (`copy_input`), and the layers are built with copy_input=False: their
gradients with respect to the input are summed locally first, so the block still does one
all-reduce backward per pair, not one per layer. A row-parallel layer's output is a partial
sum: `reduce_from_parallel` (all-reduce forward, identity backward); its bias is replicated
and added once, after the sum. Between the two, activations stay sharded, so attention runs
on a rank's own heads only. (llama's QK-norm adds a head_dim-sized all-reduce of each norm's
weight gradient: `HeadNorm`.)

The vocabulary is cut in rank order into equal row ranges of the (padded) vocabulary: the
token embedding (`VocabParallelEmbedding`, each rank looks up the ids in its range and the
sum over ranks is the embedding) and the LM head (column-parallel, no gather). The loss is
`vocab_parallel_cross_entropy` on the logit shards, so the full logits never exist on any
rank. The vocabulary is padded to a multiple of tp; padded rows are zero, their logits are
masked out of the loss (so their gradients are zero and they stay zero) and they are never
written to checkpoints.

Every layer is built from the dense layer of the unsharded model (`from_dense`): the full
weight was drawn from its name-seeded generator, and the rank keeps its slice, so the initial
weights are the same for every tp. Each sharded parameter carries its `Placement` (which
boxes of the global tensor it holds), used by checkpoints and by gradient clipping.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from math import prod

import torch
import torch.nn as nn
import torch.nn.functional as F
from mpi4py import MPI

from hpcllm.checkpoint.index import Box, Placement, placement_of, set_placement
from hpcllm.distributed.comm import TensorComm, copy_to_parallel, reduce_from_parallel
from hpcllm.distributed.tied import is_stage_replica


def padded_vocab(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of tp (each rank holds an equal row range)."""
    return -(-vocab_size // tp) * tp


def _row_parts(
    rows: int, padded: int, groups: int, rank: int, size: int
) -> list[tuple[int, int, int]]:
    """This rank's rows of a weight whose dim 0 is `groups` equal segments, each cut into
    `size` equal runs: (local start, local stop, global start) per segment, clipped to the
    `rows` real rows of a `padded` dim."""
    seg = padded // groups
    run = seg // size
    parts = []
    for g in range(groups):
        first = g * seg + rank * run
        real = max(0, min(run, rows - first))
        if real:
            parts.append((g * run, g * run + real, first))
    return parts


def _placement(shape: tuple[int, ...], dim: int, parts: list[tuple[int, int, int]]) -> Placement:
    boxes = []
    for start, stop, first in parts:
        offset = [0] * len(shape)
        length = list(shape)
        offset[dim], length[dim] = first, stop - start
        boxes.append((start, stop, Box(tuple(offset), tuple(length))))
    return Placement(tuple(shape), dim, tuple(boxes))


def _local_param(
    full: torch.Tensor, local_len: int, dim: int, placement: Placement
) -> nn.Parameter:
    """This rank's part of `full` along `dim` (zeros where no part lies: padding)."""
    shape = list(full.shape)
    shape[dim] = local_len
    local = full.new_zeros(shape)
    for start, stop, box in placement.parts:
        src = full.narrow(dim, box.offset[dim], box.length[dim])
        local.narrow(dim, start, stop - start).copy_(src)
    param = nn.Parameter(local)
    set_placement(param, placement)
    return param


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows (and b) cut between the tp ranks.

    The input is replicated; the output is this rank's shard of the last dim. `groups`
    says how many equal segments the output has (3 for a fused qkv: each rank keeps its
    share of q, of k and of v); `padded` pads the output dim (the LM head's vocabulary).
    With `copy_input` False the input has been through `copy_to_parallel` already (once for
    the layers that share it, see `copy_input`).
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        comm: TensorComm,
        copy_input: bool = True,
    ):
        super().__init__()
        self.weight, self.bias, self.comm = weight, bias, comm
        self.copy_input = copy_input

    @classmethod
    def from_dense(
        cls,
        dense: nn.Linear,
        comm: TensorComm,
        *,
        groups: int = 1,
        padded: int = 0,
        copy_input: bool = True,
    ) -> ColumnParallelLinear:
        rows = dense.out_features
        padded = padded or rows
        parts = _row_parts(rows, padded, groups, comm.rank, comm.size)
        local_rows = padded // comm.size
        w = dense.weight.detach()
        weight = _local_param(w, local_rows, 0, _placement(tuple(w.shape), 0, parts))
        bias = None
        if dense.bias is not None:
            b = dense.bias.detach()
            bias = _local_param(b, local_rows, 0, _placement(tuple(b.shape), 0, parts))
        return cls(weight, bias, comm, copy_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input:
            x = copy_to_parallel(x, self.comm)
        return F.linear(x, self.weight, self.bias)


def copy_input(module: nn.Module, comm: TensorComm) -> None:
    """Make `module`'s first input enter the parallel region once: `copy_to_parallel` on it
    (a forward pre-hook, torchtitan's PrepareModuleInput), for the column-parallel layers
    inside that read it and were built with copy_input=False."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        return (copy_to_parallel(x, comm), *rest)

    module.register_forward_pre_hook(hook)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns cut between the tp ranks.

    The input is this rank's shard of the last dim (a column-parallel layer's output); the
    partial products are summed over the ranks, then the replicated bias is added once.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, comm: TensorComm):
        super().__init__()
        self.weight, self.bias, self.comm = weight, bias, comm

    @classmethod
    def from_dense(cls, dense: nn.Linear, comm: TensorComm) -> RowParallelLinear:
        cols = dense.in_features
        parts = _row_parts(cols, cols, 1, comm.rank, comm.size)
        w = dense.weight.detach()
        weight = _local_param(w, cols // comm.size, 1, _placement(tuple(w.shape), 1, parts))
        bias = None if dense.bias is None else nn.Parameter(dense.bias.detach().clone())
        return cls(weight, bias, comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_parallel(F.linear(x, self.weight), self.comm)
        return y if self.bias is None else y + self.bias


class HeadNorm(nn.Module):
    """llama's per-head RMSNorm of queries or keys (QK-norm) on a rank's own heads.

    Its weight (head_dim) is replicated, but each rank applies it to different heads, so
    each rank's gradient is only a partial sum: `copy_to_parallel` on the weight (identity
    forward, all-reduce of its gradient backward) makes it the full one on every rank.
    """

    def __init__(self, norm: nn.RMSNorm, comm: TensorComm):
        super().__init__()
        assert norm.weight is not None  # llama's norms are affine
        self.weight, self.eps, self.comm = norm.weight, norm.eps, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = copy_to_parallel(self.weight, self.comm)
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the (padded) vocabulary's rows cut between the tp ranks.

    Each rank embeds the ids in its row range and zeros elsewhere; the all-reduce of these
    partial embeddings is the full one, replicated on every rank.
    """

    def __init__(self, weight: nn.Parameter, comm: TensorComm):
        super().__init__()
        self.weight, self.comm = weight, comm
        self.first = comm.rank * weight.shape[0]

    @classmethod
    def from_dense(
        cls, dense: nn.Embedding, comm: TensorComm, padded: int
    ) -> VocabParallelEmbedding:
        w = dense.weight.detach()
        parts = _row_parts(w.shape[0], padded, 1, comm.rank, comm.size)
        return cls(
            _local_param(w, padded // comm.size, 0, _placement(tuple(w.shape), 0, parts)), comm
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, C)
        return reduce_from_parallel(out.masked_fill(outside.unsqueeze(-1), 0.0), self.comm)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Megatron's cross-entropy over logit shards: the global max, the sum of exponentials
    and the target's logit are all-reduced (one MAX, one SUM of both), never the logits."""

    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, targets: torch.Tensor, comm: TensorComm, vocab_size: int
    ):
        # logits (N, V_local) fp32, targets (N,)
        width = logits.shape[1]
        first = comm.rank * width
        logits = logits.clone()
        padding = max(0, min(width, first + width - vocab_size))
        if padding:
            logits[:, width - padding :] = float("-inf")  # padded ids are never a prediction
        row_max = logits.max(dim=-1).values
        comm.allreduce_(row_max, op=MPI.MAX)
        shifted = logits.sub_(row_max.unsqueeze(1))
        local_t = targets - first
        mine = (local_t >= 0) & (local_t < width)
        local_t = local_t.clamp(0, width - 1)
        picked = shifted.gather(1, local_t.unsqueeze(1)).squeeze(1)
        exp = shifted.exp_()
        sums = torch.stack([exp.sum(dim=-1), torch.where(mine, picked, 0.0)])  # (2, N)
        comm.allreduce_(sums)
        loss = sums[0].log() - sums[1]
        softmax = exp.div_(sums[0].unsqueeze(1))
        ctx.save_for_backward(softmax, local_t, mine)
        return loss.mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, local_t, mine = ctx.saved_tensors
        # d loss_i / d logit_ij = softmax_ij - [j is i's target], then the mean's 1/N.
        g = softmax.clone()
        rows = torch.arange(g.shape[0], device=g.device)
        g[rows, local_t] -= mine.to(g.dtype)
        return g.mul_(grad / g.shape[0]), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, comm: TensorComm, vocab_size: int
) -> torch.Tensor:
    """Mean next-token cross-entropy of this rank's logit shard (B, T, V_padded / tp) against
    token ids (B, T), in fp32; equal on every tp rank. Padded vocabulary ids are masked out."""
    flat = logits.float().reshape(-1, logits.size(-1))
    return _VocabParallelCrossEntropy.apply(flat, targets.reshape(-1), comm, vocab_size)


def dropout_rng(comm: TensorComm):
    """A context factory for dropout inside a parallel region (attention over this rank's
    heads): its masks must differ between tp ranks, while every other dropout, on replicated
    activations, draws from the default generator, seeded alike on all tp ranks.

    The region's generator is seeded from one draw of the default generator (the same on
    every tp rank, so the replicated stream stays in step) mixed with the tp rank, and the
    default generator's state is restored afterwards. It therefore needs no state of its own:
    checkpoints that restore the default generator restore it too.
    """

    @contextmanager
    def region() -> Iterator[None]:
        seed = int(torch.randint(0, 2**62, (1,)).item())
        mixed = (seed + 0x9E3779B97F4A7C15 * (comm.rank + 1)) % 2**63
        cuda = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(mixed)
            if cuda:
                torch.cuda.manual_seed(mixed)
            yield

    return region


def counted_once(param: torch.Tensor, tp_rank: int) -> bool:
    """Whether this rank counts `param` in whole-model sums (norms, parameter counts): each
    rank its own shards, and tp rank 0 alone the parameters replicated over tp; the first
    stage alone a weight tied across pipeline stages."""
    return (tp_rank == 0 or placement_of(param) is not None) and not is_stage_replica(param)


def owned_numel(param: torch.Tensor, tp_rank: int) -> int:
    """Elements of the global model this rank holds in `param` (shards without padding)."""
    placement = placement_of(param)
    if is_stage_replica(param):
        return 0
    if placement is None:
        return param.numel() if tp_rank == 0 else 0
    return sum(prod(box.length) for _, _, box in placement.parts)
