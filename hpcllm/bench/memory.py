"""`python -m hpcllm.bench memory`: peak memory per rank, measured, for one model under
(dp 2), (dp 2, zero 1), (tp 2), (pp 2) and, on 4 ranks, (dp 2, tp 2) with zero 0 and 1,
beside the planner's prediction (`hpcllm.planner`). Run it without mpirun: each layout runs in
a fresh `mpirun` (the peak resident set is a per-process high-water mark), for a few steps
of the training loop's step.

    python -m hpcllm.bench memory --steps 3

Measured per rank: the growth of the resident set (ru_maxrss at the end over VmRSS before the
model is built), the bytes of parameters, gradients and optimizer state held (distinct
storages), and the activations' peak (the pipeline's ActivationMeter).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile

from mpi4py import MPI

from hpcllm.bench.common import MPI_ENV, environment, table
from hpcllm.bench.layouts import (
    add_model_arguments,
    bench_config,
    build,
    held_bytes,
    random_batches,
    take_step,
)
from hpcllm.config import Config
from hpcllm.models.gpt import GPT
from hpcllm.planner import make_plan

# name -> (ranks, pp, tp, zero, micro-batch size, micro-batches): a global batch of 8
# sequences.
LAYOUTS = {
    "dp2": (2, 1, 1, 0, 4, 1),
    "dp2 zero1": (2, 1, 1, 1, 4, 1),
    "tp2": (2, 1, 2, 0, 8, 1),
    "pp2": (2, 2, 1, 0, 2, 4),
    "dp2 tp2": (4, 1, 2, 0, 4, 1),
    "dp2 tp2 zero1": (4, 1, 2, 1, 4, 1),
}


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, default=3, help="steps per layout (default 3)")
    add_model_arguments(parser, seq_len=256, n_layer=8, n_head=8, d_model=512, vocab=8192)
    parser.add_argument(
        "--layout",
        choices=list(LAYOUTS),
        help="one layout on this mpirun's ranks (the driver starts these)",
    )


def layout(args, name: str) -> Config:
    _, pp, tp, zero, micro, accum = LAYOUTS[name]
    return bench_config(args, micro_batch=micro, accum=accum, pp=pp, tp=tp, zero=zero)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib * 1024


def measure(args, world: MPI.Comm) -> list[dict] | None:
    """One layout on this mpirun's ranks: every rank's measurements, on rank 0."""
    import torch

    torch.set_num_threads(1)
    cfg = layout(args, args.layout)
    before = _rss_bytes()
    rank = build(cfg, world)
    for i in range(args.steps):
        take_step(rank, random_batches(rank, i))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    stage = make_plan(cfg, world.Get_size()).stages[rank.grid.rank("pp")]
    mine = {
        "layout": args.layout,
        "coords": dict(rank.grid.coords),
        "rss_growth": peak - before,
        **held_bytes(rank),
        "activations": rank.schedule.meter.peak,
        "planned": {
            "params": stage.memory.params,
            "grads": stage.memory.grads,
            "optimizer": stage.memory.optimizer,
            "activations": stage.activations,
            "total": stage.total,
        },
    }
    rank.grid.free()
    return world.gather(mine, root=0)


def run(args, world: MPI.Comm) -> dict:
    if args.layout:
        return {"ranks": measure(args, world)}  # main() writes it to --json
    if world.Get_size() > 1:
        raise ValueError("run `python -m hpcllm.bench memory` without mpirun: it starts mpirun")
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    options = [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("steps", "seq_len", "n_layer", "n_head", "d_model", "vocab")
    ]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in LAYOUTS:
            out = os.path.join(tmp, "out.json")
            ranks = str(LAYOUTS[name][0])
            cmd = [mpirun if os.path.exists(mpirun) else "mpirun", "-np", ranks, sys.executable]
            cmd += ["-m", "hpcllm.bench", "memory", "--layout", name, *options, "--json", out]
            print(
                f"$ mpirun -np {ranks} python -m hpcllm.bench memory --layout '{name}'", flush=True
            )
            subprocess.run(cmd, check=True, env={**os.environ, **MPI_ENV})
            with open(out) as f:
                results += json.load(f)["ranks"]
    rows = []
    for r in results:
        held = r["params"] + r["grads"] + r["optimizer"]
        p = r["planned"]
        planned_held = p["params"] + p["grads"] + p["optimizer"]
        c = r["coords"]
        rows.append(
            [
                r["layout"],
                f"pp {c['pp']} dp {c['dp']} tp {c['tp']}",
                r["rss_growth"] / 2**20,
                held / 2**20,
                planned_held / 2**20,
                r["activations"] / 2**20,
                p["activations"] / 2**20,
                (held + r["activations"]) / 2**20,
                p["total"] / 2**20,
            ]
        )
    n_params = sum(q.numel() for q in GPT(layout(args, "dp2").model).parameters())
    print(
        f"peak memory per rank, MiB: GPT of {n_params / 1e6:.1f}M parameters ({args.n_layer} x "
        f"{args.d_model}, vocab {args.vocab}), global batch 8 x {args.seq_len}, fp32, AdamW, "
        f"{args.steps} steps; rss growth = ru_maxrss - VmRSS before the model was built"
    )
    print(
        table(
            [
                "layout",
                "rank",
                "rss growth",
                "tensors held",
                "planned",
                "activations",
                "planned",
                "held + act.",
                "planned total",
            ],
            rows,
        )
    )
    return {"benchmark": "memory", "ranks": results, "params": n_params, "env": environment()}
