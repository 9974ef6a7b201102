"""Hang watchdog: end the job when a rank stops making progress, and name that rank.

Progress is a heartbeat: the start and end of each activity a rank reports (every blocking
MPI wait runs under `with WATCHDOG.watch("all-reduce on dp")`, the rank's own work under
`watch("training step 7", peers=False)`) and each completed step. A background thread checks
the time since this rank's last heartbeat and, past the timeout, prints which rank stopped,
then calls MPI_Abort so the whole job ends instead of waiting for Slurm's time limit.

Which rank stopped: a rank waiting in a collective is the victim, not the cause. So every
rank's watchdog thread also writes its state (step, activity, last heartbeat, waiting for
peers or not, writing files or not) every few seconds into a small file
`<run.dir>/heartbeat/rank-NNNNNN.json`. A rank whose watchdog fires while it waits for peers
reads them all and names, in this order: ranks whose file stopped being updated (frozen by
SIGSTOP, a dead node), else the rank not waiting for anyone that made no progress for longest
(stuck in its own work, e.g. a read from a hung file system), else the oldest heartbeat.
Files rather than a one-sided MPI window: on networks without RDMA a window is read through
the target's MPI progress engine, which a frozen or dead rank never runs, and a read from the
watchdog thread would then hang too; a file on the run folder stays readable.

Start-up: `python -m hpcllm.train` arms the watchdog as the process starts (`start_at_launch`,
before torch and MPI load) with `run.watchdog_first_step_s` as the job's command line and
TOML file set it (read first of all, so that it bounds the imports too), which holds until the
first step has completed.
Before MPI is up the watchdog can only print and exit the process non-zero, which makes
mpirun or srun end the job. A rank blocked inside MPI_Init, or in a stuck import of a C
extension, may hold the GIL and so stop the watchdog thread; until the config is read,
faulthandler's timer (a C thread that needs no GIL) backs it up: it dumps the tracebacks and
exits with code 1.

Checkpoint saves pause the watchdog only around this rank's own file writes (slow, but
progress): every collective of a save is watched, and a rank waiting for a peer that is
writing files waits on.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from hpcllm.config import ConfigError, RunConfig, parse_args

HOST = socket.gethostname()
_RECORD_BYTES = 512  # heartbeat files are rewritten in place at a fixed size, never truncated


def launch_rank() -> int:
    """This process's world rank as the launcher tells it (usable before MPI is initialised)."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class Watchdog:
    def __init__(self):
        self.timeout = 0.0
        self.first_step_timeout = 0.0
        self.step = 0
        self.rank, self.size = launch_rank(), 1
        self._first_step_done = False
        self._activities: list[tuple[str, bool]] = []  # (what, waits for peers), innermost last
        self._last_beat = time.monotonic()
        self._paused = 0
        self._thread: threading.Thread | None = None
        # Set when the timeouts change, so the thread does not sleep out an interval chosen
        # for the old ones (start-up's long limit) while peers judge its heartbeat by the new.
        self._wake = threading.Event()
        self._heartbeats: Path | None = None  # <run.dir>/heartbeat once the run folder is ours
        self._backstop = False
        self._launched = False  # armed by start_at_launch, before torch loads

    # -- arming ------------------------------------------------------------------------

    def start_at_launch(self, argv: list[str]) -> None:
        """Arm the start-up watchdog as the process starts, then initialise MPI under it.

        For the training entry point, before it imports torch: an import stuck on a slow
        shared file system, or a peer that never reaches MPI_Init, must end the job too,
        within the `run.watchdog_first_step_s` of the job's command line (`argv`).
        """
        limit = first_step_limit(argv)
        self.start(limit, limit)
        if limit > 0:
            faulthandler.dump_traceback_later(limit + self._stale_after(limit), exit=True)
            self._backstop = True
        with self.watch("start-up before MPI", peers=False):
            _hang_at_start_for_tests(self.rank)
        with self.watch("MPI initialisation (waiting for every rank to start)"):
            from mpi4py import MPI

        self.rank, self.size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
        self._launched = True

    def start(
        self, timeout: float, first_step_timeout: float, heartbeat_dir: Path | None = None
    ) -> None:
        """Arm the watchdog, or set its timeouts if armed (timeout <= 0 turns it off).

        With `heartbeat_dir` (a run folder this job holds the lock of), this rank shares its
        state there and reads the others' when its watchdog fires.
        """
        if timeout <= 0:
            self.stop()
            return
        self.timeout, self.first_step_timeout = timeout, max(timeout, first_step_timeout)
        self._last_beat = time.monotonic()
        if heartbeat_dir is not None:
            from mpi4py import MPI  # already initialised by the caller

            self.rank, self.size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
            heartbeat_dir.mkdir(parents=True, exist_ok=True)
            self._heartbeats = heartbeat_dir
            self._write_heartbeat()  # at once: this rank may freeze before the thread's first
            # The config is read and MPI is up: from here on the thread itself reports.
            if self._backstop:
                faulthandler.cancel_dump_traceback_later()
                self._backstop = False
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hpcllm-watchdog", daemon=True)
            self._thread.start()
        else:
            self._wake.set()

    def stop(self) -> None:
        """Disarm (the run has ended); this rank's heartbeat file goes with it."""
        self.timeout = 0.0
        if self._backstop:
            faulthandler.cancel_dump_traceback_later()
            self._backstop = False
        if self._heartbeats is not None:
            self._file(self.rank).unlink(missing_ok=True)
            self._heartbeats = None

    # -- heartbeats --------------------------------------------------------------------

    def step_done(self, step: int) -> None:
        self.step = step
        if not self._first_step_done:
            self._first_step_done = True
            self._wake.set()  # the limit drops from the first step's to the usual one
        self._last_beat = time.monotonic()

    @contextmanager
    def watch(self, activity: str, *, peers: bool = True):
        """Mark an activity; its start and end are heartbeats.

        `peers`: the activity waits for other ranks (a collective, a receive); False for this
        rank's own work, which makes it the suspect if it never ends.
        """
        self._activities.append((activity, peers))
        self._last_beat = time.monotonic()
        try:
            yield
        finally:
            self._activities.pop()
            self._last_beat = time.monotonic()

    @contextmanager
    def paused(self):
        """Suspend the watchdog around this rank's own slow but progressing work (file writes);
        peers waiting for this rank meanwhile wait on."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            self._last_beat = time.monotonic()

    # -- the watchdog thread -----------------------------------------------------------

    def _limit(self) -> float:
        return self.timeout if self._first_step_done else self.first_step_timeout

    @staticmethod
    def _interval(limit: float) -> float:
        """How often the thread checks and writes this rank's heartbeat file."""
        return min(limit / 10, 10.0)

    def _stale_after(self, limit: float) -> float:
        """A heartbeat file older than this belongs to a frozen or dead rank.

        Half the timeout: a rank that holds the GIL in a long C call also stops writing for a
        while, and a peer frozen since before this rank began to wait is twice as stale."""
        return max(limit / 2, 3 * self._interval(limit) + 1.0)

    def _activity(self) -> tuple[str, bool]:
        activities = list(self._activities)
        if activities:
            return activities[-1]
        if self._first_step_done:
            return "computing (no MPI call)", False
        if self._launched and self._heartbeats is None:
            # Between MPI_Init and the run folder: this rank's own imports (torch, hpcllm) and
            # config, which no peer holds up, so a rank stuck there names itself.
            return "start-up: imports and config (before the run folder)", False
        # Start-up is not marked call by call: count it as waiting, so that a rank blames the
        # peer that stopped first rather than itself.
        return "start-up (imports, config, data, model)", True

    def _run(self) -> None:
        while self.timeout > 0:
            limit = self._limit()
            if self._wake.wait(self._interval(limit)):
                self._wake.clear()
                continue  # new timeouts: recompute the interval and the limit
            self._write_heartbeat()
            idle = time.monotonic() - self._last_beat
            if self._paused or idle < limit or self.timeout <= 0:
                continue
            report = self._diagnose(idle, limit)
            if report is not None:
                self._abort(*report)

    def _file(self, rank: int) -> Path:
        assert self._heartbeats is not None
        return self._heartbeats / f"rank-{rank:06d}.json"

    def _write_heartbeat(self) -> None:
        if self._heartbeats is None:
            return
        activity, waiting = self._activity()
        now = time.time()
        record = {
            "rank": self.rank,
            "host": HOST,
            "pid": os.getpid(),
            "step": self.step,
            "activity": activity[:200],
            "waiting": waiting,
            "paused": self._paused > 0,
            "progress": now - (time.monotonic() - self._last_beat),
            "written": now,
        }
        data = json.dumps(record).ljust(_RECORD_BYTES).encode()
        try:
            # Open, write, close: NFS makes a write visible to other nodes on close.
            fd = os.open(self._file(self.rank), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError:
            pass  # a full or flaky file system must not take the watchdog down; peers see it stale

    def _read_heartbeats(self) -> dict[int, dict]:
        records = {}
        for rank in range(self.size):
            for _ in range(3):  # a read may catch a rewrite half-way
                try:
                    records[rank] = json.loads(self._file(rank).read_text())
                    break
                except FileNotFoundError:
                    break
                except (OSError, ValueError):
                    time.sleep(0.01)
        return records

    def _diagnose(self, idle: float, limit: float) -> tuple[list[str], bool] | None:
        """The report (lines, whether this rank is the one stuck), or None to wait on."""
        activity, waiting = self._activity()
        me = f"rank {self.rank} on {HOST}"
        setting = (
            f"run.watchdog_s = {self.timeout:g}"
            if self._first_step_done
            else f"run.watchdog_first_step_s = {limit:g}, until the first step"
        )
        stuck_here = [
            f"[hpcllm] watchdog: {me} made no progress for {idle:.0f} s at step {self.step}, "
            f"in: {activity}. Aborting the job ({setting})."
        ]
        if not waiting:
            return stuck_here, True
        # Waiting for peers: the cause is elsewhere, if a peer can be seen.
        grace = 2 * self._stale_after(limit)
        if self._heartbeats is None:  # before the run folder is known: a stuck peer names itself
            return (stuck_here, True) if idle >= limit + grace else None
        records = self._read_heartbeats()
        now = time.time()
        stale_after = self._stale_after(limit)
        frozen = [
            r
            for r in range(self.size)
            if r != self.rank and (r not in records or now - records[r]["written"] > stale_after)
        ]
        frozen.sort(key=lambda r: records[r]["written"] if r in records else 0.0)
        if not frozen and any(rec["paused"] for rec in records.values()):
            return None  # a peer is writing its checkpoint files: slow, but progress
        lines = []
        for r in frozen:
            rec = records.get(r)
            lines.append(
                f"[hpcllm] watchdog: rank {r} stopped making progress: it never wrote a "
                f"heartbeat into {self._heartbeats} (hung in start-up?)."
                if rec is None
                else f"[hpcllm] watchdog: rank {r} on {rec['host']} (pid {rec['pid']}) stopped "
                f"making progress: its heartbeat stopped {now - rec['written']:.0f} s ago "
                f"(frozen, or its node died), last seen at step {rec['step']} in: "
                f"{rec['activity']}."
            )
        if not lines:
            busy = [r for r, rec in records.items() if not rec["waiting"]]
            pool = busy or records
            culprit = min(pool, key=lambda r: records[r]["progress"]) if pool else self.rank
            if culprit == self.rank:
                return (stuck_here, True) if idle >= limit + grace else None
            rec = records[culprit]
            lines.append(
                f"[hpcllm] watchdog: rank {culprit} on {rec['host']} (pid {rec['pid']}) made no "
                f"progress for {now - rec['progress']:.0f} s at step {rec['step']}, in: "
                f"{rec['activity']}."
            )
        lines[0] += f" Aborting the job ({setting})."
        lines.append(
            f"[hpcllm] watchdog: noticed by {me}, waiting {idle:.0f} s at step {self.step} "
            f"in: {activity}."
        )
        return lines, False

    def _abort(self, lines: list[str], stuck_here: bool) -> None:
        print("\n".join(lines), file=sys.stderr, flush=True)
        if stuck_here:  # where this rank is stuck; a waiting rank's stack says nothing new
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        time.sleep(1.0)  # mpirun forwards output asynchronously: let it pass before the abort
        mpi = sys.modules.get("mpi4py.MPI")
        try:
            if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
                mpi.COMM_WORLD.Abort(3)
        finally:
            # Before MPI is up: a non-zero exit makes mpirun or srun end the job.
            os._exit(3)


def first_step_limit(argv: list[str]) -> float:
    """run.watchdog_first_step_s as the job will read it (defaults, then the TOML file, then
    the command line). A config with a mistake is the job's to report once it starts: until
    then the default holds."""
    try:
        cfg, _ = parse_args(argv)
    except (ConfigError, ValueError, OSError):
        return RunConfig().watchdog_first_step_s
    return cfg.run.watchdog_first_step_s


def _hang_at_start_for_tests(rank: int) -> None:
    """Test hook: HPCLLM_HANG_AT_START=r makes world rank r hang before MPI is initialised."""
    if os.environ.get("HPCLLM_HANG_AT_START") == str(rank):
        while True:
            time.sleep(3600)


# One per process: the communication layer reports its waits here.
WATCHDOG = Watchdog()
