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

Nodes cut across the grid: `Grid.node_comms(axis)` splits one axis's group into the ranks that
share a node (`Split_type(COMM_TYPE_SHARED)`) and, across nodes, the ranks with the same index
on their node. With dp 4 on 2 nodes of 2 ranks each (dp ranks 0,1 on node A, 2,3 on node B):
local groups [0,1] [2,3], cross-node groups [0,2] [1,3]. `node_layout` is the arithmetic.
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
        shown = " ".join(_ranks(g, max_groups) for g in groups[:max_groups])
        more = f" ... ({len(groups)} groups)" if len(groups) > max_groups else ""
        lines.append(f"  {axis} groups (size {dims[axis]}): {shown}{more}")
    return "\n".join(lines)


def _ranks(group: list[int], max_ranks: int) -> str:
    """A group's ranks, the first and last few of a long one (a line stays readable)."""
    if len(group) <= 2 * max_ranks:
        return "[" + ",".join(map(str, group)) + "]"
    head, tail = ",".join(map(str, group[:max_ranks])), ",".join(map(str, group[-2:]))
    return f"[{head},...,{tail}]"


@dataclass
class NodeLayout:
    """How one group's ranks sit on nodes: `num_nodes` nodes with `local_size` ranks each, or
    `reason` why a two-level (node, then across nodes) collective cannot or need not be used."""

    num_nodes: int
    local_size: int
    reason: str | None = None


def node_layout(nodes: list[int]) -> NodeLayout:
    """The layout of a group from the node of each of its ranks (`nodes[r]`: any id of rank r's
    node, the same for ranks on one node). Two levels need at least two nodes, more than one rank
    on each, and the same number on every node: else `reason` says which fails."""
    counts: dict[int, int] = {}
    for node in nodes:
        counts[node] = counts.get(node, 0) + 1
    sizes = sorted(set(counts.values()))
    if len(sizes) > 1:
        per_node = ", ".join(
            f"{n} on the node of rank {nodes.index(node)}" for node, n in counts.items()
        )
        return NodeLayout(
            len(counts),
            0,
            f"uneven nodes: the group's ranks per node differ ({per_node}); two levels need the "
            "same number of the group's ranks on every node (launch with --map-by ppr:K:node)",
        )
    layout = NodeLayout(len(counts), sizes[0])
    if layout.num_nodes == 1:
        layout.reason = f"all {layout.local_size} ranks of the group are on one node"
    elif layout.local_size == 1:
        layout.reason = f"one rank of the group per node ({layout.num_nodes} nodes)"
    return layout


@dataclass
class NodeComms:
    """One group's communicators on two levels: `local` holds its ranks on this rank's node,
    `cross` the ranks with the same local index on the other nodes (None when `layout.reason`
    says two levels do not apply). The caller frees them."""

    local: MPI.Comm
    cross: MPI.Comm | None
    layout: NodeLayout

    def free(self) -> None:
        self.local.Free()
        if self.cross is not None:
            self.cross.Free()


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

    def node_comms(self, axis: str = "dp", colour: int | None = None) -> NodeComms:
        """This rank's group along `axis` split by node (collective over the group).

        Nodes are what MPI calls shared memory (`Split_type(COMM_TYPE_SHARED)`), or, given
        `colour`, the ranks passing the same colour: tests emulate nodes on one host that way.
        """
        from mpi4py import MPI

        comm = self.comms[axis]
        rank = comm.Get_rank()
        if colour is None:
            local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        else:
            local = comm.Split(colour, key=rank)
        # A node's id: the lowest group rank on it; every rank learns every rank's node.
        layout = node_layout(comm.allgather(local.allreduce(rank, op=MPI.MIN)))
        # Every rank computed the same layout, so all of them split, or none.
        cross = comm.Split(local.Get_rank(), key=rank) if layout.reason is None else None
        return NodeComms(local, cross, layout)

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
