"""What a checkpoint asks of the parts of a rank's state: the pieces they hold, and a reader.

Every stateful part of training (the model, the optimizer, a gradient reducer's state, local
SGD's outer state, the loader, the step) is a `Stateful`: it declares the `Piece`s of global
tensors it holds on this rank, and loads itself from a `Reader` that gives it any region of
any tensor of the checkpoint, whatever layout wrote it. The checkpointer writes and reads only
pieces and files (hpcllm/checkpoint/__init__.py); what a piece means, who holds it and what to
do when the checkpoint lacks it is the part's own business.

A piece is a region of a global tensor (`index.Box`, or `index.Flat`: a range of the
flattened tensor) held in a local tensor. A piece held alike by several ranks (dp replicas,
tp replicas, the last stage's copy of a tied embedding) is a replica on all of them but one,
which writes it; together the written pieces of a tensor tile it exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from hpcllm.checkpoint import index
from hpcllm.checkpoint.index import Placement, Region


class CheckpointError(ValueError):
    """A damaged or foreign checkpoint; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Piece:
    """`region` of the global tensor `name` (of global `shape`) is `tensor` on this rank:
    shaped `region.length` for a box, 1-D for a flat range."""

    name: str
    shape: tuple[int, ...]
    region: Region
    tensor: torch.Tensor
    # Another rank writes the same region: this one does not.
    replica: bool = False
    # The file it goes to on this rank, `<file>-pp{p}-dp{d}-tp{t}.safetensors`.
    file: str = "model"


class Stateful(Protocol):
    """A part of a rank's state, as checkpoints see it."""

    def sharded_state(self) -> list[Piece]:
        """The pieces this rank holds (replicas included, marked as such)."""
        ...

    def record(self) -> dict:
        """Small JSON state for meta.json (rank 0's is kept): the loader position, the step."""
        ...

    def load_sharded(self, reader: Reader) -> Callable[[], None]:
        """Read what this part needs from `reader` and return the function that applies it.
        It changes nothing itself: a checkpoint found damaged on any rank is not applied."""
        ...


def whole(name: str, tensor: torch.Tensor, *, replica: bool = False, file: str = "model") -> Piece:
    """`tensor`, all of global tensor `name`."""
    return Piece(name, tuple(tensor.shape), index.whole(tensor.shape), tensor, replica, file)


def placed(
    name: str,
    tensor: torch.Tensor,
    placement: Placement | None,
    *,
    replica: bool = False,
    file: str = "model",
) -> list[Piece]:
    """The pieces of local tensor `tensor` of global tensor `name`: one whole piece without a
    placement, else a box per placement part (padding rows are in none)."""
    if placement is None:
        return [whole(name, tensor, replica=replica, file=file)]
    return [
        # A copy: safetensors refuses tensors that share memory.
        Piece(
            name,
            placement.shape,
            box,
            tensor.detach().narrow(placement.dim, start, stop - start).clone(),
            replica,
            file,
        )
        for start, stop, box in placement.parts
    ]


class Reader:
    """Regions of a checkpoint's tensors, read through `read(name, entry, region)` (the
    checkpointer's files) from checkpoint `folder`, with its meta.json as `meta`; `where` (that
    file's path) starts the messages of the CheckpointErrors it and the parts raise."""

    def __init__(
        self, folder: Path, meta: dict, read: Callable[[str, dict, Region | None], torch.Tensor]
    ):
        self.folder = folder
        self.where = str(folder / "meta.json")
        self.meta = meta
        self.tensors: dict[str, dict] = meta["tensors"]
        self._read = read

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def names(self, prefix: str) -> list[str]:
        """The checkpoint's tensor names that start with `prefix`."""
        return [k for k in self.tensors if k.startswith(prefix)]

    def read(self, name: str, region: Region | None = None) -> torch.Tensor:
        """`region` of tensor `name` (all of it by default)."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.where}: the index has no {name}")
        return self._read(name, self.tensors[name], region)

    def read_placed(
        self, name: str, placement: Placement | None, local_shape: tuple[int, ...]
    ) -> torch.Tensor:
        """A rank's local tensor of shape `local_shape` at `placement` (whole without one),
        zeros in the padding no part covers."""
        if placement is None:
            return self.read(name)
        local = torch.zeros(local_shape, dtype=getattr(torch, self.tensors[name]["dtype"]))
        for start, stop, box in placement.parts:
            local.narrow(placement.dim, start, stop - start).copy_(self.read(name, box))
        return local

    def read_runs(self, name: str, numel: int, runs: list[tuple[int, int, Region]]) -> torch.Tensor:
        """A flat local tensor of `numel` elements whose runs [start, stop) hold the global
        regions `runs` name (zeros elsewhere)."""
        local = torch.zeros(numel, dtype=getattr(torch, self.tensors[name]["dtype"]))
        for start, stop, region in runs:
            local[start:stop] = self.read(name, region).reshape(-1)
        return local
