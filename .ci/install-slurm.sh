#!/usr/bin/env bash
# Install what tests/test_slurm.py needs for its private one-node Slurm cluster (Debian or
# Ubuntu, as root): Slurm's daemons and client commands, munge, and libpmix-dev, whose
# unversioned libpmix.so is what Slurm's mpi/pmix plugin loads for `srun --mpi=pmix`.
# Nothing is configured or started here: tests/slurm_cluster.py runs the daemons with its own
# configuration under a temporary folder. Where this fails, the Slurm tests skip and say why.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge libpmix-dev)

have_all() {
    local cmd
    for cmd in slurmctld slurmd sbatch scontrol munged; do
        command -v "$cmd" >/dev/null || [ -x "/usr/sbin/$cmd" ] || return 1
    done
    compgen -G "/usr/lib/*/pmix2/lib/libpmix.so" >/dev/null
}

if have_all; then
    echo "install-slurm: Slurm, munge and PMIx are already installed"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "install-slurm: needs root and apt-get to install ${packages[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The packages' own services are not started in a container without systemd; that is fine.
apt-get install -y -qq --no-install-recommends "${packages[@]}"
have_all
echo "install-slurm: installed $(slurmd -V)"
