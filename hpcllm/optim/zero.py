"""ZeRO-1: optimizer state sharded over the dp ranks (`parallel.zero 1`).

`DataParallel(..., shard=True)` pads every gradient bucket to a multiple of dp, reduce-scatters
it while backward runs, and makes the parameters views into one flat buffer per bucket. Dp
rank r owns the r-th contiguous 1/dp of each bucket. `ShardedAdamW` is torch's own AdamW run
over only those owned ranges: each owned range is cut into segments at the boundaries between
weight-decay classes (a segment is a view into the parameter buffer, its `.grad` a view into
the rank's averaged gradient shard), so its arithmetic is torch.optim.AdamW's, element for
element, and the moments exist for 1/dp of the model on each rank. After the update,
`DataParallel.gather_params` all-gathers the ranges so every rank holds the whole model again
before the next forward.

`ShardedMuon` runs Muon's AdamW groups the same way, over the owned segments, while each hidden
matrix goes whole to the one dp rank that orthogonalises it (its owner, which alone keeps its
momentum) and its update comes back to the ranges' holders (see the class). Both share
`ShardedOptimizer`: the segments, and what checkpoints ask of a sharded optimizer.

For checkpoints, a segment is described per parameter (`Part`): which flat range of which
parameter it holds. A rank writes, and on load reads, exactly those ranges of the parameters
and of their optimizer state (`owned_pieces`, `load_sharded`): flat-range pieces of the global
tensors (hpcllm/checkpoint/pieces.py), so any other layout can read them.

Under tensor parallelism each tp rank has its own DataParallel over its local (tp-sliced)
parameters, so its buckets, shards and flat ranges are those of the local tensors; a range
of a tp-sliced parameter is stored as the boxes of the global tensor that hold it
(`checkpoint_index.placed_runs`), and a parameter replicated over tp by tp rank 0 only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from hpcllm.checkpoint import index as index
from hpcllm.checkpoint.index import placement_of
from hpcllm.checkpoint.pieces import CheckpointError, Piece, Reader
from hpcllm.distributed.data_parallel import DataParallel
from hpcllm.distributed.tied import is_stage_replica
from hpcllm.optim.muon import Muon, assign_owners, local_slice, orthogonalize, update_scale

# (start, stop) of a run of a rank's flat range of a parameter, and the global region it holds
Run = tuple[int, int, index.Region]


@dataclass(frozen=True)
class Part:
    """Elements [start, stop) of parameter `name` (flattened) are `segment[at : at + stop - start]`."""

    name: str
    param: nn.Parameter
    start: int
    stop: int
    segment: torch.Tensor
    at: int


class ShardedOptimizer(torch.optim.Optimizer):
    """What every ZeRO-1 optimizer shares: this dp rank's owned ranges of the buckets of `ddp`
    (built with shard=True) as segments (`_shard`), and their checkpoint pieces.

    `groups` are the optimizer's parameter groups; each owned element gets the settings of
    its parameter's group."""

    ddp: DataParallel
    named: list[tuple[str, nn.Parameter]]
    parts: list[Part]
    _parts_of: dict[str, list[Part]]

    def _shard(self, model: nn.Module, ddp: DataParallel, groups: list[dict]) -> list[dict]:
        """`groups` with each group's parameters replaced by this rank's segments of them."""
        if not ddp.shard:
            raise ValueError(f"{type(self).__name__} needs DataParallel(..., shard=True)")
        self.ddp = ddp
        self.named = list(model.named_parameters())
        names = {id(p): n for n, p in self.named}
        group_of = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
        segments: list[list[torch.Tensor]] = [[] for _ in groups]
        self.parts = []
        comm = ddp.comm
        for bucket in ddp.buckets:
            assert bucket.param_buffer is not None and bucket.grad_shard is not None
            lo, hi = bucket.shard_range(comm.rank, comm.size)
            # (group, bucket start, bucket stop, parameter, its first element) of every owned run.
            runs = []
            for p, offset in zip(bucket.params, bucket.offsets, strict=True):
                a, b = max(lo, offset), min(hi, offset + p.numel())
                if a < b:
                    runs.append((group_of[id(p)], a, b, p, a - offset))
            i = 0
            while i < len(runs):
                # Neighbouring parameters of one group share a segment: fewer, longer tensors.
                j = i + 1
                while j < len(runs) and runs[j][0] == runs[i][0]:
                    j += 1
                group, start, stop = runs[i][0], runs[i][1], runs[j - 1][2]
                segment = bucket.param_buffer[start:stop]
                segment.grad = bucket.grad_shard[start - lo : stop - lo]
                segments[group].append(segment)
                for _, a, b, p, first in runs[i:j]:
                    self.parts.append(
                        Part(names[id(p)], p, first, first + b - a, segment, a - start)
                    )
                i = j
        self._parts_of = {}
        for part in self.parts:
            self._parts_of.setdefault(part.name, []).append(part)
        return [
            {**{k: v for k, v in g.items() if k != "params"}, "params": segs}
            for g, segs in zip(groups, segments, strict=True)
        ]

    # -- checkpoints ---------------------------------------------------------------------

    def owned_pieces(self, tp_rank: int = 0) -> list[Piece]:
        """(global name, global shape, region, tensor) of everything this rank writes: its flat
        ranges of the parameters and of their AdamW moments, and a parameter's 0-dim `step`
        by the rank that owns its first element.

        Under tensor parallelism (`tp_rank` is this rank's) a range of a tp-sliced parameter
        is written as the boxes of the global tensor that hold it, on every tp rank; the
        ranges of a parameter replicated over tp, and every `step`, by tp rank 0 only."""
        pieces: list[Piece] = []
        for part in self.parts:
            items = [("", part.segment), *self.state.get(part.segment, {}).items()]
            pieces += self._pieces(part, items, tp_rank)
        return pieces

    def _pieces(
        self, part: Part, items: list[tuple[str, torch.Tensor]], tp_rank: int
    ) -> list[Piece]:
        """The pieces of `part`'s range of each (key, tensor): key '' is the parameter, others
        its optimizer state (flat tensors holding the range at `part.at`, or 0-dim)."""
        placement = index.placement_of(part.param)
        if (placement is None and tp_rank != 0) or is_stage_replica(part.param):
            # replicated over tp: tp rank 0's dp ranks write it; a tied weight's last-stage
            # copy: the first stage's
            return []
        shape = tuple(part.param.shape if placement is None else placement.shape)
        pieces: list[Piece] = []
        for key, value in items:
            name, file = (
                (f"optim/{part.name}/{key}", "optim") if key else (f"model/{part.name}", "model")
            )
            if value.dim() == 0:
                if part.start == 0 and tp_rank == 0:
                    # Parameters of one segment share its counter; safetensors wants copies.
                    pieces.append(Piece(name, (), index.whole(()), value.clone(), file=file))
                continue
            for at, stop, region in self._runs(part, placement):
                tensor = value[part.at + at : part.at + stop]
                if isinstance(region, index.Box):
                    tensor = tensor.view(region.length)
                pieces.append(Piece(name, shape, region, tensor, file=file))
        return pieces

    @staticmethod
    def _runs(part: Part, placement: index.Placement | None) -> list[Run]:
        """Part's range as (start, stop) within it and the global region each run holds."""
        if placement is None:
            return [(0, part.stop - part.start, index.Flat(part.start, part.stop))]
        runs = index.placed_runs(placement, part.param.shape, part.start, part.stop)
        return [(a - part.start, b - part.start, box) for a, b, box in runs]

    def owned_runs(self, name: str, shape: list[int]) -> tuple[tuple[int, ...], list[Run]] | None:
        """What this rank reads on load of tensor `name` (model/<param> or
        optim/<param>/<key>) of global `shape`: the shape of what it fills, (n,) for its flat
        range of n elements of the local tensor, and the runs of that range with the global
        region each holds (none for a tp shard's padding); () and one run of the whole
        tensor for a 0-dim `step`; None if it owns none of that parameter."""
        param = name.split("/")[1]
        parts = self._parts_of.get(param)
        if not parts:
            return None
        if not shape:
            return (), [(0, 1, index.whole(()))]
        (part,) = parts  # a rank owns one contiguous range of a parameter
        return (part.stop - part.start,), self._runs(part, index.placement_of(part.param))

    def load_sharded(self, reader: Reader) -> Callable[[], None]:
        """Read this rank's ranges of the parameters and their state (`owned_runs`) from a
        checkpoint of any layout; the returned function restores them (`load_owned`)."""
        tensors: dict[str, torch.Tensor] = {}
        for n, p in self.named:
            placement = placement_of(p)
            shape = placement.shape if placement is not None else tuple(p.shape)
            if not reader.has(f"model/{n}"):
                raise CheckpointError(f"{reader.where}: the index has no parameter {n}")
            if reader.shape(f"model/{n}") != shape:
                raise CheckpointError(
                    f"{reader.where}: parameter {n} has shape {list(reader.shape(f'model/{n}'))} "
                    f"in the index, the model's is {list(shape)}"
                )
            for key in [f"model/{n}", *reader.names(f"optim/{n}/")]:
                owned = self.owned_runs(key, list(reader.shape(key)))
                if owned is not None:
                    local, runs = owned
                    tensors[key] = (
                        reader.read_runs(key, local[0], runs) if local else reader.read(key)
                    )
        return partial(self.load_owned, tensors)

    @torch.no_grad()
    def load_owned(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore this rank's ranges (read by `load_sharded`), then all-gather the parameters."""
        for part in self.parts:
            span = slice(part.at, part.at + part.stop - part.start)
            part.segment[span].copy_(tensors[f"model/{part.name}"])
            prefix = f"optim/{part.name}/"
            saved = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not saved:
                continue
            state = self.state[part.segment]
            for key, value in saved.items():
                if value.dim() == 0:
                    # AdamW keeps its 0-dim `step` on the CPU, as a float tensor.
                    state[key] = value.clone()
                else:
                    if key not in state:
                        state[key] = torch.zeros_like(part.segment)
                    state[key][span].copy_(value)
        self.ddp.gather_params()


class ShardedAdamW(ShardedOptimizer, torch.optim.AdamW):
    """torch.optim.AdamW over this dp rank's shard of every bucket of `ddp` (built with
    shard=True). `groups` are the model's parameter groups (model.param_groups): each element
    gets the weight decay of its parameter's group. `step()` updates the shard, then
    all-gathers the parameters over dp."""

    def __init__(self, model: nn.Module, ddp: DataParallel, groups: list[dict], **adamw):
        torch.optim.AdamW.__init__(self, self._shard(model, ddp, groups), **adamw)

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self.ddp.gather_params()
        return loss


class ShardedMuon(ShardedOptimizer, Muon):
    """Muon under ZeRO-1 (`optim.name muon`, `parallel.zero 1`): each hidden matrix is
    orthogonalised by one dp rank, its owner (`muon.assign_owners`, as without ZeRO), which
    alone keeps its momentum; the AdamW groups update this rank's segments, as ShardedAdamW.

    A step: the reduce-scatter left each rank the averaged gradient of its flat ranges. One
    all-to-all sends each range of a hidden matrix to the matrix's owner, which assembles the
    whole gradient, updates the momentum and orthogonalises (under tp the whole matrix,
    gathered over tp as Muon does); the same all-to-all reversed brings every range's update
    back to the rank holding that range, which applies it to its range of the parameters;
    `DataParallel.gather_params` then all-gathers the parameters. The arithmetic is Muon's,
    element for element: only the order in which the gradients were summed over dp differs.
    Per rank the two all-to-alls move (dp-1)/dp of the hidden matrices each way, where Muon at
    zero 0 all-gathers its updates once (and all-reduces instead of reduce-scattering).
    `groups` come from `muon.param_groups`; `muon` are Muon's keyword arguments."""

    def __init__(self, model: nn.Module, ddp: DataParallel, groups: list[dict], **muon):
        sharded = self._shard(model, ddp, groups)
        for group, shard in zip(groups, sharded, strict=True):
            if group["muon"]:
                shard["params"] = list(group["params"])  # whole: every rank knows every matrix
        Muon.__init__(self, sharded, comm=ddp.comm, **muon)
        matrices = [p for g in groups if g["muon"] for p in g["params"]]
        owners = assign_owners([p.numel() for p in matrices], ddp.comm.size)
        self._owner = {id(p): o for p, o in zip(matrices, owners, strict=True)}
        self._matrix = {n: p for n, p in model.named_parameters() if id(p) in self._owner}
        self._name = {id(p): n for n, p in self._matrix.items()}
        # Each matrix's range (start, stop) on every dp rank: the buckets are alike everywhere.
        self._spans: dict[int, list[tuple[int, int]]] = {}
        for bucket in ddp.buckets:
            for p, offset in zip(bucket.params, bucket.offsets, strict=True):
                if id(p) in self._owner:
                    self._spans[id(p)] = [
                        (max(lo, offset) - offset, max(min(hi, offset + p.numel()) - offset, 0))
                        for lo, hi in (
                            bucket.shard_range(r, ddp.comm.size) for r in range(ddp.comm.size)
                        )
                    ]

    @torch.no_grad()
    def step(self, closure=None):
        Muon.step(self, closure)
        self.ddp.gather_params()

    def _muon_group(self, group: dict) -> None:
        params = group["params"]
        if not params:
            return
        comm, rank = self.comm, self.comm.rank
        # Every rank's ranges, ordered by the owner they go to, then as the group lists them.
        by_owner = sorted(range(len(params)), key=lambda i: self._owner[id(params[i])])
        mine = [i for i in by_owner if self._owner[id(params[i])] == rank]

        def length(i: int, r: int) -> int:
            start, stop = self._spans[id(params[i])][r]
            return max(stop - start, 0)

        send_counts = [
            sum(length(i, rank) for i in by_owner if self._owner[id(params[i])] == o)
            for o in range(comm.size)
        ]
        recv_counts = [sum(length(i, r) for i in mine) for r in range(comm.size)]
        ranges = [self._range(params[i]) for i in by_owner]
        device = params[0].device
        pieces = [torch.zeros(0, device=device)]
        for segment, a, b in ranges:
            if b > a:
                assert segment.grad is not None  # the rank's averaged gradient shard
                pieces.append(segment.grad[a:b])
        sent = torch.cat(pieces)
        received = comm.alltoallv(
            sent, send_counts, torch.empty(sum(recv_counts), device=device), recv_counts
        )
        # The owner: whole averaged gradients, momentum, orthogonalised updates.
        grads = [torch.empty(params[i].numel(), device=device) for i in mine]
        at = 0
        for r in range(comm.size):
            for grad, i in zip(grads, mine, strict=True):
                start, stop = self._spans[id(params[i])][r]
                if stop > start:
                    grad[start:stop] = received[at : at + stop - start]
                    at += stop - start
        directions = [
            self._momentum_direction(params[i], group, g.view_as(params[i]))
            for i, g in zip(mine, grads, strict=True)
        ]
        if self.tp_comm is not None:
            directions = self._whole_matrices([params[i] for i in mine], directions)
        updates = []
        for i, d in zip(mine, directions, strict=True):
            update = orthogonalize(d, group["ns_steps"], self.ns_dtype)
            placement = placement_of(params[i])
            if self.tp_comm is not None and placement is not None:
                update = local_slice(update, placement, params[i].shape)
            updates.append(update.reshape(-1))
        # Back to the ranges' holders: the same layout, the other way.
        at = 0
        for r in range(comm.size):
            for update, i in zip(updates, mine, strict=True):
                start, stop = self._spans[id(params[i])][r]
                if stop > start:
                    received[at : at + stop - start] = update[start:stop]
                    at += stop - start
        comm.alltoallv(received, recv_counts, sent, send_counts)
        at = 0
        for i, (segment, a, b) in zip(by_owner, ranges, strict=True):
            if b > a:
                # As Muon's: by the whole matrix's shape (gathered over tp where it is sliced).
                placement = placement_of(params[i])
                whole = (
                    params[i].shape
                    if self.tp_comm is None or placement is None
                    else placement.shape
                )
                scale = update_scale(whole)
                segment[a:b].mul_(1 - group["lr"] * group["weight_decay"])
                segment[a:b].add_(
                    sent[at : at + b - a].to(segment.dtype), alpha=-group["lr"] * scale
                )
                at += b - a

    def _range(self, p: nn.Parameter) -> tuple[torch.Tensor, int, int]:
        """(segment, start, stop): where this rank holds its range of `p` in a segment."""
        parts = self._parts_of.get(self._name[id(p)])
        if not parts:
            return p, 0, 0
        (part,) = parts
        return part.segment, part.at, part.at + part.stop - part.start

    # -- checkpoints: the momentum of an owned matrix is written whole, by its owner --------

    def owned_pieces(self, tp_rank: int = 0) -> list[Piece]:
        pieces = super().owned_pieces(tp_rank)
        for name, p in self._matrix.items():
            if self.state.get(p):
                whole = Part(name, p, 0, p.numel(), p, 0)
                items = [(k, v.reshape(-1)) for k, v in self.state[p].items()]
                pieces += self._pieces(whole, items, tp_rank)
        return pieces

    def owned_runs(self, name: str, shape: list[int]) -> tuple[tuple[int, ...], list[Run]] | None:
        kind, param = name.split("/")[:2]
        p = self._matrix.get(param)
        if kind != "optim" or p is None:
            return super().owned_runs(name, shape)
        if self._owner[id(p)] != self.comm.rank:
            return None
        return (p.numel(),), self._runs(Part(param, p, 0, p.numel(), p, 0), placement_of(p))

    @torch.no_grad()
    def load_owned(self, tensors: dict[str, torch.Tensor]) -> None:
        rest = {}
        for key, value in tensors.items():
            kind, param, *state_key = key.split("/")
            p = self._matrix.get(param)
            if kind == "optim" and p is not None:
                self.state[p][state_key[-1]] = torch.zeros_like(p, dtype=torch.float32).copy_(
                    value.view(p.shape)
                )
            else:
                rest[key] = value
        super().load_owned(rest)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensor state the optimizer holds on this rank (moments and step counters)."""
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )
