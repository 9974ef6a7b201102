"""The run folder, as rank 0 keeps it: an exclusive lock, metrics.jsonl and status.json.

Two runs on one `run.dir` would interleave checkpoints and metrics, so rank 0 holds an
exclusive flock on `<run.dir>/lock` for the whole run; the OS releases it when the process
dies, so a crashed run never leaves it behind. The lock file names the host and pid of its
holder, which a second run reports when it refuses to start.

Every file hpcllm writes in a run folder is created without following links (`O_NOFOLLOW`),
or written whole beside its name and renamed over it (`replace_file`), and a run folder
whose own entries are symbolic links is refused at start-up: a link planted in it (by
mistake, or by someone else on a shared file system) never makes a run write elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

# The entries of a run folder that hpcllm writes, and the folders of its own files in it.
ENTRIES = ("lock", "metrics.jsonl", "status.json", "config.toml", "loss.png")
FOLDERS = ("checkpoints", "heartbeat")


def replace_file(path: Path, data: str | bytes) -> None:
    """Write `path` whole and atomically, never through a link: into a new file beside it
    (created exclusively, so a link planted under that name is not followed), then renamed
    over `path` (which replaces a link there, not what it points to)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover of a crashed process with this pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def refuse_links(path: Path) -> None:
    """ValueError naming the first entry of run folder `path` (or of its checkpoints/ and
    heartbeat/ folders) that is a symbolic link."""
    entries = [path / name for name in (*ENTRIES, *FOLDERS)]
    for folder in FOLDERS:
        if (path / folder).is_dir() and not (path / folder).is_symlink():
            entries += sorted((path / folder).iterdir())
    for entry in entries:
        if entry.is_symlink():
            raise ValueError(
                f"run.dir {path}: {entry} is a symbolic link (to {os.readlink(entry)}); a run "
                "writes its files only inside its own folder. Remove the link, or give this "
                "run another --run.dir"
            )


class RunDir:
    """Rank 0's handle on the run folder; holds its lock until the process ends."""

    def __init__(self, path: str | Path):
        """Lock `path` (created if needed); ValueError naming the holder if another run has it,
        or naming an entry of the folder that is a symbolic link."""
        self.path = Path(path)
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        refuse_links(self.path)
        lock = self.path / "lock"
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
        self._lock = os.fdopen(os.open(lock, flags, 0o644), "a+")
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
                replace_file(path, "".join(line + "\n" for line in kept))
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
        replace_file(self.path / "status.json", json.dumps(status) + "\n")


def _step_of(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a line cut short by a crash."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class MetricsLog:
    """metrics.jsonl: appended, one JSON object per line, written at once so a crash loses
    nothing logged.

    A record that cannot be written (a full disk, a quota) costs a warning, not the run: it
    waits, in order, and goes out with the next record that can be written. Training goes on
    to its next checkpoint, whose save deals with a real shortage of space."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        self.waiting: list[str] = []

    def write(self, record: dict) -> None:
        self.waiting.append(json.dumps(record) + "\n")
        data = "".join(self.waiting).encode()
        end = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            if os.write(self.fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, end)  # no half line: the whole batch goes again later
            if len(self.waiting) == 1:
                print(
                    f"warning: cannot append to {self.path} ({e.strerror or e}); training goes "
                    "on and its records are written once there is room",
                    flush=True,
                )
            return
        if len(self.waiting) > 1:
            print(f"{self.path}: written again, with {len(self.waiting) - 1} waiting record(s)")
        self.waiting.clear()
