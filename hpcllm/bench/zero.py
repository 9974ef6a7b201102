"""`python -m hpcllm.bench zero`: ZeRO-1 against plain data parallelism: tokens/s and AdamW
state per rank, the same model, batch, ranks and threads, in alternating rounds (zero 0,
zero 1, zero 0, ...), each the training loop's own step (`bench.train.hpcllm_stepper`).

    mpirun -np 2 python -m hpcllm.bench zero --steps 30 --warmup 5
"""

from __future__ import annotations

import dataclasses
import statistics
import time

from mpi4py import MPI

from hpcllm.bench.common import ForeignLoad, environment, slowest, table
from hpcllm.bench.train import add_shared_arguments, hpcllm_stepper, model_and_batches
from hpcllm.distributed.comm import TensorComm
from hpcllm.models.gpt import GPT
from hpcllm.optim.zero import optimizer_state_bytes
from hpcllm.runtime.spmd import print0


def add_arguments(parser) -> None:
    add_shared_arguments(parser, local=False)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")


def run(args, world: MPI.Comm) -> dict:
    rank, size = world.Get_rank(), world.Get_size()
    cfg, batches = model_and_batches(args, rank)
    comm = TensorComm(world, name="dp")
    step_times: dict[int, list[float]] = {0: [], 1: []}
    state_bytes: dict[int, int] = {}
    last_loss: dict[int, float] = {}
    rounds = []
    for r in range(max(2, args.rounds)):
        zero = r % 2
        step, _, optimizer = hpcllm_stepper(
            cfg, comm, args.bucket_mb, (args.micro_batch, args.seq_len), zero=zero
        )
        for i in range(args.warmup):
            step(*batches[i % len(batches)])
        # The largest rank's state: the memory a job must provision per rank.
        state_bytes[zero] = world.allreduce(optimizer_state_bytes(optimizer), op=MPI.MAX)
        load = ForeignLoad(world)
        seconds = []
        for i in range(args.warmup, args.warmup + args.steps):
            start = time.perf_counter()
            last_loss[zero] = step(*batches[i % len(batches)])
            seconds.append(time.perf_counter() - start)
        foreign = load.share()
        seconds = slowest(world, seconds)
        step_times[zero] += seconds
        median = 1e3 * statistics.median(seconds)
        rounds.append({"zero": zero, "median_ms": median, "foreign_load": foreign})
        print0(
            f"round {r + 1}/{max(2, args.rounds)} zero {zero}: median {median:.1f} ms/step, "
            f"other processes used {100 * foreign:.0f}% of the CPUs"
        )

    tokens_per_step = size * args.micro_batch * args.seq_len
    n_params = sum(p.numel() for p in GPT(cfg).parameters())
    result: dict = {
        "benchmark": "zero",
        "ranks": size,
        "threads_per_rank": args.threads,
        "model": dataclasses.asdict(cfg),
        "params": n_params,
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len,
        "bucket_mb": args.bucket_mb,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": rounds,
        "env": environment(),
    }
    rows = []
    for zero in (0, 1):
        ms = 1e3 * statistics.median(step_times[zero])
        result[f"zero{zero}"] = {
            "median_ms": ms,
            "tokens_per_s": 1e3 * tokens_per_step / ms,
            "optimizer_state_bytes_per_rank": state_bytes[zero],
            "last_loss": last_loss[zero],
        }
        rows.append(
            [
                f"zero {zero}",
                ms,
                1e3 * tokens_per_step / ms,
                state_bytes[zero] / 2**20,
                last_loss[zero],
            ]
        )
    z0, z1 = result["zero0"], result["zero1"]
    result["tokens_per_s_ratio"] = z1["tokens_per_s"] / z0["tokens_per_s"]
    result["state_ratio"] = (
        z1["optimizer_state_bytes_per_rank"] / z0["optimizer_state_bytes_per_rank"]
    )
    print0(
        f"ZeRO-1 vs plain dp on {size} rank(s) x {args.threads} thread(s): GPT of "
        f"{n_params / 1e6:.2f}M parameters, {args.micro_batch} x {args.seq_len} random tokens per "
        f"rank per step, buckets of {args.bucket_mb} MiB; medians of {args.steps} steps per round "
        f"after {args.warmup} warmup"
    )
    print0(
        table(
            [
                "parallel.zero",
                "ms/step",
                "tokens/s",
                "AdamW state MiB/rank",
                f"loss at step {args.warmup + args.steps}",
            ],
            rows,
        )
    )
    print0(
        f"zero 1 / zero 0 tokens/s: {result['tokens_per_s_ratio']:.3f} (target >= 0.95); "
        f"AdamW state per rank: {result['state_ratio']:.3f} of zero 0's (1/dp = {1 / size:.3f})"
    )
    return result
