"""The tensor index of a sharded checkpoint: which file holds which region of which tensor.

meta.json's "tensors" maps each global tensor name to an entry

    {"shape": [257, 128], "dtype": "float32", "pieces": [piece, ...]}

and each piece names the safetensors file and key that hold one region of the tensor:

    {"file": "model-pp0-dp0-tp0.safetensors", "key": "model/wte.weight",
     "offset": [0, 0], "length": [257, 128]}        a box: per dim, where it starts and how long
    {"file": ..., "key": ..., "flat": [0, 16448]}   elements [start, stop) of the tensor
                                                     flattened in row-major order

A box piece is stored with shape `length`, a flat piece as a 1-D tensor. A replicated
tensor is one piece, a whole box. A tensor-parallel shard is one box or several (its
`Placement`: the fused qkv weight of a rank's heads is three boxes, its q, k and v rows).
ZeRO-1 writes flat ranges of the parameters and their optimizer state; under tensor
parallelism these are flat ranges of a rank's local (tp-sliced) tensors, written as the
boxes of the global tensor that hold them (`placed_runs`: at most a partial row, whole rows
and a partial row per placement part). `read` assembles any requested region from whichever
pieces overlap it, so none of these needs a format change, and a rank reads only what
overlaps the region it asks for (safetensors reads a slice without loading the rest of the
file).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from math import prod

import torch


@dataclass(frozen=True)
class Box:
    """`length[d]` elements from `offset[d]` along every dim d."""

    offset: tuple[int, ...]
    length: tuple[int, ...]


@dataclass(frozen=True)
class Flat:
    """Elements [start, stop) of the row-major flattened tensor."""

    start: int
    stop: int


Region = Box | Flat
# (file, key) -> something indexable with a tuple of slices: safetensors' get_slice(), or a tensor.
GetSlice = Callable[[str, str], object]


def whole(shape: Sequence[int]) -> Box:
    """The box covering a tensor of `shape`."""
    return Box((0,) * len(shape), tuple(shape))


def entry(tensor: torch.Tensor, pieces: list[dict], shape: Sequence[int] | None = None) -> dict:
    """The index entry of a tensor: its global `shape` (by default `tensor`'s) and dtype."""
    return {
        "shape": list(tensor.shape if shape is None else shape),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "pieces": pieces,
    }


@dataclass(frozen=True)
class Placement:
    """Where a rank's local part of a sharded tensor sits in the global tensor.

    `parts` pairs a run of the local tensor along `dim`, [start, stop), with the box of the
    global tensor (of shape `shape`) that it holds. Local elements in no part (a vocabulary's
    padding rows) belong to no global element: they are neither saved nor loaded.
    """

    shape: tuple[int, ...]
    dim: int
    parts: tuple[tuple[int, int, Box], ...]


def flat_boxes(shape: Sequence[int], start: int, stop: int) -> list[Box]:
    """Elements [start, stop) of a tensor of `shape`, flattened in row-major order, as the
    boxes that hold them, in order: a partial row, whole rows, a partial row (recursively
    inside a row), so their flattened contents laid end to end are the range."""
    if start >= stop:
        return []
    if not shape:
        return [whole(())]
    row = prod(shape[1:])
    inner = list(shape[1:])

    def in_row(r: int, a: int, b: int) -> list[Box]:
        return [Box((r, *box.offset), (1, *box.length)) for box in flat_boxes(inner, a, b)]

    first, last = start // row, (stop - 1) // row
    if first == last:
        return in_row(first, start - first * row, stop - first * row)
    boxes = in_row(first, start % row, row) if start % row else []
    lo, hi = -(-start // row), stop // row  # the whole rows
    if lo < hi:
        boxes.append(Box((lo, *(0,) * len(inner)), (hi - lo, *inner)))
    return boxes + (in_row(hi, 0, stop % row) if stop % row else [])


def placed_runs(
    placement: Placement, local_shape: Sequence[int], start: int, stop: int
) -> list[tuple[int, int, Box]]:
    """Elements [start, stop) of a rank's flattened local tensor with `placement` as boxes
    of the global tensor: (local start, local stop, box) per box, in order. Local elements
    in no part (padding) are in no run. ZeRO-1 under tensor parallelism cuts its flat
    ranges out of the local tensors; this is how they are written to and read from the
    index, as ordinary boxes.

    Each part must be a contiguous run of the flattened local tensor: a cut along dim 0, or
    one part covering the whole local tensor (a row-parallel weight's columns).
    """
    runs = []
    row = prod(local_shape[placement.dim + 1 :])
    for first, last, box in placement.parts:
        if placement.dim == 0:
            lo, hi = first * row, last * row
        else:
            assert len(placement.parts) == 1 and (first, last) == (0, local_shape[placement.dim])
            lo, hi = 0, prod(local_shape)
        a, b = max(start, lo), min(stop, hi)
        for sub in flat_boxes(box.length, a - lo, b - lo):
            offset = tuple(o + s for o, s in zip(box.offset, sub.offset, strict=True))
            runs.append((a, a + prod(sub.length), Box(offset, sub.length)))
            a += prod(sub.length)
    return runs


def placement_of(tensor: torch.Tensor) -> Placement | None:
    """The placement of a sharded parameter, or None for a whole (replicated) one."""
    return getattr(tensor, "placement", None)


def set_placement(tensor: torch.Tensor, placement: Placement) -> None:
    """Mark `tensor` (a parameter) as the local part `placement` of a sharded global tensor."""
    tensor.placement = placement  # type: ignore[attr-defined]  # read back by placement_of


def piece(file: str, key: str, region: Region) -> dict:
    """One index piece: `file`'s tensor `key` holds `region` of the global tensor."""
    if isinstance(region, Flat):
        return {"file": file, "key": key, "flat": [region.start, region.stop]}
    return {"file": file, "key": key, "offset": list(region.offset), "length": list(region.length)}


def files_of(entry: dict, region: Region) -> set[str]:
    """The files holding some part of `region` of the tensor described by `entry`."""
    shape = tuple(entry["shape"])
    box, flat = _as_box(shape, region), _as_flat(shape, region)
    span = Box((flat.start,), (flat.stop - flat.start,))
    return {
        p["file"]
        for p in entry["pieces"]
        if (_box_overlap(_as_1d(p), span) if "flat" in p else _box_overlap(p, box)) is not None
    }


def check_tiling(shape: list, pieces: list[dict]) -> list[int]:
    """The number of elements of each piece, once they are known to tile a tensor of `shape`
    exactly: inside it, and together every element once (ValueError otherwise: a gap, an
    overlap, a piece out of bounds). Pieces are boxes or flat ranges, not both."""
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"shape {shape} is not a list of sizes")
    numel = prod(shape)
    if all("flat" in p for p in pieces):
        spans = sorted(_ints(p["flat"], 2) for p in pieces)
        if any(not 0 <= a <= b <= numel for a, b in spans):
            raise ValueError(f"a flat piece lies outside the tensor's {numel} elements")
        if any(b > c for (_, b), (c, _) in pairwise(spans)):
            raise ValueError("two flat pieces overlap")
        volumes = [b - a for a, b in (_ints(p["flat"], 2) for p in pieces)]
    elif not any("flat" in p for p in pieces):
        boxes = [(_ints(p["offset"], len(shape)), _ints(p["length"], len(shape))) for p in pieces]
        for offset, length in boxes:
            if any(
                o < 0 or n < 0 or o + n > s for o, n, s in zip(offset, length, shape, strict=True)
            ):
                raise ValueError(f"a piece at {offset} of {length} lies outside shape {shape}")
        for k, (offset, length) in enumerate(boxes):
            for other, other_length in boxes[k + 1 :]:
                if (
                    prod(length)
                    and prod(other_length)
                    and all(
                        o < p + m and p < o + n
                        for o, n, p, m in zip(offset, length, other, other_length, strict=True)
                    )
                ):
                    raise ValueError(f"pieces at {offset} and {other} overlap")
        volumes = [prod(length) for _, length in boxes]
    else:
        raise ValueError("its pieces mix boxes and flat ranges")
    if sum(volumes) != numel:
        raise ValueError(f"its pieces hold {sum(volumes)} of its {numel} elements")
    return volumes


def _ints(values, count: int) -> list[int]:
    if len(values) != count or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(f"{values} is not {count} integer(s)")
    return list(values)


def read(entry: dict, region: Region, get: GetSlice) -> torch.Tensor:
    """`region` of the tensor described by `entry`, read from the pieces that overlap it.

    A box comes back with shape `region.length`, a flat range as a 1-D tensor. Mixed
    requests (a box from flat pieces, or a flat range from boxes) go through the smallest
    run of whole rows along dim 0 that contains the request, which is both a box and a
    contiguous flat range.
    """
    shape, dtype = tuple(entry["shape"]), getattr(torch, entry["dtype"])
    pieces = entry["pieces"]
    if isinstance(region, Box) and not any("flat" in p for p in pieces):
        return _box_from_boxes(shape, dtype, pieces, region, get)
    if isinstance(region, Flat) and all("flat" in p for p in pieces):
        return _flat_from_flats(shape, dtype, pieces, region, get)
    rows = _rows_around(shape, region)
    span = _as_flat(shape, rows)
    if isinstance(region, Box):
        inner = tuple(
            slice(o - r, o - r + n)
            for o, r, n in zip(region.offset, rows.offset, region.length, strict=True)
        )
        return _flat_from_flats(shape, dtype, pieces, span, get).reshape(rows.length)[inner]
    block = _box_from_boxes(shape, dtype, pieces, rows, get).reshape(-1)
    return block[region.start - span.start : region.stop - span.start]


def _rows_around(shape: tuple[int, ...], region: Region) -> Box:
    """The whole rows (along dim 0) that contain `region`."""
    if not shape:
        return whole(shape)
    if isinstance(region, Box):
        first, stop = region.offset[0], region.offset[0] + region.length[0]
    else:
        row = prod(shape[1:])
        first, stop = region.start // row, -(-region.stop // row)
    return Box((first, *(0,) * (len(shape) - 1)), (stop - first, *shape[1:]))


def _as_box(shape: tuple[int, ...], region: Region) -> Box:
    return region if isinstance(region, Box) else _rows_around(shape, region)


def _as_flat(shape: tuple[int, ...], region: Region) -> Flat:
    if isinstance(region, Flat):
        return region
    rows = _rows_around(shape, region)
    start = rows.offset[0] * prod(shape[1:]) if shape else 0
    return Flat(start, start + prod(rows.length))


def _box_overlap(p: dict, box: Box) -> tuple[list[int], list[int]] | None:
    lo = [max(a, b) for a, b in zip(box.offset, p["offset"], strict=True)]
    hi = [
        min(a + n, b + m)
        for a, n, b, m in zip(box.offset, box.length, p["offset"], p["length"], strict=True)
    ]
    return None if any(h <= low for low, h in zip(lo, hi, strict=True)) else (lo, hi)


def _as_1d(p: dict) -> dict:
    """A flat piece as a box piece of the flattened tensor, so one routine reads both."""
    start, stop = p["flat"]
    return {**p, "offset": [start], "length": [stop - start]}


def _box_from_boxes(shape, dtype, pieces, box: Box, get: GetSlice) -> torch.Tensor:
    out = torch.empty(box.length, dtype=dtype)
    covered = 0
    for p in pieces:
        overlap = _box_overlap(p, box)
        if overlap is None:
            continue
        lo, hi = overlap
        src = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, p["offset"], strict=True))
        dst = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, box.offset, strict=True))
        stored = get(p["file"], p["key"])
        _check_stored(stored, p, dtype)
        out[dst] = stored[src]  # type: ignore[index]  # a slice or a tensor
        covered += prod(b - a for a, b in zip(lo, hi, strict=True))
    # Pieces never overlap (one writer per region), so counting elements is enough.
    if covered != prod(box.length):
        files = sorted({p["file"] for p in pieces})
        raise ValueError(
            f"the index's pieces in {files} cover {covered} of the {prod(box.length)} elements "
            f"of {box} (the tensor's shape is {list(shape)})"
        )
    return out


# safetensors' names of the dtypes a checkpoint may hold.
_STORED_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _check_stored(stored, p: dict, dtype: torch.dtype) -> None:
    """The file's own header must agree with the index on a piece's shape and dtype: no
    silent cast, no garbage from a shorter tensor."""
    if hasattr(stored, "get_shape"):  # a safetensors slice: its header, nothing read yet
        shape, kind = list(stored.get_shape()), _STORED_DTYPES.get(stored.get_dtype())
    else:
        shape, kind = list(stored.shape), stored.dtype
    if shape != list(p["length"]) or kind != dtype:
        raise ValueError(
            f"{p['file']}: {p['key']} holds {kind} {shape}, the index says {dtype} {p['length']}"
        )


def _flat_from_flats(shape, dtype, pieces, flat: Flat, get: GetSlice) -> torch.Tensor:
    span = Box((flat.start,), (flat.stop - flat.start,))
    return _box_from_boxes(shape, dtype, [_as_1d(p) for p in pieces], span, get)
