"""`python -m hpcllm.bench compression`: gradient compression modes (parallel.grad_compression)
in real training runs: `mpirun -np N python -m hpcllm.train` with the benchmarks' gpt2 +
AdamW (`common.BENCH_MODEL`) on the default corpus, one run per mode, reading step time, the gradient bytes each rank sent
(`grad_wire_bytes`) and the losses from metrics.jsonl.

    python -m hpcllm.bench compression --np 2 --steps 60     # no mpirun: it starts the runs
    python -m hpcllm.bench compression --modes none powersgd:4 -- --train.micro_batch_size 4

A mode is none, bf16, fp16, or powersgd:RANK. Arguments after `--` go to every run (e.g. the
mpirun-free options of hpcllm.train); `--mpirun-args` to mpirun (emulated hosts, link caps).
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mpi4py import MPI

from hpcllm.bench.common import BENCH_MODEL, MPI_ENV, machine, table

DEFAULT_MODES = ["none", "bf16", "fp16", "powersgd:1", "powersgd:4", "powersgd:16"]


def add_arguments(parser) -> None:
    parser.add_argument("--np", type=int, default=2, help="ranks (dp) per run (default 2)")
    parser.add_argument("--steps", type=int, default=60, help="steps per run (default 60)")
    parser.add_argument(
        "--skip", type=int, default=15, help="first steps left out of the medians (default 15)"
    )
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES, help="modes to run, in order")
    parser.add_argument("--mpirun-args", default="", help="extra mpirun options, one string")
    parser.add_argument("train_args", nargs="*", help="after --: options for every run")


def mode_args(mode: str) -> list[str]:
    """hpcllm.train options of a mode: 'powersgd:4' -> powersgd at rank 4."""
    name, _, rank = mode.partition(":")
    args = ["--parallel.grad_compression", name]
    return args + (["--parallel.powersgd_rank", rank] if rank else [])


def run_mode(args, mode: str, run_dir: Path) -> dict:
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    cmd = [
        mpirun if os.path.exists(mpirun) else "mpirun",
        *("-np", str(args.np), *shlex.split(args.mpirun_args)),
        *(sys.executable, "-m", "hpcllm.train", *BENCH_MODEL, "--run.dir", str(run_dir)),
        *("--train.max_steps", str(args.steps), "--train.log_every", "1"),
        *("--train.eval_every", "0", "--checkpoint.every", "0", "--run.sample_tokens", "0"),
        *mode_args(mode),
        *args.train_args,
    ]
    start = time.perf_counter()
    subprocess.run(cmd, env={**os.environ, **MPI_ENV}, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    timed = [r for r in steps if r["step"] > args.skip]
    return {
        "mode": mode,
        "ms_per_step": statistics.median(r["ms_per_step"] for r in timed),
        "grad_wire_bytes": statistics.median(r["grad_wire_bytes"] for r in timed),
        "final_loss": steps[-1]["loss"],
        "val_loss": [r for r in records if "val_loss" in r][-1]["val_loss"],
        "run_s": time.perf_counter() - start,
        "load_avg_1m": os.getloadavg()[0],
    }


def run(args, world: MPI.Comm) -> dict:
    if world.Get_size() > 1:
        raise ValueError(
            "run `python -m hpcllm.bench compression` without mpirun: it starts mpirun"
        )
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            got = run_mode(args, mode, Path(tmp) / mode.replace(":", "-"))
            results.append(got)
            print(
                f"{mode}: {got['ms_per_step']:.1f} ms/step, {got['grad_wire_bytes'] / 1e6:.3f} MB "
                f"per step on the wire, loss {got['final_loss']:.4f} (run {got['run_s']:.0f} s, "
                f"load average {got['load_avg_1m']:.1f})",
                flush=True,
            )
    base = next((r for r in results if r["mode"] == "none"), results[0])
    rows = [
        [
            r["mode"],
            r["ms_per_step"],
            r["grad_wire_bytes"] / 1e6,
            base["grad_wire_bytes"] / max(r["grad_wire_bytes"], 1),
            r["final_loss"],
            r["val_loss"],
            f"{100 * (r['val_loss'] / base['val_loss'] - 1):+.2f}%",
        ]
        for r in results
    ]
    print(
        f"\ngradient compression: np {args.np}, {args.steps} steps per run (medians after step "
        f"{args.skip}), {machine()}, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        table(
            [
                "mode",
                "ms/step",
                "wire MB/step",
                "x fewer",
                "loss",
                "val loss",
                f"vs {base['mode']}",
            ],
            rows,
        )
    )
    return {"benchmark": "compression", "date": started, "np": args.np, "results": results}
