"""Hang watchdog: abort the job when a rank stops making progress.

The training loop and every blocking MPI wait report what this rank is doing
(`with watchdog.watch("all-reduce on dp")`); each start and end of an activity is a
heartbeat. A background thread checks the time since the last heartbeat and, past
the timeout, prints the rank, host, step and the activity it is stuck in, then
calls MPI_Abort so the whole job ends instead of waiting for Slurm's time limit.

The first step gets a longer timeout (start-up, first-touch allocation, a cold
file system); checkpoint writes pause the watchdog, since they are slow but progress.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from contextlib import contextmanager


class Watchdog:
    def __init__(self):
        self.timeout = 0.0
        self.first_step_timeout = 0.0
        self.step = 0
        self._first_step_done = False
        self._activities: list[str] = []
        self._last_beat = time.monotonic()
        self._paused = 0
        self._thread: threading.Thread | None = None

    def start(self, timeout: float, first_step_timeout: float) -> None:
        """Arm the watchdog (timeout <= 0 leaves it off)."""
        if timeout <= 0 or self._thread is not None:
            return
        self.timeout, self.first_step_timeout = timeout, max(timeout, first_step_timeout)
        self._last_beat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="hpcllm-watchdog", daemon=True)
        self._thread.start()

    def step_done(self, step: int) -> None:
        self.step = step + 1
        self._first_step_done = True
        self._last_beat = time.monotonic()

    @contextmanager
    def watch(self, activity: str):
        """Mark a blocking activity; its start and end are heartbeats."""
        self._activities.append(activity)
        self._last_beat = time.monotonic()
        try:
            yield
        finally:
            self._activities.pop()
            self._last_beat = time.monotonic()

    @contextmanager
    def paused(self):
        """Suspend the watchdog (slow but progressing work such as checkpoint writes)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            self._last_beat = time.monotonic()

    def _run(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            limit = self.timeout if self._first_step_done else self.first_step_timeout
            idle = time.monotonic() - self._last_beat
            if self._paused or idle < limit:
                continue
            activity = self._activities[-1] if self._activities else "computing (no MPI call)"
            from mpi4py import MPI

            rank = MPI.COMM_WORLD.Get_rank()
            print(
                f"[hpcllm] watchdog: rank {rank} on {socket.gethostname()} made no progress for "
                f"{idle:.0f} s at step {self.step}, in: {activity}. Aborting the job "
                f"(run.watchdog_s = {self.timeout:g}).",
                file=sys.stderr,
                flush=True,
            )
            try:
                MPI.COMM_WORLD.Abort(3)
            finally:
                os._exit(3)


# One per process: the communication layer reports its waits here.
WATCHDOG = Watchdog()
