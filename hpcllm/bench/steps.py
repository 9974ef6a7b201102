"""`python -m hpcllm.bench steps`: ms per step of small steps, hpcllm against nanoGPT's train.py
with its README CPU settings, side by side on the same machine (run it without mpirun).

    python -m hpcllm.bench steps --nanogpt /path/to/nanoGPT --steps 60 --rounds 2

Same model and batch as nanoGPT's CPU recipe: 4 layers, 4 heads, d_model 128, seq 64, no
dropout, tied embeddings, 12 sequences per step, on the same text and vocabulary (the bytes of
a slice of Python's standard library, 257 ids: nanoGPT's train.bin/val.bin/meta.pkl are
written from the same bytes in a temporary folder). Three runs alternate in each round:
`mpirun -np 1 python -m hpcllm.train --train.threads 2`, `mpirun -np 2` with 6 sequences per
rank, and `python train.py config/train_shakespeare_char.py --device=cpu --compile=False ...`
with nanoGPT's files linked into that folder (its own code, run as it is; nothing of it is
copied into hpcllm). A run's
ms/step is the median over its steps after `--warmup`: hpcllm's per-step metrics.jsonl records
(validation and checkpoints excluded), nanoGPT's `iter k: ... time X ms` lines. hpcllm's runs
also give the loader's share of a step (time waiting for samples) and the per-step fixed
costs (all but loader, forward, backward and optimizer: loss all-reduce, logging, stop flag).
"""

from __future__ import annotations

import os
import pickle
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from hpcllm.bench.common import BENCH_MODEL, MPI_ENV, environment, table

NANOGPT_ITER = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", re.M)
LABELS = {
    "np1": "hpcllm np 1 x 2 threads, 12 seq",
    "np2": "hpcllm np 2 x 1 thread, 6 seq/rank",
    "nanogpt": "nanoGPT train.py (CPU recipe)",
}


def add_arguments(parser) -> None:
    parser.add_argument(
        "--nanogpt",
        default=os.environ.get("NANOGPT", "/work/peers/nanoGPT"),
        help="a clone of github.com/karpathy/nanoGPT (default $NANOGPT or /work/peers/nanoGPT)",
    )
    parser.add_argument("--steps", type=int, default=60, help="steps per run (default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="steps not counted (default 10)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the three (default 2)")
    parser.add_argument(
        "--corpus-mb", type=float, default=2.0, help="MiB of standard-library text (default 2)"
    )


def write_corpus(out: Path, mib: float) -> bytes:
    """The first `mib` MiB of the standard library's .py files (sorted) as one text file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text, limit = bytearray(), int(mib * 2**20)
    for path in sorted(stdlib.glob("*.py")):
        text += path.read_bytes()
        if len(text) >= limit:
            break
    out.mkdir(parents=True)
    (out / "stdlib.py.txt").write_bytes(bytes(text[:limit]))
    return bytes(text[:limit])


def write_nanogpt_data(folder: Path, text: bytes) -> None:
    """train.bin, val.bin (uint16 ids, 90/10) and meta.pkl as nanoGPT's char-level prepare.py
    writes them; the ids are the bytes, and the vocabulary is hpcllm's byte one (257)."""
    folder.mkdir(parents=True)
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    cut = int(0.9 * len(ids))
    ids[:cut].tofile(folder / "train.bin")
    ids[cut:].tofile(folder / "val.bin")
    itos = {i: chr(i) for i in range(256)}
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 257, "itos": itos, "stoi": {c: i for i, c in itos.items()}}, f)


def run_hpcllm(np_: int, data: Path, run_dir: Path, steps: int, warmup: int) -> dict:
    import json

    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    per_rank = 12 // np_
    threads = ["--train.threads", "2"] if np_ == 1 else []
    cmd = [
        mpirun if os.path.exists(mpirun) else "mpirun",
        "-np",
        str(np_),
        sys.executable,
        "-m",
        "hpcllm.train",
        *BENCH_MODEL,
        *("--data.path", str(data), "--run.dir", str(run_dir)),
        *("--model.n_layer", "4", "--model.n_head", "4", "--model.d_model", "128"),
        *("--model.dropout", "0.0", "--model.tie_embeddings", "true"),
        *("--train.seq_len", "64", "--train.micro_batch_size", str(per_rank)),
        *("--train.max_steps", str(steps), "--train.log_every", "1", "--train.eval_every", "0"),
        *("--train.eval_batches", "20", "--checkpoint.every", "0", "--run.sample_tokens", "0"),
        *threads,
    ]
    subprocess.run(cmd, env={**os.environ, **MPI_ENV}, check=True, stdout=subprocess.DEVNULL)
    records = [
        r
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if "loss" in r and r["step"] > warmup
    ]
    ms = statistics.median(r["ms_per_step"] for r in records)
    return {
        "ms_per_step": ms,
        "loader_frac": statistics.median(r["loader_frac"] for r in records),
        "fixed_ms": statistics.median(r["fixed_frac"] * r["ms_per_step"] for r in records),
        "mfu": statistics.median(r["mfu"] for r in records),
    }


