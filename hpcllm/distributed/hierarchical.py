"""Hierarchical reduction: sum a buffer over a group that spans several nodes in two levels.

    1. reduce-scatter inside the node (shared memory): local rank i gets the node's sum of
       the i-th 1/local_size of the buffer;
    2. across nodes, among the ranks with the same local index: an all-reduce of that
       1/local_size, or under ZeRO-1 a reduce-scatter of it (each rank then holds the sum of
       the 1/dp it owns, and step 3 is skipped);
    3. all-gather inside the node: every rank has every chunk's total.

Only 1/local_size of the bytes crosses the slow link from each rank, and each node sends its
sum once instead of once per rank: with 2 ranks per node, a flat ring all-reduce moves twice
what the hierarchical one does between nodes. The sum is taken in another order than a flat
all-reduce's, so the two agree to fp32 rounding (exactly for sums that fp32 holds exactly).

One policy for the features that meet here: ZeRO-1 turns step 2 into a reduce-scatter and
drops step 3; bf16/fp16 compression (`compression.HalfSum`) applies to step 2 only, the phase
on the slow link: 16-bit chunks there, summed in fp32, while the node's own phases stay fp32
in shared memory. (PowerSGD is refused with parallel.allreduce hierarchical: its all-reduces
carry low-rank factors, already a small fraction of the gradient, and it keeps its own.)

ZeRO-1's dp rank r owns the r-th 1/dp of a bucket, but the two levels leave rank (node n,
local index i) with block i * num_nodes + n; the buffer's blocks are first put in that order
(one copy of the bucket), whatever the placement of dp ranks on nodes.

`HierarchicalWork` runs the phases as non-blocking MPI calls advanced by `test()`/`wait()`,
so DataParallel overlaps them with backward like a flat `Iallreduce`.
`select_allreduce` turns `parallel.allreduce` (flat, hierarchical, auto) into the reducer to use;
`auto` times both on a bucket-sized buffer at start-up and keeps the faster.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from mpi4py import MPI

from hpcllm.distributed.comm import TensorComm, Work
from hpcllm.distributed.compression import allreduce_wire_bytes, reduce_scatter_wire_bytes
from hpcllm.distributed.topology import Grid

if TYPE_CHECKING:
    from hpcllm.distributed.compression import HalfSum

MODES = ("flat", "hierarchical", "auto")


class HierarchicalAllreduce:
    """Two-level sum over the group that `local` (this node's ranks of it) and `cross` (the
    same local index on every node) split. `order[k]` is the group rank of the rank that the
    two levels leave with block k (ZeRO-1's reordering; None: no reduce-scatter form).
    Buffers must hold a multiple of `multiple` elements (DataParallel pads its buckets).

    Several sums may be in flight (one per bucket), each advancing when its ranks' test() find
    a phase done, which differs from rank to rank. MPI needs the collectives on a communicator
    started in the same order on every rank, so each phase has a communicator of its own
    (duplicates of `local` and `cross`) and a sum starts a phase only after every earlier sum
    has started it: in `start()` order everywhere.
    """

    def __init__(self, local: TensorComm, cross: TensorComm, order: list[int] | None = None):
        self.local, self.cross = local, cross
        self.gather = TensorComm(local.comm.Dup(), local.cuda_aware, name=local.name)
        # The compressed cross-node phase's all-gathers (its all-to-alls go on `cross`).
        self.cross_gather = TensorComm(cross.comm.Dup(), cross.cuda_aware, name=cross.name)
        self.multiple = local.size
        self.order = order
        self.started = [0, 0, 0, 0]  # how many sums have started each phase
        self.tickets = [0, 0, 0, 0]  # how many sums will start it (not every form has 4)
        self.pending: list[HierarchicalWork] = []  # started, not yet waited for, in order

    def start(
        self, buffer: torch.Tensor, shard: torch.Tensor | None = None, half: HalfSum | None = None
    ) -> HierarchicalWork:
        """Start summing the 1-d `buffer` in place, or with `shard` (ZeRO-1) only this rank's
        1/group of it into `shard`; `half` sends 16 bits across nodes. Complete it with the
        Work's wait()."""
        local, cross = self.local, self.cross
        multiple = local.size * cross.size if shard is not None else local.size
        if buffer.dim() != 1 or buffer.numel() % multiple:
            raise ValueError(
                f"hierarchical reduction: the buffer (shape {tuple(buffer.shape)}) must be flat "
                f"and a multiple of the {local.size} ranks per node"
                + (f" x {cross.size} nodes (ZeRO-1)" if shard is not None else "")
                + "; pad it"
            )
        nbytes = buffer.numel() * buffer.element_size()
        chunk = buffer.new_empty(buffer.numel() // local.size)

        def scatter_in_node() -> Work:
            blocks = buffer
            if shard is not None:
                assert self.order is not None, "built without the group's order"
                index = torch.tensor(self.order, device=buffer.device)
                blocks = buffer.view(len(self.order), -1).index_select(0, index).view(-1)
            # Not in place: Reduce_scatter_block's output would alias its input's slot.
            return local.ireduce_scatter(blocks, chunk)

        def gather_in_node() -> Work:
            n = chunk.numel()
            buffer[local.rank * n : (local.rank + 1) * n].copy_(chunk)
            return self.gather.iallgather_(buffer)

        wire = reduce_scatter_wire_bytes(nbytes, local.size)
        after = None
        steps: list[Callable[[], Work]] = [scatter_in_node]
        if half is not None:
            phases = half.phases(cross, chunk, shard, gather_comm=self.cross_gather)
            wire += half.wire_bytes(cross.size, shard is not None)
            if shard is not None:
                scatter, after = phases
                steps.append(scatter)  # type: ignore[arg-type]  # it returns its Work
            else:
                scatter, gather, unpack = phases
                steps += [scatter, gather, lambda: (unpack(), gather_in_node())[1]]  # type: ignore[list-item]
        elif shard is not None:
            wire += reduce_scatter_wire_bytes(nbytes // local.size, cross.size)
            steps.append(lambda: cross.ireduce_scatter(chunk, shard))
        else:
            wire += allreduce_wire_bytes(nbytes // local.size, cross.size)
            steps += [lambda: cross.iallreduce_(chunk), gather_in_node]
        if shard is None:
            wire += reduce_scatter_wire_bytes(nbytes, local.size)  # the all-gather in the node
        work = HierarchicalWork(self, steps, after, buffer if shard is None else shard, wire)
        self.pending.append(work)
        return work


class HierarchicalWork(Work):
    """The phases of one hierarchical reduction: `steps` each do local work and start the
    phase's MPI call; `after` (if any) runs once the last is complete. A Work whose own request
    is unused: `current` is the phase in flight, and each test() moves on to the next phase,
    without blocking, once the current one is done and its turn has come."""

    __slots__ = ("after", "current", "phase", "reducer", "steps", "tickets", "wire_bytes")

    def __init__(
        self,
        reducer: HierarchicalAllreduce,
        steps: list[Callable[[], Work]],
        after: Callable[[], object] | None,
        result: torch.Tensor,
        wire_bytes: int,
    ):
        super().__init__(MPI.REQUEST_NULL, None, "hierarchical reduction", result)
        self.reducer = reducer
        self.steps = steps
        self.after = after
        self.wire_bytes = wire_bytes  # what this rank sends over the whole reduction
        # Its turn at each of its phases: how many earlier sums start that phase too.
        self.tickets = reducer.tickets[: len(steps)]
        for k in range(len(steps)):
            reducer.tickets[k] += 1
        self.phase = 0
        self.current: Work = steps[0]()
        reducer.started[0] += 1

    def _next_phase(self) -> None:
        turn = self.tickets[self.phase + 1]
        assert self.reducer.started[self.phase + 1] == turn, "hierarchical phases out of order"
        self.current.wait()  # complete (or block until it is) and copy results back
        self.phase += 1
        self.current = self.steps[self.phase]()
        self.reducer.started[self.phase] += 1

    def test(self) -> bool:
        """Drive MPI progress; True once the last phase has completed."""
        last = len(self.steps) - 1
        while self.phase < last:
            turn = self.tickets[self.phase + 1]
            if not self.current.test() or self.reducer.started[self.phase + 1] != turn:
                return False
            self._next_phase()
        return self.current.test()

    def wait(self) -> None:
        pending = self.reducer.pending
        if self not in pending:  # waited for already
            return
        while pending[0] is not self:  # earlier sums first: their phases go first
            pending[0].wait()
        while self.phase < len(self.steps) - 1:
            self._next_phase()
        self.current.wait()
        if self.after is not None:
            self.after()
        pending.pop(0)


def agree_on_faster(comm: MPI.Comm, flat_s: list[float], hier_s: list[float]) -> str:
    """'flat' or 'hierarchical', the same on every rank of `comm`: each iteration is timed by
    its slowest rank (an all-reduce of the timings), then the medians are compared."""
    times = np.array([flat_s, hier_s], dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)
    flat, hier = (statistics.median(row) for row in times.tolist())
    return "hierarchical" if hier < flat else "flat"


def probe(
    comm: TensorComm, reducer: HierarchicalAllreduce, numel: int, iters: int = 3
) -> tuple[list[float], list[float]]:
    """Seconds of `iters` flat and hierarchical all-reduces of `numel` fp32 elements each,
    interleaved after one untimed round (collective over the group)."""
    buffer = torch.zeros(numel)

    def timed(start) -> float:
        comm.comm.Barrier()
        begin = time.perf_counter()
        start(buffer).wait()
        return time.perf_counter() - begin

    flat_s, hier_s = [], []
    for it in range(iters + 1):
        flat, hier = timed(comm.iallreduce_), timed(reducer.start)
        if it:
            flat_s.append(flat)
            hier_s.append(hier)
    return flat_s, hier_s


def select_allreduce(
    mode: str,
    grid: Grid,
    dp_comm: TensorComm,
    probe_numel: int,
    *,
    compression: str = "none",
    colour: int | None = None,
) -> tuple[HierarchicalAllreduce | None, str]:
    """The dp reducer for `parallel.allreduce` = `mode` (None means flat) and a line saying what
    was chosen and why. Collective over the dp group. `probe_numel` is auto's probe size (one
    bucket's elements); `compression` is parallel.grad_compression (auto stays flat under
    powersgd, which config.validate refuses with hierarchical); `colour` emulates nodes (see
    Grid.node_comms)."""
    assert mode in MODES, mode  # config.validate checked it
    if mode == "flat":
        return None, "flat"
    if compression == "powersgd":
        return None, "flat: PowerSGD all-reduces its own low-rank factors"
    node = grid.node_comms("dp", colour)
    if node.cross is None:
        node.free()
        return None, f"flat: {node.layout.reason}"
    # Which dp rank the two levels leave with each block (block i * num_nodes + n on the
    # rank with local index i on node n): ZeRO-1 puts the blocks in that order first.
    where = dp_comm.comm.allgather((node.local.Get_rank(), node.cross.Get_rank()))
    order = [0] * dp_comm.size
    for rank, (i, n) in enumerate(where):
        order[i * node.layout.num_nodes + n] = rank
    reducer = HierarchicalAllreduce(
        TensorComm(node.local, dp_comm.cuda_aware, name="dp-node"),
        TensorComm(node.cross, dp_comm.cuda_aware, name="dp-cross-node"),
        order,
    )
    shape = f"{node.layout.num_nodes} nodes x {node.layout.local_size} dp ranks"
    if mode == "hierarchical":
        return reducer, f"hierarchical ({shape})"
    numel = max(1, -(-probe_numel // reducer.multiple)) * reducer.multiple
    flat_s, hier_s = probe(dp_comm, reducer, numel)
    choice = agree_on_faster(dp_comm.comm, flat_s, hier_s)
    timings = (
        f"{numel * 4 / 2**20:.1f} MiB probe, medians flat {1e3 * statistics.median(flat_s):.1f} ms, "
        f"hierarchical {1e3 * statistics.median(hier_s):.1f} ms on dp rank {dp_comm.rank}"
    )
    if choice == "flat":
        node.free()
        return None, f"flat, the faster ({shape}; {timings})"
    return reducer, f"hierarchical, the faster ({shape}; {timings})"
