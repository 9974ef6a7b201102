"""Hierarchical all-reduce: sum a buffer over a group that spans several nodes in two levels.

    1. reduce-scatter inside the node (shared memory): local rank i gets the node's sum of
       the i-th 1/local_size of the buffer;
    2. all-reduce of that 1/local_size across nodes, among the ranks with the same local index;
    3. all-gather inside the node: every rank has every chunk's total.

Only 1/local_size of the bytes crosses the slow link from each rank, and each node sends its
sum once instead of once per rank: with 2 ranks per node, a flat ring all-reduce moves twice
what the hierarchical one does between nodes. `HierarchicalWork` runs the three phases as
non-blocking MPI calls advanced by `test()`/`wait()`, so DataParallel overlaps it with backward
like a flat `Iallreduce`. The sum is taken in another order than a flat all-reduce's, so the
two agree to fp32 rounding (exactly for sums that fp32 holds exactly, such as integers).

`select_allreduce` turns `parallel.allreduce` (flat, hierarchical, auto) into the reducer to use;
`auto` times both on a bucket-sized buffer at start-up and keeps the faster.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from mpi4py import MPI

from hpcllm.comm import TensorComm, Work
from hpcllm.topology import Grid

MODES = ("flat", "hierarchical", "auto")


class HierarchicalAllreduce:
    """Two-level in-place sum over the group that `local` (this node's ranks of it) and `cross`
    (the same local index on every node) split. Buffers must hold a multiple of `multiple`
    elements (DataParallel pads its buckets).

    Several sums may be in flight (one per bucket), each advancing when its ranks' test() find
    a phase done, which differs from rank to rank. MPI needs the collectives on a communicator
    started in the same order on every rank, so each phase has a communicator of its own (the
    all-gathers a duplicate of `local`) and a sum starts a phase only after every earlier sum
    has started it: in `start()` order everywhere.
    """

    def __init__(self, local: TensorComm, cross: TensorComm):
        gather = TensorComm(local.comm.Dup(), local.cuda_aware, name=local.name)
        self.phases = (local, cross, gather)  # reduce-scatter, all-reduce, all-gather
        self.multiple = local.size
        self.started = [0, 0, 0]  # how many sums have started each phase
        self.pending: list[HierarchicalWork] = []  # started, not yet waited for, in order

    def start(self, buffer: torch.Tensor) -> HierarchicalWork:
        """Start summing the 1-d `buffer` in place; complete it with the Work's wait()."""
        if buffer.dim() != 1 or buffer.numel() % self.multiple:
            raise ValueError(
                f"hierarchical all-reduce: the buffer (shape {tuple(buffer.shape)}) must be flat "
                f"and a multiple of the {self.multiple} ranks per node; pad it"
            )
        work = HierarchicalWork(self, buffer, seq=self.started[0])
        self.pending.append(work)
        return work


class HierarchicalWork(Work):
    """The three phases of one hierarchical all-reduce of `result` (the buffer). A Work whose
    own request is unused: `current` is the phase in flight, and each test() moves on to the
    next phase, without blocking, once the current one is done and its turn has come."""

    __slots__ = ("chunk", "current", "phase", "reducer", "seq")

    def __init__(self, reducer: HierarchicalAllreduce, buffer: torch.Tensor, seq: int):
        super().__init__(MPI.REQUEST_NULL, None, "hierarchical all-reduce", buffer)
        self.reducer = reducer
        self.seq = seq
        self.phase = 0
        self.chunk = buffer.new_empty(buffer.numel() // reducer.multiple)
        # Not in place: Reduce_scatter_block's output would alias its input's slot.
        self.current: Work = reducer.phases[0].ireduce_scatter(buffer, self.chunk)
        reducer.started[0] += 1

    def _next_phase(self) -> None:
        assert self.reducer.started[self.phase + 1] == self.seq, "hierarchical phases out of order"
        self.current.wait()  # complete (or block until it is) and copy results back
        self.phase += 1
        local, cross, gather = self.reducer.phases
        if self.phase == 1:
            self.current = cross.iallreduce_(self.chunk)
        else:
            assert self.result is not None
            n = self.chunk.numel()
            self.result[local.rank * n : (local.rank + 1) * n].copy_(self.chunk)
            self.current = gather.iallgather_(self.result)
        self.reducer.started[self.phase] += 1

    def test(self) -> bool:
        """Drive MPI progress; True once the last phase has completed."""
        while self.phase < 2:
            if not self.current.test() or self.reducer.started[self.phase + 1] != self.seq:
                return False
            self._next_phase()
        return self.current.test()

    def wait(self) -> None:
        pending = self.reducer.pending
        if self not in pending:  # waited for already
            return
        while pending[0] is not self:  # earlier sums first: their phases go first
            pending[0].wait()
        while self.phase < 2:
            self._next_phase()
        self.current.wait()
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
    shard: bool = False,
    colour: int | None = None,
) -> tuple[HierarchicalAllreduce | None, str]:
    """The dp reducer for `parallel.allreduce` = `mode` (None means flat) and a line saying what
    was chosen and why. Collective over the dp group. `probe_numel` is auto's probe size (one
    bucket's elements); `colour` emulates nodes (see Grid.node_comms)."""
    assert mode in MODES, mode  # config.validate checked it
    if mode == "flat":
        return None, "flat"
    if shard:
        return None, "flat: ZeRO-1 reduce-scatters its buckets, hierarchical applies to all-reduce"
    node = grid.node_comms("dp", colour)
    if node.cross is None:
        node.free()
        return None, f"flat: {node.layout.reason}"
    reducer = HierarchicalAllreduce(
        TensorComm(node.local, dp_comm.cuda_aware, name="dp-node"),
        TensorComm(node.cross, dp_comm.cuda_aware, name="dp-cross-node"),
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
