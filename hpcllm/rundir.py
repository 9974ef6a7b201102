"""The run folder, as rank 0 keeps it: an exclusive lock, metrics.jsonl and status.json.

Two runs on one `run.dir` would interleave checkpoints and metrics, so rank 0 holds an
exclusive flock on `<run.dir>/lock` for the whole run; the OS releases it when the process
dies, so a crashed run never leaves it behind. The lock file names the host and pid of its
holder, which a second run reports when it refuses to start.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path


class RunDir:
    """Rank 0's handle on the run folder; holds its lock until the process ends."""

    def __init__(self, path: str | Path):
        """Lock `path` (created if needed); ValueError naming the holder if another run has it."""
        self.path = Path(path)
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / "lock"
        self._lock = open(lock, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "unknown (it has not written its name yet)"
            self._lock.close()
            raise ValueError(
                f"run.dir {self.path} is in use by another run: {holder} holds {lock}. "
                "Wait for it to end (or end it), or give this run another --run.dir"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # E.g. Lustre mounted without -o flock: run unprotected rather than not at all.
            print(
                f"warning: cannot lock {lock} ({e.strerror}); make sure no other run uses "
                f"run.dir {self.path}",
                file=sys.stderr,
                flush=True,
            )
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(
            f"host {socket.gethostname()}, pid {os.getpid()}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        self._lock.flush()

    def discard(self) -> None:
        """The run was refused at start-up: remove the folder if this run created it."""
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
        self._lock.close()

    def metrics(self, resumed_step: int) -> MetricsLog:
        """metrics.jsonl for a run continuing after `resumed_step` (0: from scratch).

        Records of later steps were written by a run that ended before its next checkpoint;
        they are dropped, since those steps are trained again, so every step appears once.
        """
        path = self.path / "metrics.jsonl"
        if path.exists():
            lines = path.read_text().splitlines()
            steps = [_step_of(line) for line in lines]
            kept = [
                line
                for line, step in zip(lines, steps, strict=True)
                if step is not None and step <= resumed_step
            ]
            if len(kept) < len(lines):
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, path)
                print(
                    f"{path}: dropped {len(lines) - len(kept)} record(s) after step "
                    f"{resumed_step}, the steps this run trains again",
                    flush=True,
                )
        return MetricsLog(path)

    def draw_loss(self) -> None:
        """loss.png from metrics.jsonl, redrawn at each evaluation. A picture that cannot be
        drawn (a full disk, a broken font cache) is worth a warning, not the run."""
        from hpcllm.plot import plot, read_metrics

        try:
            plot([read_metrics(self.path)], self.path / "loss.png")
        except (OSError, ValueError, RuntimeError) as e:
            print(f"warning: could not draw {self.path / 'loss.png'}: {e}", flush=True)

    def write_status(self, status: dict) -> None:
        """status.json: whether the run is complete or stopped early (for requeue scripts)."""
        path = self.path / "status.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status) + "\n")
        os.replace(tmp, path)


def _step_of(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a line cut short by a crash."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class MetricsLog:
    """metrics.jsonl: appended, one JSON object per line, flushed so a crash loses nothing logged."""

    def __init__(self, path: Path):
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
