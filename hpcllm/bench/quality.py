"""`python -m hpcllm.bench quality`: validation bits per byte reached in a fixed wall-clock
budget, for variants of hpcllm's settings and for nanoGPT's README CPU recipe side by side on
the same bytes (run it without mpirun: it starts the jobs itself).

    python -m hpcllm.bench quality --budget-s 100 --np 2 \\
        --variant base= --variant llama="--model.arch llama --optim.name muon" \\
        --nanogpt /path/to/nanoGPT

Equal wall time with a finished schedule: each run's learning rate decays to its end, so
cutting a run at a time limit would handicap it. Each variant (and nanoGPT) first runs a short
probe that measures its ms per step on this machine; the real run then gets
`budget_s / ms_per_step` steps, with validation only at the end, and reports the training
time it actually took. The budget is the training loop's time; start-up (imports, MPI,
reading the data) and the final validation are reported beside it.

Bits per byte make the variants comparable across tokenizers: hpcllm reports them itself
(val loss in nats per token / ln 2 / bytes per token, over the whole validation split). nanoGPT
trains on the byte tokens of hpcllm's byte-level default corpus (train.bin and val.bin written
from the same shards, 257 ids), and its final `val loss` (nats per byte, on random windows of
the same validation split) is converted with the same bytes per token.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from hpcllm.bench.common import MPI_ENV, environment, table
from hpcllm.bench.steps import NANOGPT_ITER, link_nanogpt

NANOGPT_VAL = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)", re.M)
# nanoGPT's README CPU recipe (4 layers, d 128, block 64, batch 12, lr 1e-3, no dropout).
NANOGPT_RECIPE = [
    "config/train_shakespeare_char.py",
    *("--device=cpu", "--compile=False", "--log_interval=1"),
    *("--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128"),
    "--dropout=0.0",
]


def add_arguments(parser) -> None:
    parser.add_argument(
        "--budget-s", type=float, default=100.0, help="training seconds per run (default 100)"
    )
    parser.add_argument("--np", type=int, default=2, help="ranks per hpcllm run (default 2)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="a run of hpcllm with these --section.key overrides (repeatable; 'base=' is the defaults)",
    )
    parser.add_argument(
        "--data",
        default="data/stdlib",
        help="byte-level shards for runs that do not set --data.path, and nanoGPT's bytes "
        "(default data/stdlib, prepared if missing)",
    )
    parser.add_argument("--nanogpt", default="", help="a nanoGPT clone: run its README CPU recipe")
    parser.add_argument("--probe-steps", type=int, default=30, help="steps of each probe run")
    parser.add_argument("--out", default="", help="keep run folders here (default: temporary)")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_hpcllm(np_: int, overrides: list[str], run_dir: Path, steps: int, data: str) -> dict:
    """One training job of `steps` steps; its ms per step, training seconds and final val."""
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    has_data = any(o.startswith("--data.path") for o in overrides)
    cmd = [
        mpirun if os.path.exists(mpirun) else "mpirun",
        *("-np", str(np_), sys.executable, "-m", "hpcllm.train"),
        *("--run.dir", str(run_dir), "--train.max_steps", str(steps)),
        *("--train.eval_every", "0", "--checkpoint.every", "0", "--run.sample_tokens", "0"),
        *("--train.log_every", "1", "--checkpoint.resume", "false"),
        *([] if has_data else ["--data.path", data]),
        *overrides,
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, **MPI_ENV}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
    records = _metrics(run_dir)
    steps_ms = [r["ms_per_step"] for r in records if "loss" in r]
    val = [r for r in records if "val_bpb" in r]
    return {
        "steps": steps,
        "ms_per_step": statistics.median(steps_ms[len(steps_ms) // 3 :]),
        "train_s": sum(steps_ms) / 1000,
        "wall_s": wall,
        "val_bpb": val[-1]["val_bpb"] if val else math.nan,
        "val_loss": val[-1]["val_loss"] if val else math.nan,
    }


def run_nanogpt(clone: Path, workdir: Path, iters: int) -> dict:
    link_nanogpt(clone, workdir)
    cmd = [
        sys.executable,
        "train.py",
        *NANOGPT_RECIPE,
        *(f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--eval_interval={iters}"),
        "--eval_iters=100",
    ]
    # The README's recipe leaves torch its default threads: the machine's cores.
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    start = time.perf_counter()
    out = subprocess.run(
        cmd, cwd=workdir, env=env, check=True, capture_output=True, text=True
    ).stdout
    wall = time.perf_counter() - start
    times = [float(ms) for _, ms in NANOGPT_ITER.findall(out)]
    vals = NANOGPT_VAL.findall(out)
    if not times or not vals:
        raise RuntimeError(f"nanoGPT printed no iteration or val lines:\n{out[-2000:]}")
    return {
        "steps": iters,
        "ms_per_step": statistics.median(times[len(times) // 3 :]),
        # iteration times exclude the evaluations, as hpcllm's training time does
        "train_s": sum(times) / 1000,
        "wall_s": wall,
        "val_loss": float(vals[-1][2]),
    }


def write_nanogpt_bytes(shards: str, folder: Path) -> float:
    """nanoGPT's train.bin/val.bin/meta.pkl from byte-level shards; returns the bytes per token
    of the val split (EOT tokens carry no text)."""
    import pickle

    import h5py

    from hpcllm.data.shards import open_splits

    train, val = open_splits(shards)
    train.close()
    val.close()
    if train.vocab_size != 257:
        raise ValueError(f"--data {shards}: nanoGPT needs byte-level shards (vocab 257)")
    folder.mkdir(parents=True, exist_ok=True)
    bytes_per_token = 1.0
    for split, name in ((train, "train"), (val, "val")):
        parts = []
        for path in split.paths:
            with h5py.File(path, "r") as f:
                parts.append(f["tokens"][:])
        tokens = np.concatenate(parts)
        tokens.astype(np.uint16).tofile(folder / f"{name}.bin")
        bytes_per_token = float(np.count_nonzero(tokens < 256)) / len(tokens)  # val's, last
    itos = {i: chr(i) for i in range(256)}
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 257, "itos": itos, "stoi": {c: i for i, c in itos.items()}}, f)
    return bytes_per_token


def _parse_variants(specs: list[str]) -> dict[str, list[str]]:
    variants = {}
    for spec in specs or ["base="]:
        name, sep, overrides = spec.partition("=")
        if not sep or not name:
            raise ValueError(f"--variant {spec!r}: expected NAME=OVERRIDES (e.g. base=)")
        variants[name] = shlex.split(overrides)
    return variants


def run(args, world: MPI.Comm) -> dict:
    if world.Get_size() > 1:
        raise ValueError("run `python -m hpcllm.bench quality` without mpirun: it starts mpirun")
    variants = _parse_variants(args.variant)
    if not any(Path(args.data).glob("train-*.h5")):
        from hpcllm.data.prepare import prepare

        prepare(None, args.data, progress_s=None)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        for name, overrides in variants.items():
            probe = run_hpcllm(
                args.np, overrides, root / f"{name}-probe", args.probe_steps, args.data
            )
            steps = max(1, int(args.budget_s * 1000 / probe["ms_per_step"]))
            got = run_hpcllm(args.np, overrides, root / name, steps, args.data)
            got["load_avg_1m"] = os.getloadavg()[0]
            results[name] = got
            print(f"{name}: {json.dumps(got)}", flush=True)
        if args.nanogpt:
            clone = Path(args.nanogpt)
            workdir = root / "nanogpt"
            bytes_per_token = write_nanogpt_bytes(args.data, workdir / "data" / "shakespeare_char")
            probe = run_nanogpt(clone, workdir, args.probe_steps)
            got = run_nanogpt(clone, workdir, int(args.budget_s * 1000 / probe["ms_per_step"]))
            got["val_bpb"] = got["val_loss"] / math.log(2) / bytes_per_token
            got["load_avg_1m"] = os.getloadavg()[0]
            results["nanoGPT"] = got
            print(f"nanoGPT: {json.dumps(got)}", flush=True)
    reference = results.get("nanoGPT")
    rows = [
        [
            name,
            r["steps"],
            r["ms_per_step"],
            r["train_s"],
            r["wall_s"],
            r["val_bpb"],
            f"{100 * (1 - r['val_bpb'] / reference['val_bpb']):+.1f}%" if reference else "",
        ]
        for name, r in results.items()
    ]
    print(f"\nbudget {args.budget_s:.0f} s of training per run, hpcllm on {args.np} rank(s)")
    print(
        table(
            [
                "run",
                "steps",
                "ms/step",
                "train s",
                "job wall s",
                "val bits/byte",
                "fewer than nanoGPT",
            ],
            rows,
        )
    )
    return {
        "benchmark": "quality",
        "budget_s": args.budget_s,
        "runs": results,
        "env": environment(),
    }
