"""`python -m hpcllm.bench train`: training tokens/s of hpcllm (TensorComm + DataParallel +
AdamW, built by the training's own `build_rank`, stepped by the training loop's own step from
hpcllm.distributed.steps) against PyTorch DDP over gloo: same model, batch, ranks and threads,
in alternating rounds (hpcllm, DDP, hpcllm, ...).

    mpirun -np 2 python -m hpcllm.bench train --steps 30 --warmup 5
"""

from __future__ import annotations

import dataclasses
import socket
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
from mpi4py import MPI

from hpcllm.bench.common import ClockedComm, ForeignLoad, environment, slowest, table
from hpcllm.bench.layouts import add_model_arguments, model_config
from hpcllm.config import Config, OptimConfig, ParallelConfig, TrainConfig
from hpcllm.distributed.build import build_rank
from hpcllm.distributed.comm import TensorComm
from hpcllm.distributed.steps import clip_grad_norm, train_step
from hpcllm.distributed.topology import Grid
from hpcllm.models.gpt import GPT, ModelConfig, cross_entropy, param_groups
from hpcllm.runtime.spmd import print0

TRAIN_OPTIONS = (
    "steps",
    "warmup",
    "rounds",
    "micro_batch",
    "seq_len",
    "n_layer",
    "n_head",
    "d_model",
    "vocab",
    "bucket_mb",
)
LABELS = {"hpcllm": "hpcllm", "ddp": "torch DDP (gloo)", "local": "local: no gradient exchange"}


def add_arguments(parser) -> None:
    add_shared_arguments(parser)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")


def add_shared_arguments(parser, local: bool = True) -> None:
    """The options of `train` that `scaling` passes on to its `train` runs (and `zero` uses,
    without `--local`)."""
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per round (default 5)")
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds hpcllm, DDP, hpcllm, ... (default 5)"
    )
    parser.add_argument(
        "--micro-batch", type=int, default=8, help="sequences per rank per step (default 8)"
    )
    add_model_arguments(parser, seq_len=128, n_layer=4, n_head=4, d_model=256, vocab=4096)
    parser.add_argument(
        "--bucket-mb", type=float, default=25.0, help="bucket size of both, MiB (default 25)"
    )
    if local:
        parser.add_argument(
            "--local", action="store_true", help="also time the step with no gradient exchange"
        )


def hpcllm_stepper(
    cfg: ModelConfig, comm: TensorComm, bucket_mb: float, x_shape: tuple[int, int], zero: int = 0
):
    """One optimizer step as hpcllm.train takes it (pp = 1, dp over `comm`'s ranks), built by
    its own `build_rank`: train_step, clip, AdamW (sharded over the ranks under `zero` 1).
    Returns (step, DataParallel, optimizer)."""
    micro_batch, seq_len = x_shape
    config = Config(
        model=cfg,
        train=TrainConfig(seq_len=seq_len, micro_batch_size=micro_batch, seed=0),
        # Reduction overlapped with backward, as torch DDP does (no auto-tuning in the rounds).
        parallel=ParallelConfig(bucket_mb=bucket_mb, zero=zero, overlap="on"),
        optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1),
    )
    grid = Grid.build(comm.comm)
    comms = {"dp": comm, **{a: TensorComm(grid.comm(a), name=a) for a in ("pp", "tp")}}
    rank = build_rank(config, grid, torch.device("cpu"), comms)
    model, dp, optimizer = rank.model, rank.ddp, rank.optimizer

    def step(x, y) -> float:
        loss = train_step(rank.schedule, dp, [(x, y)], nullcontext())
        clip_grad_norm(model, 1.0, [comms["pp"]], ddp=dp)
        optimizer.step()
        return loss.item()

    return step, dp, optimizer


def torch_stepper(cfg: ModelConfig, bucket_mb: float, ddp: bool):
    """The same step in plain PyTorch: with DDP over gloo (its gradients bucket views like
    hpcllm's), or without any gradient exchange, the bound on scaling ('local')."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = GPT(cfg)
    run = DDP(model, bucket_cap_mb=bucket_mb, gradient_as_bucket_view=True) if ddp else model
    optimizer = torch.optim.AdamW(
        param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95), foreach=False
    )

    def step(x, y) -> float:
        optimizer.zero_grad(set_to_none=False)
        loss = cross_entropy(run(x), y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    return step


def model_and_batches(
    args, rank: int
) -> tuple[ModelConfig, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The benchmark's model config and its synthetic data: uniform random tokens, different
    on each rank, the same for every implementation, drawn before timing."""
    torch.set_num_threads(args.threads)
    cfg = model_config(args)
    gen = torch.Generator().manual_seed(1000 + rank)
    tokens = [
        torch.randint(cfg.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen)
        for _ in range(4)
    ]
    return cfg, [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in tokens]


