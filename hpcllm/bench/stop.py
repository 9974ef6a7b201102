"""`python -m hpcllm.bench stop`: how fast a job stops, dies and comes back (no mpirun: it
starts `mpirun ... python -m hpcllm.train` jobs itself, with the venv's mpirun on PATH).

    python -m hpcllm.bench stop --np 2 4 --repeats 3

For each world size: (1) SIGTERM to rank 1, (2) SIGUSR1 to mpirun (what the sbatch scripts'
trap does), (3) kill -9 of rank 1: seconds from the signal to mpirun's exit; then (4) seconds
from a rerun's launch to its first new step in metrics.jsonl (Python and torch start-up, MPI
init, checkpoint load and one step). The model is hpcllm's default (4 x 128, seq 128, 8
sequences per rank) on a small byte corpus. Medians over --repeats.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mpi4py import MPI

from hpcllm.bench.common import BENCH_MODEL, MPI_ENV, record

REPO = Path(__file__).resolve().parents[2]
# The stop timings were taken with idle ranks yielding the CPU (more ranks than cores).
JOB_ENV = {**MPI_ENV, "OMPI_MCA_mpi_yield_when_idle": "1"}
# hpcllm's default model; constant learning rate so a run can be stopped anywhere and resumed.
TRAIN = [
    "--train.log_every",
    "1",
    "--train.eval_every",
    "0",
    "--train.eval_batches",
    "2",
    "--run.sample_tokens",
    "0",
    "--checkpoint.every",
    "0",
    "--optim.warmup_steps",
    "0",
    "--optim.min_lr",
    "1e-3",
]


def corpus(tmp: Path) -> Path:
    """Byte-level shards of ~240 KB of generated text."""
    import random

    from hpcllm.data.prepare import prepare

    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog def return class import self value".split()
    (tmp / "corpus").mkdir()
    for i in range(4):
        (tmp / "corpus" / f"doc{i}.txt").write_text(
            " ".join(rng.choice(words) for _ in range(12000))
        )
    prepare([str(tmp / "corpus")], str(tmp / "data"), tokenizer="byte")
    return tmp / "data"


class Job:
    def __init__(self, np: int, data: Path, run_dir: Path, max_steps: int):
        cmd = [
            "mpirun",
            "-np",
            str(np),
            sys.executable,
            "-m",
            "hpcllm.train",
            *BENCH_MODEL,
            *TRAIN,
            "--data.path",
            str(data),
            "--run.dir",
            str(run_dir),
            "--train.max_steps",
            str(max_steps),
        ]
        self.metrics = run_dir / "metrics.jsonl"
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**os.environ, **JOB_ENV},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc) -> None:
        """However the measurement ends (an error, Ctrl-C), no job outlives it: the 100,000-step
        jobs would train on alone."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def last_step(self) -> int:
        if not self.metrics.exists():
            return 0
        return max(
            (
                json.loads(line)["step"]
                for line in self.metrics.read_text().splitlines()
                if line.endswith("}")
            ),
            default=0,
        )

    def wait_for_step(self, step: int, timeout: float = 300) -> float:
        """Seconds from launch until metrics.jsonl holds `step`."""
        deadline = time.monotonic() + timeout
        while self.last_step() < step:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no step {step} (exit {self.proc.returncode})")
            time.sleep(0.01)
        return time.monotonic() - self.start

    def rank_pid(self, rank: int) -> int:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    env = (entry / "environ").read_bytes().split(b"\0")
                except (OSError, IndexError, ValueError):
                    continue
                if ppid == self.proc.pid and f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
                    return int(entry.name)
        raise RuntimeError(f"rank {rank} not found")

    def time_to_exit(self, pid: int, sig: int) -> tuple[float, int]:
        start = time.monotonic()
        os.kill(pid, sig)
        code = self.proc.wait(timeout=300)
        return time.monotonic() - start, code


def add_arguments(parser) -> None:
    parser.add_argument("--np", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=3)


def run(args, world: MPI.Comm) -> dict:
    if world.Get_size() > 1:
        raise ValueError(
            "run `python -m hpcllm.bench stop` without mpirun: it starts mpirun itself"
        )
    started = time.strftime("%Y-%m-%d %H:%M")
    return record(measure(args), started)


def measure(args) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = corpus(Path(tmp))
        for np in args.np:
            rows: dict[str, list[float]] = {
                "sigterm_rank1_to_exit_s": [],
                "sigusr1_mpirun_to_exit_s": [],
                "kill9_rank1_to_exit_s": [],
                "rerun_to_first_new_step_s": [],
                "step_ms": [],
            }
            for rep in range(args.repeats):
                for case, key in (
                    ("term", "sigterm_rank1_to_exit_s"),
                    ("usr1", "sigusr1_mpirun_to_exit_s"),
                    ("kill", "kill9_rank1_to_exit_s"),
                ):
                    run_dir = Path(tmp) / f"np{np}-{case}-{rep}"
                    with Job(np, data, run_dir, max_steps=100_000) as job:
                        job.wait_for_step(5)
                        t5 = time.monotonic()
                        job.wait_for_step(10)
                        rows["step_ms"].append(1000 * (time.monotonic() - t5) / 5)
                        pid = job.proc.pid if case == "usr1" else job.rank_pid(1)
                        sig = {
                            "term": signal.SIGTERM,
                            "usr1": signal.SIGUSR1,
                            "kill": signal.SIGKILL,
                        }[case]
                        seconds, code = job.time_to_exit(pid, sig)
                    assert (code == 0) == (case != "kill"), (case, code)
                    rows[key].append(seconds)
                    if case == "term":  # resume the stopped run: launch to its first new step
                        stopped = json.loads((run_dir / "status.json").read_text())["step"]
                        with Job(np, data, run_dir, max_steps=stopped + 2) as rerun:
                            first = rerun.wait_for_step(stopped + 1)
                            rows["rerun_to_first_new_step_s"].append(first)
                            rerun.proc.wait(timeout=300)
            results[f"np{np}"] = {k: round(statistics.median(v), 2) for k, v in rows.items()}
            print(
                f"np {np}: " + ", ".join(f"{k} {v}" for k, v in results[f"np{np}"].items()),
                flush=True,
            )
    return results