def link_nanogpt(clone: Path, workdir: Path) -> None:
    """nanoGPT's train.py reads configurator.py, the config and data/ from its working folder:
    links to the clone's files there, beside the data written for it."""
    for name in ("train.py", "model.py", "configurator.py", "config"):
        if not (workdir / name).exists():
            (workdir / name).symlink_to(clone / name)


def run_nanogpt(clone: Path, workdir: Path, steps: int, warmup: int) -> dict:
    link_nanogpt(clone, workdir)
    cmd = [
        sys.executable,
        "train.py",
        "config/train_shakespeare_char.py",
        *("--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1"),
        *("--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128"),
        f"--max_iters={steps}",
        f"--lr_decay_iters={steps}",
        "--dropout=0.0",
    ]
    # The README's recipe leaves torch its default threads: the machine's cores (2 here).
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run(
        cmd, cwd=workdir, env=env, check=True, capture_output=True, text=True
    ).stdout
    times = [float(ms) for it, ms in NANOGPT_ITER.findall(out) if int(it) > warmup]
    if not times:
        raise RuntimeError(f"no 'iter k: ... time X ms' lines from nanoGPT:\n{out[-2000:]}")
    return {"ms_per_step": statistics.median(times)}


def run(args, world: MPI.Comm) -> dict:
    if world.Get_size() > 1:
        raise ValueError("run `python -m hpcllm.bench steps` without mpirun: it starts mpirun")
    clone = Path(args.nanogpt)
    if not (clone / "train.py").is_file():
        raise ValueError(f"--nanogpt {clone}: no train.py there; give a clone of nanoGPT")
    from hpcllm.data.prepare import prepare

    results: dict[str, list[dict]] = {k: [] for k in LABELS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text = write_corpus(root / "corpus", args.corpus_mb)
        prepare([str(root / "corpus")], str(root / "shards"), val_fraction=0.1, progress_s=None)
        write_nanogpt_data(root / "nanogpt" / "data" / "shakespeare_char", text)
        for r in range(args.rounds):
            for name in LABELS:
                start = time.perf_counter()
                if name == "nanogpt":
                    got = run_nanogpt(clone, root / "nanogpt", args.steps, args.warmup)
                else:
                    n = int(name[-1])
                    got = run_hpcllm(
                        n, root / "shards", root / f"run-{r}-{n}", args.steps, args.warmup
                    )
                got["load_avg_1m"] = os.getloadavg()[0]
                results[name].append(got)
                print(
                    f"round {r + 1}/{args.rounds} {LABELS[name]}: {got['ms_per_step']:.1f} ms/step "
                    f"(run {time.perf_counter() - start:.0f} s, load average {got['load_avg_1m']:.1f})",
                    flush=True,
                )
    ms = {k: statistics.median(x["ms_per_step"] for x in v) for k, v in results.items()}
    rows = []
    for name in LABELS:
        runs = results[name]
        hp = name != "nanogpt"
        rows.append(
            [
                LABELS[name],
                ms[name],
                ms["nanogpt"] / ms[name],
                f"{100 * statistics.median(x['loader_frac'] for x in runs):.2f}%" if hp else "",
                statistics.median(x["fixed_ms"] for x in runs) if hp else "",
                f"{100 * statistics.median(x['mfu'] for x in runs):.1f}%" if hp else "",
            ]
        )
    print(
        f"\nsmall steps: 4 x 128, seq 64, 12 sequences per step, {args.steps} steps per run "
        f"(median after {args.warmup}), {args.rounds} round(s) alternating; load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    print(
        table(["run", "ms/step", "nanoGPT ms / this", "loader share", "fixed ms/step", "MFU"], rows)
    )
    print("target: hpcllm np 1 and np 2 at least as fast per step as nanoGPT (ratio >= 1.0)")
    return {
        "benchmark": "steps",
        "runs": results,
        "ms_per_step": ms,
        "ratio_nanogpt_over": {k: ms["nanogpt"] / ms[k] for k in ("np1", "np2")},
        "env": environment(),
    }