def run(args, world: MPI.Comm) -> dict:
    import torch.distributed as dist

    rank, size = world.Get_rank(), world.Get_size()
    cfg, batches = model_and_batches(args, rank)
    port = None
    if rank == 0:
        with socket.socket() as s:  # a free port for gloo's rendezvous, chosen by rank 0
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = world.bcast(port)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size
    )

    comm = ClockedComm(world)
    impls = ["hpcllm", "ddp"] + (["local"] if args.local else [])
    step_times: dict[str, list[float]] = {k: [] for k in impls}
    shares: dict[str, list[float]] = {"wait": [], "mpi": []}
    last_loss: dict[str, float] = {}
    rounds: list[dict] = []
    for r in range(args.rounds):
        name = impls[r % len(impls)]
        # Each round starts from the same weights (GPT's init is seeded).
        step, dp = (
            hpcllm_stepper(cfg, comm, args.bucket_mb, (args.micro_batch, args.seq_len))[:2]
            if name == "hpcllm"
            else (torch_stepper(cfg, args.bucket_mb, ddp=name == "ddp"), None)
        )
        for i in range(args.warmup):
            step(*batches[i % len(batches)])
        load = ForeignLoad(world)  # (and synchronises the ranks)
        before = (dp.wait_seconds, comm.hook_seconds) if dp else (0.0, 0.0)
        seconds = []
        for i in range(args.warmup, args.warmup + args.steps):
            start = time.perf_counter()
            last_loss[name] = step(*batches[i % len(batches)])
            seconds.append(time.perf_counter() - start)
        foreign = load.share()
        if dp:
            # Time blocked in finish() (what hpcllm.train logs as comm wait), and all time in MPI:
            # with one core per rank, the hooks' launches and progress tests run on the compute
            # thread, so they are not hidden behind backward either.
            wait = dp.wait_seconds - before[0]
            mpi = wait + comm.hook_seconds - before[1]
            shares["wait"].append(world.allreduce(wait / sum(seconds)) / size)
            shares["mpi"].append(world.allreduce(mpi / sum(seconds)) / size)
        seconds = slowest(world, seconds)
        step_times[name] += seconds
        rounds.append(
            {"impl": name, "median_ms": 1e3 * statistics.median(seconds), "foreign_load": foreign}
        )
        print0(
            f"round {r + 1}/{args.rounds} {name}: median {1e3 * statistics.median(seconds):.1f} ms/step, "
            f"other processes used {100 * foreign:.0f}% of the CPUs"
        )
    dist.destroy_process_group()

    tokens = size * args.micro_batch * args.seq_len  # per optimizer step, all ranks
    n_params = sum(p.numel() for p in GPT(cfg).parameters())
    result = {
        "benchmark": "train",
        "ranks": size,
        "threads_per_rank": args.threads,
        "model": dataclasses.asdict(cfg),
        "params": n_params,
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len,
        "tokens_per_step": tokens,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": rounds,
        "data": "uniform random tokens",
        "env": environment(),
    }
    rows = []
    for name in impls:
        ms = 1e3 * statistics.median(step_times[name])
        result[name] = {
            "median_ms": ms,
            "tokens_per_s": 1e3 * tokens / ms,
            "last_loss": last_loss[name],
        }
        rows.append([LABELS[name], ms, 1e3 * tokens / ms, last_loss[name]])
    result["hpcllm"].update(
        comm_wait_frac=statistics.median(shares["wait"]), mpi_frac=statistics.median(shares["mpi"])
    )
    result["ratio_vs_ddp"] = result["hpcllm"]["tokens_per_s"] / result["ddp"]["tokens_per_s"]
    print0(
        f"training on {size} rank(s) x {args.threads} thread(s): GPT of {n_params / 1e6:.2f}M parameters "
        f"({cfg.n_layer} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}), {args.micro_batch} x "
        f"{args.seq_len} random tokens per rank per step; medians of {args.steps} steps per round "
        f"after {args.warmup} warmup, {args.rounds} rounds"
    )
    print0(
        table(
            ["implementation", "ms/step", "tokens/s", f"loss at step {args.warmup + args.steps}"],
            rows,
        )
    )
    print0(
        f"hpcllm / DDP tokens/s: {result['ratio_vs_ddp']:.3f} (target >= 1.0); hpcllm's step: "
        f"{100 * result['hpcllm']['comm_wait_frac']:.1f}% blocked in DataParallel.finish(), "
        f"{100 * result['hpcllm']['mpi_frac']:.1f}% in MPI in all"
    )
    return result
