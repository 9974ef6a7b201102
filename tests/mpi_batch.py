"""Multi-rank tests, one `mpirun` per world size instead of one per test.

A test marked `@pytest.mark.mpi(ranks=2, timeout=120)` (or `ranks=[2, 4]`: one item per size)
runs on that many MPI ranks and gets `comm` (MPI.COMM_WORLD), `mpi_ranks` and `mpi_tmp_path`
(one folder shared by its ranks). Starting a rank costs seconds (torch's import), so the
first such test of a world size starts ONE job that runs every remaining test of that size,
in order, each behind a barrier; the pytest here then reports each test from its ranks'
reports, per rank (`test_x[2][rank=1]`).

A rank that dies or a test that hangs past its timeout ends that job (the timeout calls
MPI_Abort, so no rank waits forever): the test it was in fails with what its ranks reported
and the tail of the job's output, and the tests after it run in a new job.

The same process runs the tests of one job one after another, so a test must not rely on a
fresh process: module-level state it changes (torch's default generator, a global switch)
is the next test's state too.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from _pytest import runner
from _pytest.reports import TestReport

BATCH_DIR = "HPCLLM_MPI_BATCH_DIR"  # set in the ranks' environment: this process is a rank
DEFAULT_TIMEOUT = 300.0


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "mpi(ranks=N or [N, ...], timeout=seconds): run the test on N MPI ranks "
        "(tests/mpi_batch.py)",
    )
    if os.environ.get(BATCH_DIR):
        config.pluginmanager.register(_Rank(Path(os.environ[BATCH_DIR])), "mpi_batch_rank")
    else:
        config.pluginmanager.register(_Launcher(config), "mpi_batch_launcher")


def pytest_generate_tests(metafunc):
    mark = metafunc.definition.get_closest_marker("mpi")
    if mark is None:
        return
    ranks = mark.kwargs.get("ranks", 1)
    sizes = [ranks] if isinstance(ranks, int) else list(ranks)
    if not sizes or not all(isinstance(n, int) and n > 0 for n in sizes):
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: mpi(ranks=...) takes counts > 0")
    if "mpi_ranks" in metafunc.fixturenames:
        metafunc.parametrize("mpi_ranks", sizes)


@pytest.fixture(name="mpi_ranks", autouse=True)
def mpi_ranks_fixture(request) -> int:
    """The test's world size (1 for a test without the mpi marker)."""
    return getattr(request, "param", 1)


@pytest.fixture(scope="session")
def comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


@pytest.fixture
def mpi_tmp_path(tmp_path, comm) -> Path:
    """rank 0's tmp_path, the same folder on every rank."""
    return Path(comm.bcast(str(tmp_path) if comm.rank == 0 else None, root=0))


def _size(item) -> int | None:
    if item.get_closest_marker("mpi") is None:
        return None
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("mpi_ranks", 1) if callspec else 1


def _timeout(item) -> float:
    mark = item.get_closest_marker("mpi")
    return float(mark.kwargs.get("timeout", DEFAULT_TIMEOUT))


def _key(nodeid: str) -> str:
    return hashlib.sha1(nodeid.encode()).hexdigest()[:16]


