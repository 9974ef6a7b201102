"""Process-level plumbing shared by the entry points: errors that end the whole job,
collective agreement on user errors, rank-0 printing, and per-rank thread/device setup.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

from mpi4py import MPI

from hpcllm.runtime.watchdog import WATCHDOG

T = TypeVar("T")

# What counts as the user's mistake (bad config, missing or damaged files):
# reported as a message, not a traceback.
USER_ERRORS = (ValueError, OSError)


class StartupError(Exception):
    """One or more ranks found a user error before training; every rank raises it."""

    def __init__(self, failures: list[tuple[int, str]]):
        self.failures = failures
        messages = {msg for _, msg in failures}
        if len(messages) == 1:
            text = failures[0][1]
            if len(failures) < MPI.COMM_WORLD.Get_size():
                text = f"rank {', '.join(str(r) for r, _ in failures)}: {text}"
        else:
            text = "\n".join(f"rank {r}: {msg}" for r, msg in failures)
        super().__init__(text)


class Diverged(Exception):
    """The loss or gradient norm of a step is not finite; every rank sees the same values
    (they are all-reduced), so every rank raises this at the same step."""


def print0(*args, **kwargs) -> None:
    """print() on world rank 0 only, flushed so mpirun interleaves lines sensibly."""
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(*args, **kwargs, flush=True)


def agree(comm: MPI.Comm, fn: Callable[[], T]) -> T:
    """Run `fn` on every rank; if it raised a user error anywhere, raise StartupError everywhere.

    Startup checks (config, shards, layout) go through this so that no rank goes on
    into a collective that another rank, having failed, will never join.
    """
    try:
        result, error = fn(), None
    except USER_ERRORS as e:
        result, error = None, str(e)
    with WATCHDOG.watch("start-up check (allgather)"):
        errors = comm.allgather(error)  # short strings: control data, pickling is fine
    failures = [(rank, msg) for rank, msg in enumerate(errors) if msg is not None]
    if failures:
        raise StartupError(failures)
    return result  # type: ignore[return-value]  # no failure anywhere: fn() returned


def keep_large_allocations() -> bool:
    """Make glibc keep freed memory of up to 32 MiB for reuse instead of returning it to the OS.

    Open MPI's non-blocking all-reduce allocates a temporary as large as the bucket on every
    call. glibc serves such sizes with fresh mmaps, or trims them off the heap when freed, so
    each step page-faulted ~32 MiB of new memory per rank (8,163 minor faults per step of
    three 24/24/16 MiB buckets, 0 after this; benchmarks/11-overlap.md). 32 MiB is the largest
    mmap threshold glibc accepts. Skipped where the user set MALLOC_MMAP_THRESHOLD_ or
    MALLOC_TRIM_THRESHOLD_ (glibc applied those), with HPCLLM_MALLOPT=0, or without glibc.
    Returns whether the setting was applied.
    """
    env = os.environ
    if env.get("HPCLLM_MALLOPT") == "0" or any(
        k in env for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 * 2**20) and mallopt(m_trim_threshold, 2**31 - 1))


def spmd_main(fn: Callable[[], int | None]) -> None:
    """Run an SPMD entry point so that no failure leaves other ranks hanging.

    - StartupError (all ranks agree): rank 0 prints it, every rank exits 2.
    - Diverged (all ranks agree): rank 0 prints it, every rank exits 3.
    - Any other exception on any rank: that rank prints its rank, host and
      traceback, then MPI_Abort ends every rank of the job at once.
    """
    keep_large_allocations()
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    try:
        code = fn() or 0
    except (StartupError, Diverged) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, StartupError) else 3)
    except (SystemExit, KeyboardInterrupt) as e:
        if size == 1 or (isinstance(e, SystemExit) and e.code in (0, None)):
            raise
        _abort(world, rank, size, f"exited with {e!r}", 1)
    except BaseException as e:
        # A user error (e.g. a damaged shard found mid-run) is one line; a bug gets its traceback.
        detail = "" if isinstance(e, USER_ERRORS) else f"\n{traceback.format_exc()}"
        _abort(world, rank, size, f"{type(e).__name__}: {e}{detail}".rstrip(), 1)
    else:
        sys.exit(code)


def _abort(world: MPI.Comm, rank: int, size: int, message: str, code: int) -> None:
    print(
        f"[hpcllm] rank {rank}/{size} on {socket.gethostname()} failed: {message}",
        file=sys.stderr,
        flush=True,
    )
    if size == 1:
        sys.exit(code)
    print(
        f"[hpcllm] rank {rank}: aborting all {size} ranks (MPI_Abort)", file=sys.stderr, flush=True
    )
    world.Abort(code)


def rank_hosts(world: MPI.Comm) -> str:
    """Which ranks run on which host (collective), e.g. "hosts: n1 (ranks 0-3), n2 (ranks 4-7)".

    Printed at start-up so that when a launcher reports a lost host (mpirun names the host, not
    the ranks), the log says which ranks went with it.
    """
    ranks_by_host: dict[str, list[int]] = {}
    for rank, host in enumerate(world.allgather(socket.gethostname())):
        ranks_by_host.setdefault(host, []).append(rank)
    parts = []
    for host, ranks in ranks_by_host.items():
        contiguous = ranks == list(range(ranks[0], ranks[-1] + 1))
        span = (
            f"{ranks[0]}-{ranks[-1]}"
            if contiguous and len(ranks) > 1
            else ",".join(map(str, ranks))
        )
        parts.append(f"{host} (rank{'s' if len(ranks) > 1 else ''} {span})")
    return "hosts: " + ", ".join(parts)


def node_local(world: MPI.Comm) -> tuple[int, int]:
    """(local rank, ranks on this node), from a shared-memory split of the world."""
    local = world.Split_type(MPI.COMM_TYPE_SHARED)
    result = (local.Get_rank(), local.Get_size())
    local.Free()
    return result


def setup_threads(threads: int, local_size: int) -> int:
    """Torch CPU threads for this rank: `threads`, or the node's cores shared out."""
    import torch

    if threads <= 0:
        cores = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
        # Affinity may already be per-rank (Slurm binds); only share it out when it is the whole node.
        threads = max(1, cores // local_size) if cores >= (os.cpu_count() or 1) else max(1, cores)
        if "OMP_NUM_THREADS" in os.environ:
            threads = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(threads)
    return threads
