"""Emulated hosts: N network namespaces on this machine, each a "node" for Open MPI.

Each host is a network namespace `hpcllm-e<X>-h<i>` joined to a bridge `hpcllm-br<X>` in the
root namespace by a veth pair, with the address 10.213.<X>.<i+1>/24, and a UTS namespace of its
own holding the hostname `hpcllm-e<X>-h<i>`. A sleeping holder process keeps both namespaces;
commands run on a host by entering the holder's namespaces (`nsenter --target PID --uts --net`),
which is what the launch agent given to Open MPI in place of ssh does. `mpirun` itself runs on
host 0, so every daemon and rank talks over the emulated network only: the bridge has no address,
so no traffic leaves the namespaces this module created. <X> is the first subnet number not in
use by another run (chosen under a lock), so parallel runs do not collide.

Open MPI needs, and `mpirun_args()` sets:
- a distinct hostname per host (else its daemons collide and the job hangs);
- `--bind-to none` (every host sees the same cores);
- `oob_tcp_if_include` / `btl_tcp_if_include` on the emulated subnet;
- short TCP keepalives on its daemons' connections, so that a host cut off from the network is
  noticed in seconds (by default `mpirun` waits about 8 minutes, then exits 0).

Use from Python (as root):

    with EmulatedHosts(2, rate="100mbit") as hosts:
        subprocess.run(hosts.mpirun_args(2) + ["python", "-m", "hpcllm.train"])
        hosts.cut_link(1)  # or hosts.kill_host(1)

or by hand: `python tests/emulated_hosts.py up 2`, `... run <X> 4 python -m hpcllm.train`,
`... down <X>` (or `down --all`). Everything is torn down on exit, also when the body raises.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "hpcllm"
SUBNET = "10.213"  # 10.213.<X>.0/24 per run; a private range nothing else here uses
LOCK = Path("/run/lock/hpcllm-emulated-hosts.lock")
STATE_DIR = Path("/run/hpcllm-emulated-hosts")  # <X>.env per live run, for the CLI

# Open MPI settings for namespaced hosts (see the module docstring). The keepalive values make a
# silent host (cut link) end the job in about 5 s: first probe after 2 s idle, then 1 s apart,
# 3 unanswered probes.
KEEPALIVE = {
    "oob_tcp_keepalive_time": "2",
    "oob_tcp_keepalive_intvl": "1",
    "oob_tcp_keepalive_probes": "3",
}


def unavailable() -> str | None:
    """Why emulated hosts cannot be made here (None if they can)."""
    if sys.platform != "linux":
        return "emulated hosts need Linux network namespaces"
    if os.geteuid() != 0:
        return "emulated hosts need root (network namespaces, veth pairs, a bridge)"
    missing = [tool for tool in ("ip", "nsenter", "unshare", "tc") if shutil.which(tool) is None]
    if missing:
        return f"emulated hosts need {', '.join(missing)} (iproute2, util-linux)"
    probe = subprocess.run(["unshare", "--net", "--uts", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces here: {probe.stderr.strip()}"
    return None


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


@dataclass
class Host:
    index: int
    name: str  # hostname, network namespace name
    addr: str
    veth: str  # root-side end of its veth pair (on the bridge)
    pid: int = 0  # the holder: a process in the host's namespaces


class EmulatedHosts:
    """N emulated hosts (see the module docstring); a context manager that tears all down."""

    def __init__(self, n: int, rate: str | None = None):
        if n < 1:
            raise ValueError(f"EmulatedHosts needs at least 1 host, got {n}")
        self.n, self.rate = n, rate
        self.x: int | None = None
        self.hosts: list[Host] = []
        self.workdir: Path | None = None
        self._holders: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ set up, tear down

    def __enter__(self) -> EmulatedHosts:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    @property
    def bridge(self) -> str:
        return f"{PREFIX}-br{self.x}"

    @property
    def subnet(self) -> str:
        return f"{SUBNET}.{self.x}.0/24"

    def up(self) -> None:
        """Create the bridge, the namespaces, the veth pairs and the holders."""
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        with open(LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.x = _free_subnet()
            # Created under the lock: the bridge's existence is what marks <X> as taken.
            _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "link", "set", self.bridge, "up")
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-e{self.x}-"))
        for i in range(self.n):
            host = Host(
                i,
                f"{PREFIX}-e{self.x}-h{i}",
                f"{SUBNET}.{self.x}.{i + 1}",
                f"{PREFIX}-{self.x}-{i}",
            )
            self.hosts.append(host)
            _sh("ip", "netns", "add", host.name)
            _sh(
                "ip",
                "link",
                "add",
                host.veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host.name,
            )
            _sh("ip", "link", "set", host.veth, "master", self.bridge, "up")
            ns = ("ip", "-n", host.name)
            _sh(*ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
            _sh(*ns, "link", "set", "eth0", "up")
            _sh(*ns, "link", "set", "lo", "up")
            if self.rate:
                self.set_rate(i, self.rate)
            # The holder: a process in the host's network namespace and a new UTS namespace
            # with the host's name; everything run on the host enters both.
            holder = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    host.name,
                    "unshare",
                    "--uts",
                    "sh",
                    "-c",
                    f"hostname {host.name} && echo ready && exec sleep infinity",
                ],
                stdout=subprocess.PIPE,
                start_new_session=True,
                text=True,
            )
            self._holders.append(holder)
            assert holder.stdout is not None
            if holder.stdout.readline().strip() != "ready":
                raise RuntimeError(f"could not start the holder of {host.name}")
            # `ip netns exec`, `unshare` and `exec` replace themselves: the pid is the sleeper's.
            host.pid = holder.pid
        self._write_agent()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        (STATE_DIR / f"{self.x}.env").write_text(
            f"{self.workdir}\n"
            + "".join(f"{h.name} {h.addr} {h.veth} {h.pid}\n" for h in self.hosts)
        )

    @classmethod
    def attach(cls, x: int) -> EmulatedHosts:
        """The live run <X> that `up` (possibly another process) created; not torn down on exit."""
        path = STATE_DIR / f"{x}.env"
        if not path.is_file():
            raise ValueError(f"no emulated hosts {x} ({path} missing); `up` them first")
        workdir, *lines = path.read_text().splitlines()
        hosts = cls(len(lines))
        hosts.x, hosts.workdir = x, Path(workdir)
        for i, line in enumerate(lines):
            name, addr, veth, pid = line.split()
            hosts.hosts.append(Host(i, name, addr, veth, pid=int(pid)))
        return hosts

    def down(self) -> None:
        """Kill every process on the hosts, delete the namespaces, links and files."""
        if self.x is None:
            return
        _teardown(self.x)
        for holder in self._holders:
            with contextlib.suppress(subprocess.TimeoutExpired):
                holder.wait(timeout=5)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.x, self.hosts = None, []

    def _write_agent(self) -> None:
        """The launch agent: `agent HOST CMD...` runs CMD (a shell command line, as ssh would)
        inside HOST's namespaces. HOST is a hostname or an address of an emulated host."""
        assert self.workdir is not None
        cases = "".join(f"    {h.name}|{h.addr}) pid={h.pid} ;;\n" for h in self.hosts)
        agent = self.workdir / "agent"
        agent.write_text(
            "#!/bin/sh\n"
            "# hpcllm emulated hosts: Open MPI's launch agent in place of ssh.\n"
            "host=$1; shift\n"
            "case $host in\n"
            f"{cases}"
            '    *) echo "emulated-hosts agent: unknown host $host" >&2; exit 255 ;;\n'
            "esac\n"
            'exec nsenter --target "$pid" --uts --net -- /bin/sh -c "$*"\n'
        )
        agent.chmod(0o755)

    # ------------------------------------------------------------------ using the hosts

    @property
    def agent(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "agent"

    def hostfile(self, hosts: list[int] | None = None) -> Path:
        """A hostfile listing `hosts` (indices; default all), host 0 first if included."""
        assert self.workdir is not None
        hosts = list(range(self.n)) if hosts is None else hosts
        path = self.workdir / ("hostfile-" + "-".join(map(str, hosts)))
        path.write_text("".join(f"{self.hosts[i].name} slots=64\n" for i in hosts))
        return path

    def exec_args(self, i: int) -> list[str]:
        """Prefix that runs a command on host i."""
        return ["nsenter", "--target", str(self.hosts[i].pid), "--uts", "--net", "--"]

    def mca_args(self, bind_none: bool = True, keepalive: bool = True) -> list[str]:
        """mpirun options for these hosts (launch agent, interfaces, keepalives, binding)."""
        mca = {
            "plm_ssh_agent": str(self.agent),
            "oob_tcp_if_include": self.subnet,
            "btl_tcp_if_include": self.subnet,
            **(KEEPALIVE if keepalive else {}),
        }
        args = ["--bind-to", "none"] if bind_none else []
        for key, value in mca.items():
            args += ["--mca", key, value]
        return args

    def mpirun_args(self, np: int, hosts: list[int] | None = None) -> list[str]:
        """`mpirun -np NP` started on the first of `hosts` (default all), the ranks spread
        evenly in blocks: ranks 0..k-1 on the first host, k..2k-1 on the next, and so on."""
        hosts = list(range(self.n)) if hosts is None else hosts
        per_host = -(-np // len(hosts))
        return [
            *self.exec_args(hosts[0]),
            "mpirun",
            "-np",
            str(np),
            "--hostfile",
            str(self.hostfile(hosts)),
            "--map-by",
            f"ppr:{per_host}:node",
            *self.mca_args(),
        ]

    def pids(self, i: int) -> list[int]:
        """Processes running on host i (in its network namespace), the holder excepted."""
        return [pid for pid in _pids_in_netns(self.hosts[i].pid) if pid != self.hosts[i].pid]

    def kill_host(self, i: int) -> list[int]:
        """SIGKILL every process on host i (as if the node died); returns their pids."""
        pids = self.pids(i)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def cut_link(self, i: int) -> None:
        """Take host i's link down: its packets are dropped silently, its processes live on."""
        _sh("ip", "link", "set", self.hosts[i].veth, "down")

    def set_rate(self, i: int, rate: str) -> None:
        """Cap host i's link at `rate` (tc units, e.g. 1gbit, 100mbit) in both directions."""
        host = self.hosts[i]
        for ns, dev in ((("ip", "netns", "exec", host.name), "eth0"), ((), host.veth)):
            # Token bucket: burst of 1 ms at the rate (at least 64 kB), up to 50 ms queued.
            _sh(
                *ns,
                "tc",
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "256kb",
                "latency",
                "50ms",
            )


def _free_subnet() -> int:
    taken = set()
    for line in _sh("ip", "-o", "link", "show", "type", "bridge").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(f"{PREFIX}-br") and name[len(PREFIX) + 3 :].isdigit():
            taken.add(int(name[len(PREFIX) + 3 :]))
    # Namespaces left by a run that was killed before its teardown also hold their number.
    for line in _sh("ip", "netns", "list", check=False).stdout.splitlines():
        head = line.split()[0].split("-")
        if len(head) == 3 and head[0] == PREFIX and head[1][1:].isdigit():
            taken.add(int(head[1][1:]))
    for x in range(1, 255):
        if x not in taken:
            return x
    raise RuntimeError(f"no free emulated-host subnet in {SUBNET}.1-254.0/24 (run `down --all`)")


def _netns_names(x: int) -> list[str]:
    return [
        line.split()[0]
        for line in _sh("ip", "netns", "list", check=False).stdout.splitlines()
        if line.startswith(f"{PREFIX}-e{x}-h")
    ]


def _pids_in_netns(holder_or_name: int | str) -> list[int]:
    path = (
        f"/proc/{holder_or_name}/ns/net"
        if isinstance(holder_or_name, int)
        else f"/run/netns/{holder_or_name}"
    )
    try:
        target = os.stat(path).st_ino
    except FileNotFoundError:  # already torn down (e.g. by `down` from another process)
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}/ns/net").st_ino == target:
                    pids.append(int(entry))
    return pids


def _teardown(x: int) -> None:
    """Remove emulated-host run <X>: kill its processes, then its namespaces and links."""
    names = _netns_names(x)
    for _ in range(3):  # processes may fork while being killed
        pids = [pid for name in names for pid in _pids_in_netns(name)]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    for name in names:
        _sh("ip", "netns", "del", name, check=False)
    for line in _sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        link = line.split(":")[1].strip().split("@")[0]
        if link.startswith(f"{PREFIX}-{x}-"):
            _sh("ip", "link", "del", link, check=False)
    _sh("ip", "link", "del", f"{PREFIX}-br{x}", check=False)
    (STATE_DIR / f"{x}.env").unlink(missing_ok=True)
    for d in Path(tempfile.gettempdir()).glob(f"{PREFIX}-e{x}-*"):
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------- by hand: the CLI

ALLREDUCE = """
import socket, time
import numpy as np
from mpi4py import MPI
world = MPI.COMM_WORLD
send = np.ones(16 * 2**20, dtype=np.float32)  # 64 MiB
recv = np.empty_like(send)
world.Allreduce(send, recv)
best = float("inf")
for _ in range(ITERS):
    world.Barrier()
    start = time.perf_counter()
    world.Allreduce(send, recv)
    best = min(best, time.perf_counter() - start)
best = world.allreduce(best, op=MPI.MAX)
if world.rank == 0:
    print(f"64 MiB Allreduce: {best * 1e3:.0f} ms, {send.nbytes / best / 1e9:.3f} GB/s")
"""


def bench_allreduce(rate: str | None, iters: int) -> str:
    """Best of `iters` 64 MiB fp32 Allreduces between 2 emulated hosts, one rank each."""
    with EmulatedHosts(2, rate=rate) as hosts:
        code = ALLREDUCE.replace("ITERS", str(iters))
        result = subprocess.run(
            [*hosts.mpirun_args(2), sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            raise RuntimeError(f"allreduce failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout.strip()


def bench_failure(fault: str, keepalive: bool, data: Path) -> str:
    """Seconds from a fault on host 1 of 2 (kill: SIGKILL of all its processes; cut: its link
    down) to the end of an hpcllm training job, and mpirun's exit status."""
    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import TINY, overrides, prepare_data, subprocess_env

    if not data.exists():
        prepare_data(data)
    with EmulatedHosts(2) as hosts, tempfile.TemporaryDirectory() as run_dir:
        settings = {**TINY, "data.path": data, "run.dir": run_dir, "train.max_steps": 10**6}
        cmd = hosts.mpirun_args(2)
        if not keepalive:
            cmd = [*cmd[: cmd.index("--bind-to")], *hosts.mca_args(keepalive=False)]
        proc = subprocess.Popen(
            [*cmd, sys.executable, "-m", "hpcllm.train", *overrides(settings)],
            cwd=repo,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("step 20/"):
                break
        start = time.perf_counter()
        hosts.kill_host(1) if fault == "kill" else hosts.cut_link(1)
        tail = proc.stdout.read()
        proc.wait()
        ended = time.perf_counter() - start
        named = hosts.hosts[1].name in tail
        return (
            f"{fault}{'' if keepalive else ' (default keepalive)'}: job ended {ended:.1f} s after "
            f"the fault, mpirun exit {proc.returncode}, host named: {named}"
            + ("" if named else f"\n{tail[-2000:]}")
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create N hosts; prints their run number X")
    up.add_argument("n", type=int)
    up.add_argument("--rate", help="cap every link, tc units (e.g. 1gbit, 100mbit)")
    down = sub.add_parser("down", help="tear down run X (or --all)")
    down.add_argument("x", type=int, nargs="?")
    down.add_argument("--all", action="store_true", help="every emulated-host run on this machine")
    run = sub.add_parser("run", help="mpirun -np NP CMD... on run X's hosts (from host 0)")
    run.add_argument("x", type=int)
    run.add_argument("np", type=int)
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    on = sub.add_parser("exec", help="run CMD... on host I of run X")
    on.add_argument("x", type=int)
    on.add_argument("i", type=int)
    on.add_argument("cmd", nargs=argparse.REMAINDER)
    for name, help_ in (
        ("kill", "SIGKILL every process on host I"),
        ("cut", "take host I's link down"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("x", type=int)
        p.add_argument("i", type=int)
    bench = sub.add_parser(
        "bench", help="the link and failure measurements of benchmarks/05-emulated-hosts.md"
    )
    bench.add_argument("--iters", type=int, default=5)
    bench.add_argument("--data", type=Path, default=Path("/tmp/hpcllm-emulated-hosts-data"))
    bench.add_argument(
        "--slow",
        action="store_true",
        help="also a cut link with Open MPI's default keepalive (~8 min)",
    )
    args = parser.parse_args(argv)

    reason = unavailable()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    # Root is required above, and Open MPI refuses root without these.
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    if args.command == "up":
        hosts = EmulatedHosts(args.n, rate=args.rate)
        try:
            hosts.up()
        except BaseException:
            hosts.down()
            raise
        print(f"emulated hosts {hosts.x}: subnet {hosts.subnet}")
        for h in hosts.hosts:
            print(f"  {h.name}  {h.addr}  (enter: nsenter --target {h.pid} --uts --net)")
        print(f"mpirun options: {shlex.join(hosts.mca_args())} --hostfile {hosts.hostfile()}")
        print(f"tear down: python {sys.argv[0]} down {hosts.x}")
    elif args.command == "down":
        if args.all:
            for x in range(1, 255):
                if _netns_names(x) or Path(f"/sys/class/net/{PREFIX}-br{x}").exists():
                    _teardown(x)
        elif args.x is None:
            parser.error("down needs X or --all")
        else:
            _teardown(args.x)
    elif args.command == "run":
        hosts = EmulatedHosts.attach(args.x)
        return subprocess.call([*hosts.mpirun_args(args.np), *args.cmd])
    elif args.command == "exec":
        return subprocess.call([*EmulatedHosts.attach(args.x).exec_args(args.i), *args.cmd])
    elif args.command == "kill":
        print(f"killed {EmulatedHosts.attach(args.x).kill_host(args.i)}")
    elif args.command == "cut":
        EmulatedHosts.attach(args.x).cut_link(args.i)
    elif args.command == "bench":
        for rate in (None, "1gbit", "100mbit"):
            print(f"link {rate or 'uncapped'}: {bench_allreduce(rate, args.iters)}", flush=True)
        for fault in ("kill", "cut"):
            print(bench_failure(fault, True, args.data), flush=True)
        if args.slow:
            print(bench_failure("cut", False, args.data), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