class _Launcher:
    """The pytest the user runs: starts one job per world size, reports each test."""

    def __init__(self, config):
        self.config = config
        self.reports: dict[str, list[TestReport]] = {}

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        size = _size(item)
        if size is None:
            return None
        if item.nodeid not in self.reports:
            later = item.session.items[item.session.items.index(item) :]
            self._run([it for it in later if _size(it) == size and it.nodeid not in self.reports])
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for report in self.reports.pop(item.nodeid):
            ihook.pytest_runtest_logreport(report=report)
        # The test ran in the job; here only what the next item does not share is torn down.
        state = item.session._setupstate
        call = pytest.CallInfo.from_call(lambda: state.teardown_exact(nextitem), when="teardown")
        ihook.pytest_runtest_logreport(report=TestReport.from_item_and_call(item, call))
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _run(self, items: list) -> None:
        """Run `items` (one world size) in as few jobs as their failures allow."""
        while items:
            done = self._job(items)
            items = items[done:]

    def _job(self, items: list) -> int:
        """One mpirun over `items`; returns how many of them have their reports."""
        size = _size(items[0])
        option = self.config.option
        with tempfile.TemporaryDirectory(prefix="mpi-batch-") as tmp:
            folder = Path(tmp)
            cmd = [
                "mpirun",
                "-np",
                str(size),
                sys.executable,
                "-m",
                "mpi4py",
                "-m",
                "pytest",
                *("-p", "no:cacheprovider", "-p", "no:pytest_isolate_mpi"),
                *("--no-header", "--tb", option.tbstyle, "--capture", option.capture),
                *("-o", "addopts="),
                *[it.nodeid for it in items],
            ]
            env = {**os.environ, BATCH_DIR: tmp}
            limit = sum(_timeout(it) for it in items) + 120
            started = time.monotonic()
            with open(folder / "output.txt", "w+") as out:
                try:
                    proc = subprocess.run(
                        cmd,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=self.config.rootpath,
                        timeout=limit,
                        check=False,
                    )
                    ended = f"the job exited with {proc.returncode}"
                except subprocess.TimeoutExpired:
                    ended = f"the job ran past {limit:.0f}s and was killed"
                out.seek(0)
                output = out.read()
            for done, item in enumerate(items):
                reports = [self._load(folder, item, rank) for rank in range(size)]
                if all(r is not None for r in reports):
                    self.reports[item.nodeid] = [r for part in reports for r in part]
                    continue
                why = (folder / "timeout").read_text() if (folder / "timeout").exists() else ""
                message = (
                    f"{why or 'a rank of the job died in this test'} ({ended} after "
                    f"{time.monotonic() - started:.0f}s; ranks that reported: "
                    f"{[rank for rank, r in enumerate(reports) if r is not None]})"
                )
                failed = TestReport(
                    nodeid=item.nodeid,
                    location=item.location,
                    keywords={},
                    outcome="failed",
                    longrepr=message,
                    when="call",
                    sections=[("job output (tail)", output[-8000:])],
                )
                self.reports[item.nodeid] = [r for part in reports if part for r in part]
                self.reports[item.nodeid].append(failed)
                return done + 1
            return len(items)

    @staticmethod
    def _load(folder: Path, item, rank: int) -> list[TestReport] | None:
        path = folder / f"{_key(item.nodeid)}.{rank}.pkl"
        if not path.exists():
            return None
        with open(path, "rb") as f:
            return pickle.load(f)


class _Rank:
    """The pytest inside each rank of a job: runs its tests in step with the other ranks."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.steps = None  # a communicator of its own for the barrier between tests

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        if self.steps is None:
            self.steps = world.Dup()
        # Each test starts together, on a communicator no test uses: a rank that left a test
        # early (its assertion failed) cannot complete a peer's pending collective here, so
        # that peer times out in the test it is stuck in, and the timeout names that test.
        self.steps.Barrier()
        timer = threading.Timer(_timeout(item), self._abort, args=(item,))
        timer.daemon = True
        timer.start()
        try:
            reports = runner.runtestprotocol(item, nextitem=nextitem, log=False)
        finally:
            timer.cancel()
        for report in reports:
            report.nodeid = f"{report.nodeid}[rank={world.rank}]"
            report.location = (*report.location[:2], f"{report.location[2]}[rank={world.rank}]")
        path = self.folder / f"{_key(item.nodeid)}.{world.rank}.pkl"
        with open(path.with_suffix(".tmp"), "wb") as f:
            pickle.dump(reports, f)
        os.replace(path.with_suffix(".tmp"), path)
        return True

    def _abort(self, item) -> None:
        from mpi4py import MPI

        (self.folder / "timeout").write_text(
            f"timeout: {item.nodeid} ran past its {_timeout(item):.0f}s"
        )
        MPI.COMM_WORLD.Abort(1)
