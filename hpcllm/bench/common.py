"""What every benchmark shares: timing across ranks, the machine's load, tables, the
environment a result was measured in, and the settings of the mpirun children it starts."""

from __future__ import annotations

import json
import os
import platform
import socket
import time

import mpi4py
import numpy as np
import torch
from mpi4py import MPI

from hpcllm.distributed.comm import TensorComm

# What `scaling` and `stop` set for their mpirun children: Open MPI as root, more ranks than cores, 1 thread.
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
    "OMP_NUM_THREADS": "1",
}

# The model the training subjects (steps, compression, multinode, stop) measure: gpt2 with
# AdamW, the job's defaults before the quality sweep made llama + Muon the defaults (benchmarks/14-quality.md). Pinned first on their command lines (later options win), so each keeps
# measuring what its campaign file says; steps compares it with nanoGPT's GPT + AdamW.
BENCH_MODEL = (
    *("--model.arch", "gpt2", "--optim.name", "adamw"),
    *("--optim.lr", "1e-3", "--optim.min_lr", "1e-4", "--train.micro_batch_size", "8"),
)


def timed(world: MPI.Comm, fn) -> float:
    """Seconds `fn()` takes on this rank, all ranks starting together."""
    world.Barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def slowest(world: MPI.Comm, seconds: list[float]) -> list[float]:
    """Per-iteration times of the slowest rank (a collective iteration ends for all at once)."""
    times = np.array(seconds, dtype=np.float64)
    world.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)
    return times.tolist()


class ForeignLoad:
    """Share of the machine's CPUs that other processes (or hypervisor steal) used while we
    measured: busy time in /proc/stat minus this job's CPU time, over wall time x cores."""

    def __init__(self, world: MPI.Comm):
        self.world = world
        world.Barrier()
        self.start = (self._busy(), time.process_time(), time.perf_counter())

    @staticmethod
    def _busy() -> float:
        if not os.path.exists("/proc/stat"):  # not Linux: unknown
            return float("nan")
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait

    def share(self) -> float:
        busy, own, wall = self.start
        own = self.world.allreduce(time.process_time() - own, op=MPI.SUM)
        return max(0.0, (self._busy() - busy - own) / (time.perf_counter() - wall) / os.cpu_count())


class ClockedComm(TensorComm):
    """A TensorComm that notes when a step's first all-reduce is launched, and the time spent
    in MPI while backward runs: launches, and the progress tests DataParallel's hooks make."""

    first_launch: float | None = None
    hook_seconds = 0.0

    def allreduce_(self, tensor, op=MPI.SUM):  # overlap off's blocking calls
        self.first_launch = self.first_launch or time.perf_counter()
        return super().allreduce_(tensor, op)

    def iallreduce_(self, tensor, op=MPI.SUM):
        start = time.perf_counter()
        self.first_launch = self.first_launch or start
        work = super().iallreduce_(tensor, op)
        # Duck-typed: Work only calls Test() and Wait() on its request.
        work.request = _ClockedRequest(work.request, self)  # type: ignore[assignment]
        self.hook_seconds += time.perf_counter() - start
        return work


class _ClockedRequest:
    def __init__(self, request: MPI.Request, comm: ClockedComm):
        self.request, self.comm = request, comm

    def Test(self) -> bool:
        start = time.perf_counter()
        done = self.request.Test()
        self.comm.hook_seconds += time.perf_counter() - start
        return done

    def Wait(self) -> None:
        self.request.Wait()


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [
        [f"{v:,.3f}" if isinstance(v, float) else str(v) for v in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    return "\n".join([*lines[:1], "  ".join("-" * w for w in widths), *lines[1:]])


def environment() -> dict:
    return {
        "host": socket.gethostname(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "mpi4py": mpi4py.__version__,
        "mpi": MPI.Get_library_version().split(",")[0],
        "libnbc_iallreduce_algorithm": os.environ.get("OMPI_MCA_coll_libnbc_iallreduce_algorithm"),
        "load_avg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def machine() -> str:
    return f"{platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"


def record(result: dict, started: str) -> dict:
    """`result` with when (`started`, from time.strftime) and where it was measured, printed
    as JSON: the form of the operations timings (stop, checkpoint) in benchmarks/04-operations.md."""
    out = {
        "date": started,
        "machine": machine(),
        "load_avg_1m_at_end": os.getloadavg()[0],
        **result,
    }
    print(json.dumps(out, indent=1), flush=True)
    return out
