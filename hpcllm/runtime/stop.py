"""Collective stop: a signal or the end of the time budget on any rank stops every rank.

SIGTERM (pre-emption, scancel), SIGINT (Ctrl-C), SIGUSR1 (Slurm's warning before the time
limit, see `#SBATCH --signal`) and the end of `run.time_limit_s` only set a flag. At each step
boundary all ranks combine their flags with one small all-reduce, so they agree on the
same step to save a checkpoint and exit 0 together; no rank leaves on its own while
the others wait for it in a collective. A second SIGINT interrupts at once (the job ends
through MPI_Abort, keeping the last checkpoint).
"""

from __future__ import annotations

import signal
import time

import numpy as np
from mpi4py import MPI

from hpcllm.runtime.watchdog import WATCHDOG

# Reasons, by priority when ranks disagree (the all-reduce takes the maximum).
REASONS = {
    0: None,
    1: "time budget (run.time_limit_s) used up",
    2: "SIGUSR1",
    3: "SIGTERM",
    4: "SIGINT",
}
_CODES = {signal.SIGUSR1: 2, signal.SIGTERM: 3, signal.SIGINT: 4}


class StopRequest:
    def __init__(self, time_limit_s: float = 0.0):
        self._code = 0
        self._deadline = time.monotonic() + time_limit_s if time_limit_s > 0 else None
        for sig in _CODES:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        code = _CODES[signal.Signals(signum)]
        if code == self._code == _CODES[signal.SIGINT]:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for a save
        # Only record it: the decision is taken collectively at the next step boundary.
        self._code = max(self._code, code)

    def agreed(self, comm: MPI.Comm) -> str | None:
        """Collective: the reason to stop now if any rank has one, else None."""
        code = self._code
        if code == 0 and self._deadline is not None and time.monotonic() >= self._deadline:
            code = 1
        flag = np.array([code], dtype=np.int32)
        with WATCHDOG.watch("stop-flag all-reduce on world"):
            comm.Allreduce(MPI.IN_PLACE, flag, op=MPI.MAX)
        return REASONS[int(flag[0])]
