"""A private single-node Slurm for the tests: munged, slurmctld and slurmd under one folder.

The session fixture `slurm` (conftest.py makes it available to every test module) starts the cluster once and stops
it when the session ends. `start(root)` brings up a one-node cluster from Debian's packages
(`slurmctld slurmd slurm-client munge`, plus `libpmix-dev` for `srun --mpi=pmix`;
`.ci/install-slurm.sh` installs them) and returns a `SlurmCluster` whose `env` points the
client commands at it. Everything lives under `root`: its own munge key and socket,
slurm.conf (found through SLURM_CONF), state, spool, logs and free TCP ports, so neither a
system Slurm nor another test session is touched. `start` raises `Unavailable` with the
reason when the binaries are missing or a daemon does not come up; the fixture turns that
into a skip.

Settings known to work in a container with Slurm 22.05 (Debian 12): proctrack/linuxproc and
task/none (no cgroups needed), select/cons_tres, root as SlurmUser, and
PMIX_SECURITY_MODE=native in mpi.conf, which the pip Open MPI's bundled PMIx needs to
talk to Slurm's PMIx server.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel")
PMIX_PLUGIN_LIBRARY = "/usr/lib/*/pmix2/lib/libpmix.so"  # what Debian's mpi_pmix plugin dlopens
NODE_CPUS = (
    8  # advertised CPUs (config_overrides): lets jobs run more tasks than this machine has cores
)


class Unavailable(Exception):
    """No Slurm here (binaries missing, not root, or a daemon did not start); the message says why."""


@dataclass
class SlurmCluster:
    root: Path
    node: str
    env: dict = field(repr=False)  # client_env(os.environ): for the Slurm commands
    pid_files: list[Path] = field(default_factory=list, repr=False)

    def client_env(self, base) -> dict:
        """`base` with this cluster's SLURM_CONF, and without the Slurm variables of any job the
        tests themselves may run in (they would leak into the test jobs)."""
        env = {
            k: v
            for k, v in base.items()
            if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
        }
        env["SLURM_CONF"] = str(self.root / "slurm.conf")
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/sbin"])
        return env

    def run(
        self,
        *cmd: str,
        timeout: float = 30,
        check: bool = True,
        env: dict | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess:
        """A Slurm client command (sbatch, scontrol, ...) against this cluster."""
        proc = subprocess.run(
            cmd,
            env={**self.env, **(env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def job_state(self, job_id: str) -> str:
        """The job's state (PENDING, RUNNING, COMPLETED, ...), from scontrol."""
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        match = re.search(r"JobState=(\S+)", out)
        return match.group(1) if match else "UNKNOWN"

    def job_info(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> str:
        """Poll until the job is in one of `states`; returns it, or raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state in states:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {state} after {timeout}s (waited for {sorted(states)})"
                )
            time.sleep(0.2)

    def log_tail(self, lines: int = 10) -> str:
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name} ---\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, then stop the three daemons this cluster started (by their pids)."""
        try:
            self.run("scancel", "--full", "--user", str(os.getuid()), check=False, timeout=10)
            self.run("scancel", "--user", str(os.getuid()), check=False, timeout=10)
        except (subprocess.TimeoutExpired, OSError):
            pass
        for pid_file in reversed(self.pid_files):  # slurmd, slurmctld, then munged
            _stop_pid(pid_file)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """The running test cluster; skips the test, saying why, where there is no Slurm."""
    try:
        cluster = start(tmp_path_factory.mktemp("slurm"))
    except Unavailable as e:
        pytest.skip(f"no Slurm test cluster: {e}")
    yield cluster
    cluster.stop()


def start(root: Path, timeout: float = 60) -> SlurmCluster:
    """Start munged, slurmctld and slurmd under `root`; raises Unavailable with the reason."""
    missing = [
        b
        for b in DAEMONS + CLIENTS
        if shutil.which(b) is None and not Path("/usr/sbin", b).exists()
    ]
    if missing:
        raise Unavailable(
            f"Slurm/munge binaries not found: {', '.join(missing)} (install them with "
            "`bash .ci/install-slurm.sh`: Debian's slurmctld slurmd slurm-client munge)"
        )
    if os.geteuid() != 0:
        raise Unavailable(
            "the private Slurm cluster needs root (slurmd starts jobs, munged runs as root)"
        )
    if not glob.glob(PMIX_PLUGIN_LIBRARY):
        raise Unavailable(
            f"{PMIX_PLUGIN_LIBRARY} is missing, so `srun --mpi=pmix` cannot work "
            "(install Debian's libpmix-dev: `bash .ci/install-slurm.sh`)"
        )
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(exist_ok=True)
    os.chmod(root / "munge", 0o700)
    cluster = SlurmCluster(root=root, node="", env={})
    cluster.env = env = cluster.client_env(os.environ)
    try:
        _start_munge(cluster)
        cluster.node = _write_config(cluster)
        for daemon, args in (("slurmctld", ["-i"]), ("slurmd", [])):
            proc = subprocess.run(
                [_which(daemon), *args], env=env, capture_output=True, text=True, timeout=30
            )
            cluster.pid_files.append(root / f"{daemon}.pid")
            if proc.returncode != 0:
                raise Unavailable(
                    f"{daemon} did not start ({proc.returncode}): {proc.stderr.strip()}"
                )
        _wait_idle(cluster, timeout)
    except Unavailable as e:
        tail = cluster.log_tail()
        cluster.stop()
        raise Unavailable(f"{e}\n{tail}") from None
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _start_munge(cluster: SlurmCluster) -> None:
    """munged with its own key and socket (as root, hence --force)."""
    m = cluster.root / "munge"
    key = m / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o600)
    cmd = [
        _which("munged"),
        "--force",
        f"--socket={m / 'munge.sock'}",
        f"--key-file={key}",
        f"--pid-file={m / 'munged.pid'}",
        f"--seed-file={m / 'munged.seed'}",
        f"--log-file={cluster.root / 'log' / 'munged.log'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    cluster.pid_files.append(m / "munged.pid")
    if proc.returncode != 0:
        raise Unavailable(f"munged did not start ({proc.returncode}): {proc.stderr.strip()}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_config(cluster: SlurmCluster) -> str:
    """slurm.conf and mpi.conf for one node (this host, as `slurmd -C` names it); returns the node name."""
    probe = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30)
    match = re.search(r"NodeName=(\S+).*RealMemory=(\d+)", probe.stdout)
    if probe.returncode != 0 or not match:
        raise Unavailable(f"`slurmd -C` failed: {probe.stdout}{probe.stderr}")
    node, memory = match.groups()
    r = cluster.root
    cluster_name = "hpcllmtest"
    (r / "slurm.conf").write_text(f"""\
# A private one-node test cluster (tests/slurm_cluster.py).
ClusterName={cluster_name}
SlurmctldHost={node}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r / "munge" / "munge.sock"}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
MpiDefault=none
JobRequeue=0
ReturnToService=2
KillWait=15
MinJobAge=600
InactiveLimit=0
MailProg=/bin/true
SchedulerParameters=sched_interval=1
NodeName={node} CPUs={NODE_CPUS} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    # The pip Open MPI's PMIx does not accept Slurm's default munge security for its client.
    (r / "mpi.conf").write_text("PMIxEnv=PMIX_SECURITY_MODE=native\n")
    return node


def _wait_idle(cluster: SlurmCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = "no answer"
    while time.monotonic() < deadline:
        proc = cluster.run("sinfo", "-h", "-n", cluster.node, "-o", "%T", check=False, timeout=10)
        state = proc.stdout.strip() or proc.stderr.strip()
        if state == "idle":
            return
        if state.startswith(("down", "drain")):
            cluster.run(
                "scontrol", "update", f"nodename={cluster.node}", "state=resume", check=False
            )
        time.sleep(0.5)
    raise Unavailable(f"node {cluster.node} did not become idle within {timeout}s (state: {state})")


def _stop_pid(pid_file: Path, grace: float = 10) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Running (a daemon's zombie, left unreaped by a container's init, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
