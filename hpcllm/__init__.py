"""hpcllm: GPT-style language model training across MPI ranks."""

import os

# Open MPI's non-blocking collectives (coll/libnbc) run every in-place Iallreduce, and
# every Iallreduce on fewer than 4 ranks, as a binomial reduce-then-broadcast tree:
# about half the bandwidth of reduce-scatter + allgather (measured in benchmarks/01-allreduce.md).
# DataParallel's gradient buckets are exactly such in-place Iallreduces, so ask for
# reduce-scatter + allgather (libnbc's own choice for large messages otherwise).
# Read at MPI_Init, so it is set here, before any module imports mpi4py.MPI; a value
# the user exported wins, and other MPI libraries ignore the variable.
os.environ.setdefault("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "3")

# NumPy's large arrays get transparent huge pages and torch's CPU tensors do not, unless this
# is set: it halves the time Open MPI's shared-memory transport takes to copy a bucket-sized
# gradient buffer (64 MiB at np 2: backward + reduction 26.1 → 20.8 ms against 19.6 ms for
# backward + raw blocking Allreduces of NumPy buffers; benchmarks/11-overlap.md). torch reads
# it at its first large allocation, so it is set here, before any tensor exists; a value the
# user exported wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
