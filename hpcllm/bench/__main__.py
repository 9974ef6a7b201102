"""`python -m hpcllm.bench <subject>`: what hpcllm's parallelism and operations cost, next to
plain baselines. One module of hpcllm.bench per subject; figures in benchmarks/.

    mpirun -np 2 python -m hpcllm.bench allreduce --mb 64 --bucket-mb 25 --iters 20
    mpirun -np 2 python -m hpcllm.bench train --steps 30 --warmup 5
    python -m hpcllm.bench scaling        # no mpirun: runs `train` under mpirun -np 1 and -np 2
    mpirun -np 2 python -m hpcllm.bench pipeline --iters 10
    python -m hpcllm.bench stop --np 2 4 --repeats 3      # no mpirun: starts training jobs
    python -m hpcllm.bench checkpoint --n-layer 12 --d-model 768 --vocab 8192
    mpirun -np 2 python -m hpcllm.bench zero --steps 30 --warmup 5
    python -m hpcllm.bench steps --nanogpt ../nanoGPT       # no mpirun: hpcllm vs nanoGPT
    python -m hpcllm.bench quality --budget-s 100 --nanogpt ../nanoGPT --variant base=
    python -m hpcllm.bench compression --np 2 --steps 60    # no mpirun: one run per mode
    mpirun -np 2 python -m hpcllm.bench collectives --mb 1 8 64
    mpirun -np 2 python -m hpcllm.bench tp --steps 10
    python -m hpcllm.bench memory         # no mpirun: one mpirun per layout
    python -m hpcllm.bench multinode --rates 1gbit 100mbit  # no mpirun; root: emulated hosts

Times are medians over iterations, each iteration timed by its slowest rank. Results say how
much of the CPUs other processes used meanwhile: on a shared machine, compare only quiet runs.
Every subject prints a table or a record on rank 0, and `--json PATH` saves the figures.
"""

from __future__ import annotations

import argparse
import json
import sys

from mpi4py import MPI

from hpcllm.bench import (
    allreduce,
    checkpoint,
    collectives,
    compression,
    memory,
    multinode,
    pipeline,
    quality,
    scaling,
    steps,
    stop,
    tp,
    train,
    zero,
)
from hpcllm.runtime.spmd import spmd_main

SUBJECTS = {
    "allreduce": (allreduce, "bucketed gradient all-reduce vs raw MPI"),
    "train": (train, "training tokens/s: hpcllm vs torch DDP (gloo)"),
    "scaling": (scaling, "weak scaling np 1 -> np 2 (runs mpirun itself)"),
    "pipeline": (pipeline, "pipeline schedules vs analytic bubble, activation p2p"),
    "stop": (stop, "time to stop, die and resume a job (runs mpirun itself)"),
    "checkpoint": (checkpoint, "checkpoint save and load time and size, one rank"),
    "zero": (zero, "ZeRO-1 vs plain dp: tokens/s and AdamW state per rank"),
    "compression": (compression, "gradient compression modes in training runs (runs mpirun)"),
    "steps": (steps, "ms per small step: hpcllm np 1 and np 2 vs nanoGPT (runs both itself)"),
    "quality": (quality, "val bits/byte in a wall-clock budget: variants and nanoGPT (runs both)"),
    "collectives": (collectives, "all-gather and reduce-scatter: TensorComm vs raw mpi4py"),
    "tp": (tp, "tp 2 vs tp 1 step time, tp all-reduce share vs the planner's traffic"),
    "memory": (memory, "peak memory per rank of 6 layouts vs the planner (runs mpirun itself)"),
    "multinode": (multinode, "all-reduce and training over 2 emulated hosts, capped link (root)"),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hpcllm.bench", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help) in SUBJECTS.items():
        p = sub.add_parser(name, help=help, description=(module.__doc__ or "").split("\n\n")[0])
        p.add_argument("--json", metavar="PATH", help="also write the results as JSON (rank 0)")
        module.add_arguments(p)
    args = parser.parse_args(argv)
    if args.command in ("train", "scaling") and args.rounds < 2 + args.local:
        parser.error(f"--rounds must be at least {2 + args.local} (one of each implementation)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    module, _ = SUBJECTS[args.command]
    result = module.run(args, MPI.COMM_WORLD)
    if args.json and MPI.COMM_WORLD.Get_rank() == 0:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    spmd_main(main)
