"""Operations timings for BENCHMARKS.md: how fast a job stops, dies and comes back; checkpoint cost.

    python slurm/bench_ops.py stop --np 2 4 --repeats 3      # under the venv's mpirun
    python slurm/bench_ops.py checkpoint --n-layer 12 --d-model 768 --vocab 8192

stop        For each world size: (1) SIGTERM to rank 1, (2) SIGUSR1 to mpirun (what the sbatch
            scripts' trap does), (3) kill -9 of rank 1: seconds from the signal to mpirun's exit;
            then (4) seconds from a rerun's launch to its first new step in metrics.jsonl
            (Python and torch start-up, MPI init, checkpoint load and one step). The model is
            hpcllm's default (4 x 128, seq 128, 8 sequences per rank) on a small byte corpus.
checkpoint  Save (hpcllm.checkpoint.save: fsync'ed files, atomic rename) and load time and
            size on disk of a model with its AdamW state, on one rank.

Medians over --repeats. Prints a table and, with --json PATH, writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
    "OMP_NUM_THREADS": "1",
    "OMPI_MCA_mpi_yield_when_idle": "1",
}
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


def machine() -> str:
    return f"{platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"


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
            env={**os.environ, **MPI_ENV},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

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


def bench_stop(args) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = corpus(Path(tmp))
        for np in args.np:
            rows = {
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
                    job = Job(np, data, run_dir, max_steps=100_000)
                    job.wait_for_step(5)
                    t5 = time.monotonic()
                    job.wait_for_step(10)
                    rows["step_ms"].append(1000 * (time.monotonic() - t5) / 5)
                    pid = job.proc.pid if case == "usr1" else job.rank_pid(1)
                    sig = {"term": signal.SIGTERM, "usr1": signal.SIGUSR1, "kill": signal.SIGKILL}[
                        case
                    ]
                    seconds, code = job.time_to_exit(pid, sig)
                    assert (code == 0) == (case != "kill"), (case, code)
                    rows[key].append(seconds)
                    if case == "term":  # resume the stopped run: launch to its first new step
                        stopped = json.loads((run_dir / "status.json").read_text())["step"]
                        rerun = Job(np, data, run_dir, max_steps=stopped + 2)
                        rows["rerun_to_first_new_step_s"].append(rerun.wait_for_step(stopped + 1))
                        rerun.proc.wait(timeout=300)
            results[f"np{np}"] = {k: round(statistics.median(v), 2) for k, v in rows.items()}
            print(
                f"np {np}: " + ", ".join(f"{k} {v}" for k, v in results[f"np{np}"].items()),
                flush=True,
            )
    return results


def bench_checkpoint(args) -> dict:
    import torch
    from mpi4py import MPI

    from hpcllm import checkpoint
    from hpcllm.model import GPT, ModelConfig, param_groups
    from hpcllm.topology import Grid

    cfg = ModelConfig(
        vocab_size=args.vocab,
        block_size=args.block,
        n_layer=args.n_layer,
        n_head=args.d_model // 64,
        d_model=args.d_model,
    )
    grid = Grid.build(MPI.COMM_WORLD)

    def model_and_optimizer():
        model = GPT(cfg)
        optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)
        return model, optimizer

    model, optimizer = model_and_optimizer()
    for p in model.parameters():  # one step, so AdamW has its exp_avg and exp_avg_sq
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    n_params = sum(p.numel() for p in model.parameters())
    saves, loads, size = [], [], 0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for rep in range(args.repeats):
            start = time.perf_counter()
            path = checkpoint.save(
                tmp,
                rep + 1,
                grid=grid,
                model=model,
                optimizer=optimizer,
                extra={"loader": {}, "config": {}},
                keep=1,
            )
            saves.append(time.perf_counter() - start)
            size = sum(f.stat().st_size for f in path.iterdir())
            fresh_model, fresh_optimizer = model_and_optimizer()
            os.system("sync")
            start = time.perf_counter()
            checkpoint.load(
                path, model=fresh_model, optimizer=fresh_optimizer, world_rank=0, same_layout=True
            )
            loads.append(time.perf_counter() - start)
            del fresh_model, fresh_optimizer
    result = {
        "params_M": round(n_params / 1e6, 1),
        "size_MB": round(size / 1e6),
        "save_s": round(statistics.median(saves), 2),
        "load_s": round(statistics.median(loads), 2),
        "save_MB_per_s": round(size / 1e6 / statistics.median(saves)),
        "load_MB_per_s": round(size / 1e6 / statistics.median(loads)),
    }
    print(
        f"checkpoint of {result['params_M']}M parameters (n_layer {args.n_layer}, d_model {args.d_model}, "
        f"vocab {args.vocab}, block {args.block}) + AdamW: {result}",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    stop = sub.add_parser("stop")
    stop.add_argument("--np", type=int, nargs="+", default=[2, 4])
    stop.add_argument("--repeats", type=int, default=3)
    ckpt = sub.add_parser("checkpoint")
    ckpt.add_argument("--n-layer", type=int, default=12)
    ckpt.add_argument("--d-model", type=int, default=768)
    ckpt.add_argument("--vocab", type=int, default=8192)
    ckpt.add_argument("--block", type=int, default=1024)
    ckpt.add_argument("--repeats", type=int, default=3)
    ckpt.add_argument(
        "--dir", default=None, help="where to write (default: the system's temp folder)"
    )
    for p in (stop, ckpt):
        p.add_argument("--json", default=None)
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M")
    result = bench_stop(args) if args.what == "stop" else bench_checkpoint(args)
    record = {
        "date": started,
        "machine": machine(),
        "load_avg_1m_at_end": os.getloadavg()[0],
        **result,
    }
    print(json.dumps(record, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
