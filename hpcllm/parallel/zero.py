"""ZeRO-1: AdamW state sharded over the dp ranks (`parallel.zero 1`).

`DataParallel(..., shard=True)` pads every gradient bucket to a multiple of dp, reduce-scatters
it while backward runs, and makes the parameters views into one flat buffer per bucket. Dp
rank r owns the r-th contiguous 1/dp of each bucket. `ShardedAdamW` is torch's own AdamW run
over only those owned ranges: each owned range is cut into segments at the boundaries between
weight-decay classes (a segment is a view into the parameter buffer, its `.grad` a view into
the rank's averaged gradient shard), so its arithmetic is torch.optim.AdamW's, element for
element, and the moments exist for 1/dp of the model on each rank. After the update,
`DataParallel.gather_params` all-gathers the ranges so every rank holds the whole model again
before the next forward.

For checkpoints, a segment is described per parameter (`Part`): which flat range of which
parameter it holds. A rank writes, and on load reads, exactly those ranges of the parameters
and of their optimizer state (`owned_pieces`, `owned_runs`, `load_owned`); `hpcllm.checkpoint`
stores them as flat-range pieces of the global tensors, so any other layout can read them.

Under tensor parallelism each tp rank has its own DataParallel over its local (tp-sliced)
parameters, so its buckets, shards and flat ranges are those of the local tensors; a range
of a tp-sliced parameter is stored as the boxes of the global tensor that hold it
(`checkpoint_index.placed_runs`), and a parameter replicated over tp by tp rank 0 only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from hpcllm import checkpoint_index as index
from hpcllm.parallel.data_parallel import DataParallel
from hpcllm.parallel.tied import is_stage_replica

# (global tensor name, its global shape, the region of it, the tensor holding that region)
Piece = tuple[str, list[int], index.Region, torch.Tensor]
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


class ShardedAdamW(torch.optim.AdamW):
    """torch.optim.AdamW over this dp rank's shard of every bucket of `ddp` (built with
    shard=True). `groups` are the model's parameter groups (model.param_groups): each element
    gets the weight decay of its parameter's group. `step()` updates the shard, then
    all-gathers the parameters over dp."""

    def __init__(self, model: nn.Module, ddp: DataParallel, groups: list[dict], **adamw):
        if not ddp.shard:
            raise ValueError("ShardedAdamW needs DataParallel(..., shard=True)")
        self.ddp = ddp
        names = {id(p): n for n, p in model.named_parameters()}
        group_of = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
        segments: list[list[torch.Tensor]] = [[] for _ in groups]
        self.parts: list[Part] = []
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
        param_groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": segs}
            for g, segs in zip(groups, segments, strict=True)
        ]
        super().__init__(param_groups, **adamw)
        self._parts_of: dict[str, list[Part]] = {}
        for part in self.parts:
            self._parts_of.setdefault(part.name, []).append(part)

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self.ddp.gather_params()
        return loss

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
            placement = index.placement_of(part.param)
            if (placement is None and tp_rank != 0) or is_stage_replica(part.param):
                # replicated over tp: tp rank 0's dp ranks write it; a tied weight's last-stage
                # copy: the first stage's
                continue
            shape = list(part.param.shape if placement is None else placement.shape)
            for key, value in [("", part.segment), *self.state.get(part.segment, {}).items()]:
                name = f"optim/{part.name}/{key}" if key else f"model/{part.name}"
                if value.dim() == 0:
                    if part.start == 0 and tp_rank == 0:
                        # Parameters of one segment share its counter; safetensors wants copies.
                        pieces.append((name, [], index.whole(()), value.clone()))
                    continue
                for at, stop, region in self._runs(part, placement):
                    tensor = value[part.at + at : part.at + stop]
                    if isinstance(region, index.Box):
                        tensor = tensor.view(region.length)
                    pieces.append((name, shape, region, tensor))
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

    @torch.no_grad()
    def load_owned(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore this rank's ranges (read by `owned_runs`), then all-gather the parameters."""
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


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensor state the optimizer holds on this rank (moments and step counters)."""
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )
