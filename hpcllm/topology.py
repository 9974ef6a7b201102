"""The rank grid: the one place that knows which rank does what.

The world is laid out as a Cartesian grid with axes (pp, dp, tp), row-major, so
tp varies fastest (neighbouring ranks, usually one node, share a tensor-parallel
group), then dp, and pp slowest. A worked example, 16 ranks with pp=2, dp=4, tp=2:

    rank = (pp_index * dp + dp_index) * tp + tp_index

    tp groups: [0,1] [2,3] [4,5] ... [14,15]            (8 groups of 2)
    dp groups: [0,2,4,6] [1,3,5,7] [8,10,12,14] [9,11,13,15]
    pp groups: [0,8] [1,9] [2,10] ... [7,15]             (8 pipelines of 2 stages)

The arithmetic is pure functions (testable for any world size without MPI);
`Grid.build` turns it into MPI communicators with `Create_cart` + `Sub`, and a
check that MPI agrees with the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the grid arithmetic (and --dry-run) works without MPI
    from mpi4py import MPI

AXES = ("pp", "dp", "tp")


class LayoutError(ValueError):
    """The requested parallel layout does not fit the world."""


def resolve_dims(world_size: int, *, dp: int = 0, pp: int = 1, tp: int = 1) -> dict[str, int]:
    """Sizes of each axis; dp=0 means "whatever is left". The product must be the world size."""
    if dp == 0:
        if world_size % (pp * tp):
            raise LayoutError(
                f"world size {world_size} is not divisible by pp={pp} x tp={tp} = {pp * tp}; "
                f"choose parallel.pp and parallel.tp whose product divides {world_size}"
            )
        dp = world_size // (pp * tp)
    dims = {"pp": pp, "dp": dp, "tp": tp}
    if prod(dims.values()) != world_size:
        raise LayoutError(
            f"layout pp={pp} x dp={dp} x tp={tp} = {pp * dp * tp} ranks, "
            f"but the world has {world_size}; the product of the axes must equal the world size"
        )
    return dims


def coords_of(rank: int, dims: dict[str, int]) -> dict[str, int]:
    """Grid coordinates of `rank` (row-major over AXES)."""
    coords = {}
    for axis in reversed(AXES):
        rank, coords[axis] = divmod(rank, dims[axis])
    return {axis: coords[axis] for axis in AXES}


def rank_of(coords: dict[str, int], dims: dict[str, int]) -> int:
    rank = 0
    for axis in AXES:
        rank = rank * dims[axis] + coords[axis]
    return rank


def group_ranks(axis: str, dims: dict[str, int]) -> list[list[int]]:
    """All groups along `axis`: ranks that differ only in their `axis` coordinate."""
    world = prod(dims.values())
    groups: dict[tuple, list[int]] = {}
    for rank in range(world):
        c = coords_of(rank, dims)
        key = tuple(c[a] for a in AXES if a != axis)
        groups.setdefault(key, []).append(rank)
    return list(groups.values())


def describe(dims: dict[str, int], max_groups: int = 8) -> str:
    """A human-readable layout, as printed by --dry-run and at start-up."""
    world = prod(dims.values())
    lines = [f"world {world} = pp {dims['pp']} x dp {dims['dp']} x tp {dims['tp']}"]
    for axis in AXES:
        groups = group_ranks(axis, dims)
        shown = " ".join("[" + ",".join(map(str, g)) + "]" for g in groups[:max_groups])
        more = f" ... ({len(groups)} groups)" if len(groups) > max_groups else ""
        lines.append(f"  {axis} groups (size {dims[axis]}): {shown}{more}")
    return "\n".join(lines)


@dataclass
class Grid:
    """This rank's place in the grid and its named communicators.

    `comm(axis)` returns the communicator of this rank's group along that axis;
    `rank(axis)` / `size(axis)` give its index and size there. Pipeline neighbours
    are ranks within the pp communicator, or None at the ends of the pipeline.
    """

    dims: dict[str, int]
    world: MPI.Comm
    cart: MPI.Cartcomm
    comms: dict[str, MPI.Cartcomm]
    coords: dict[str, int]

    @classmethod
    def build(cls, world, *, dp: int = 0, pp: int = 1, tp: int = 1) -> Grid:
        dims = resolve_dims(world.Get_size(), dp=dp, pp=pp, tp=tp)
        # reorder=False keeps cart ranks equal to world ranks, so the layout in the
        # docstring (and in checkpoints and logs) is the real one.
        cart = world.Create_cart(
            [dims[a] for a in AXES], periods=[False] * len(AXES), reorder=False
        )
        coords = dict(zip(AXES, cart.Get_coords(cart.Get_rank()), strict=True))
        assert coords == coords_of(world.Get_rank(), dims), (
            "MPI's Cartesian layout differs from coords_of"
        )
        comms = {axis: cart.Sub([a == axis for a in AXES]) for axis in AXES}
        return cls(dims=dims, world=world, cart=cart, comms=comms, coords=coords)

    def comm(self, axis: str):
        return self.comms[axis]

    def rank(self, axis: str) -> int:
        return self.coords[axis]

    def size(self, axis: str) -> int:
        return self.dims[axis]

    @property
    def pp_prev(self) -> int | None:
        """The previous pipeline stage's rank in the pp communicator, or None on the first stage."""
        return self.coords["pp"] - 1 if self.coords["pp"] > 0 else None

    @property
    def pp_next(self) -> int | None:
        """The next pipeline stage's rank in the pp communicator, or None on the last stage."""
        return self.coords["pp"] + 1 if self.coords["pp"] < self.dims["pp"] - 1 else None

    @property
    def is_first_stage(self) -> bool:
        return self.coords["pp"] == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coords["pp"] == self.dims["pp"] - 1

    def free(self) -> None:
        for c in self.comms.values():
            c.Free()
        self.cart.Free()
