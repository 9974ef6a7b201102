"""hpcllm: GPT-style language model training across MPI ranks."""

import os

# Open MPI's non-blocking collectives (coll/libnbc) run every in-place Iallreduce, and
# every Iallreduce on fewer than 4 ranks, as a binomial reduce-then-broadcast tree:
# about half the bandwidth of reduce-scatter + allgather (measured in BENCHMARKS.md).
# DataParallel's gradient buckets are exactly such in-place Iallreduces, so ask for
# reduce-scatter + allgather (libnbc's own choice for large messages otherwise).
# Read at MPI_Init, so it is set here, before any module imports mpi4py.MPI; a value
# the user exported wins, and other MPI libraries ignore the variable.
os.environ.setdefault("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "3")
