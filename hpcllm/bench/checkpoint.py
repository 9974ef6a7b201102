"""`python -m hpcllm.bench checkpoint`: save (hpcllm.checkpoint.save: fsync'ed files, atomic
rename) and load time and size on disk of a model with its AdamW state, on one rank.

    python -m hpcllm.bench checkpoint --n-layer 12 --d-model 768 --vocab 8192

Medians over --repeats.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch
from mpi4py import MPI

from hpcllm import checkpoint
from hpcllm.bench.common import record
from hpcllm.distributed.topology import Grid
from hpcllm.models.gpt import GPT, ModelConfig, param_groups
from hpcllm.training.state import stateful_parts


def add_arguments(parser) -> None:
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dir", default=None, help="where to write (default: the system's temp folder)"
    )


def run(args, world: MPI.Comm) -> dict:
    if world.Get_size() > 1:
        raise ValueError("the checkpoint benchmark runs on one rank: start it without mpirun")
    started = time.strftime("%Y-%m-%d %H:%M")
    return record(measure(args, world), started)


def bench_meta(step: int, cfg: ModelConfig, args) -> dict:
    """The run records meta.json must hold (a loader at one sequence per step, byte tokenizer)."""
    from dataclasses import asdict

    from hpcllm.config import Config

    config = Config().to_dict()
    config["model"].update({k: v for k, v in asdict(cfg).items() if k in config["model"]})
    return {
        "loader": {"consumed_samples": step, "seed": 0},
        "samples": {"global_batch_size": 1, "since_step": 0, "since_sample": 0},
        "config": config,
        "tokenizer": {"name": "byte", "vocab_size": args.vocab, "sha256": None},
    }


def measure(args, world: MPI.Comm) -> dict:
    cfg = ModelConfig(
        vocab_size=args.vocab,
        block_size=args.block,
        n_layer=args.n_layer,
        n_head=args.d_model // 64,
        d_model=args.d_model,
    )
    grid = Grid.build(world)

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
                parts=stateful_parts(grid, model, optimizer),
                extra=bench_meta(rep + 1, cfg, args),
                keep=1,
            )
            saves.append(time.perf_counter() - start)
            size = sum(f.stat().st_size for f in path.iterdir())
            fresh_model, fresh_optimizer = model_and_optimizer()
            os.system("sync")
            start = time.perf_counter()
            checkpoint.load_newest(
                tmp, grid=grid, parts=stateful_parts(grid, fresh_model, fresh_optimizer)
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
