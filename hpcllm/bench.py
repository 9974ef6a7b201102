"""`python -m hpcllm.bench`: what hpcllm's data parallelism costs, next to plain baselines.

    mpirun -np 2 python -m hpcllm.bench allreduce --mb 64 --bucket-mb 25 --iters 20
    mpirun -np 2 python -m hpcllm.bench train --steps 30 --warmup 5
    python -m hpcllm.bench scaling        # no mpirun: runs `train` under mpirun -np 1 and -np 2

allreduce  DataParallel's bucketed gradient all-reduce, driven by a real backward through
           the hooks exactly as in training, against one MPI Allreduce of the same bytes.
train      data-parallel training throughput of hpcllm (TensorComm + DataParallel + AdamW,
           hpcllm.train's train_step) against PyTorch DDP over gloo: same model, batch,
           ranks and threads, in alternating rounds (hpcllm, DDP, hpcllm, ...).
scaling    weak-scaling efficiency np 1 -> np 2 of both, from two `train` runs.

Timings are medians over iterations; each iteration's time is the slowest rank's.
Every subcommand prints a table on rank 0, and `--json PATH` writes its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
from mpi4py import MPI

from hpcllm.comm import TensorComm
from hpcllm.model import GPT, GPTConfig, param_groups
from hpcllm.parallel.data_parallel import DataParallel
from hpcllm.parallel.pipeline import PipelineStage, Schedule
from hpcllm.runtime import print0, spmd_main
from hpcllm.train import clip_grad_norm, train_step

# What `scaling` (and the tests) need to start Open MPI on a small shared machine.
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe", "OMP_NUM_THREADS": "1"}


# -- helpers --------------------------------------------------------------------------------

def slowest(world: MPI.Comm, seconds: list[float]) -> list[float]:
    """Per-iteration times as the slowest rank saw them (a collective step ends for all at once)."""
    times = np.array(seconds, dtype=np.float64)
    world.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)
    return times.tolist()


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[f"{v:,.3f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | None, result: dict) -> None:
    if path and MPI.COMM_WORLD.Get_rank() == 0:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {path}", flush=True)


def environment() -> dict:
    return {"hostname": socket.gethostname(), "cores": os.cpu_count(), "torch": torch.__version__,
            "mpi": MPI.Get_library_version().splitlines()[0].split(",")[0],
            "load_avg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


# -- allreduce --------------------------------------------------------------------------------

class ClockedComm(TensorComm):
    """A TensorComm that notes when the first all-reduce of a step is launched."""

    first_launch: float | None = None

    def iallreduce_(self, tensor, op=MPI.SUM):
        if self.first_launch is None:
            self.first_launch = time.perf_counter()
        return super().iallreduce_(tensor, op)


def gradient_model(mb: float) -> GPT:
    """A GPT (d_model 512, vocab 4096) with as many blocks as bring its parameters nearest `mb` MiB."""
    cfg = GPTConfig(vocab_size=4096, block_size=128, n_layer=1, n_head=8, d_model=512)
    d = cfg.d_model
    fixed = 4 * (2 * cfg.vocab_size * d + cfg.block_size * d + 2 * d)  # embeddings, head, final norm
    per_block = 4 * (12 * d * d + 13 * d)
    cfg.n_layer = max(1, round((mb * 2**20 - fixed) / per_block))
    return GPT(cfg)


def bench_allreduce(args, world: MPI.Comm) -> dict:
    rank, size = world.Get_rank(), world.Get_size()
    torch.set_num_threads(1)
    model = gradient_model(args.mb)
    comm = ClockedComm(world)
    dp = DataParallel(model, comm, args.bucket_mb)
    params = list(model.parameters())
    nbytes = 4 * sum(b.buffer.numel() for b in dp.buckets)
    raw = np.ones(nbytes // 4, dtype=np.float32)
    # Rank r's gradients are all r + 1, so the average is (size + 1) / 2 everywhere.
    coef = torch.tensor(float(rank + 1))

    def cheap_loss():
        # d loss / d p = coef for every element: backward costs about one pass over the
        # gradients, and the hooks fire parameter by parameter, last layers first.
        return torch.stack([(p * coef).sum() for p in params]).sum()

    times = {"raw": [], "bucketed": [], "comm": [], "backward": []}
    for it in range(args.warmup + args.iters):
        world.Barrier()
        start = time.perf_counter()
        world.Allreduce(MPI.IN_PLACE, raw)
        raw_s = time.perf_counter() - start

        # Backward alone (no reduction), to see how much of the bucketed time is compute.
        dp.zero_grad()
        dp.sync = False
        loss = cheap_loss()
        world.Barrier()
        start = time.perf_counter()
        loss.backward()
        backward_s = time.perf_counter() - start

        dp.zero_grad()
        dp.sync = True
        comm.first_launch = None
        loss = cheap_loss()
        world.Barrier()
        start = time.perf_counter()
        loss.backward()
        dp.finish()
        end = time.perf_counter()
        if it >= args.warmup:
            times["raw"].append(raw_s)
            times["backward"].append(backward_s)
            times["bucketed"].append(end - start)
            times["comm"].append(end - comm.first_launch)
    expected = (size + 1) / 2
    if not all(torch.all(b.buffer == expected) for b in dp.buckets):
        raise RuntimeError(f"rank {rank}: bucketed all-reduce gave wrong gradients (expected {expected})")

    medians = {k: statistics.median(slowest(world, v)) for k, v in times.items()}
    # Bus bandwidth (as nccl-tests): bytes each rank moves in a ring all-reduce per second,
    # algorithm bandwidth x 2 (n - 1) / n. It is comparable across rank counts.
    bus_factor = 2 * (size - 1) / size
    rows = []
    for key, label in [("raw", "raw MPI Allreduce (1 buffer)"),
                       ("comm", "bucketed: first launch -> finish"),
                       ("bucketed", "bucketed: backward + finish"),
                       ("backward", "backward alone (no comm)")]:
        t = medians[key]
        bw = [nbytes / t / 1e9, bus_factor * nbytes / t / 1e9] if key != "backward" else ["-", "-"]
        rows.append([label, 1e3 * t, *bw])
    result = {
        "benchmark": "allreduce", "ranks": size, "bytes": nbytes, "buckets": len(dp.buckets),
        "bucket_mb": args.bucket_mb, "params": len(params), "n_layer": model.cfg.n_layer,
        "iters": args.iters, "warmup": args.warmup, "median_ms": {k: 1e3 * v for k, v in medians.items()},
        "busbw_GBps": {k: bus_factor * nbytes / medians[k] / 1e9 for k in ("raw", "comm", "bucketed")},
        "ratio_comm_vs_raw": medians["raw"] / medians["comm"],
        "ratio_bucketed_vs_raw": medians["raw"] / medians["bucketed"],
        "env": environment(),
    }
    print0(f"all-reduce of {nbytes / 2**20:.1f} MiB fp32 gradients on {size} ranks: GPT with "
           f"{model.cfg.n_layer} blocks, {len(params)} tensors, {len(dp.buckets)} bucket(s) of <= "
           f"{args.bucket_mb} MiB; median of {args.iters} interleaved iterations after {args.warmup} warmup")
    print0(table(["path", "ms", "algbw GB/s", "busbw GB/s"], rows))
    print0(f"bucketed / raw bandwidth: {result['ratio_comm_vs_raw']:.3f} (communication window), "
           f"{result['ratio_bucketed_vs_raw']:.3f} (whole backward + finish); target >= 0.95")
    return result


# -- train ------------------------------------------------------------------------------------

def train_config(args) -> GPTConfig:
    return GPTConfig(vocab_size=args.vocab, block_size=args.seq_len, n_layer=args.n_layer,
                     n_head=args.n_head, d_model=args.d_model)


def hpcllm_stepper(cfg: GPTConfig, comm: TensorComm, bucket_mb: float, x_shape: tuple[int, int]):
    """One optimizer step as hpcllm.train does it (pp = 1): train_step, clip, AdamW."""
    model = GPT(cfg)
    dp = DataParallel(model, comm, bucket_mb)
    pp_comm = TensorComm(MPI.COMM_SELF)
    stage = PipelineStage(model, pp_comm, stage=0, num_stages=1, act_shape=(*x_shape, cfg.d_model),
                          device=torch.device("cpu"))
    schedule = Schedule(stage)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95), foreach=False)

    def step(x, y) -> float:
        loss = train_step(schedule, dp, [(x, y)], nullcontext())
        clip_grad_norm(model, 1.0, [pp_comm])
        optimizer.step()
        return loss.item()
    return step, dp


def ddp_stepper(cfg: GPTConfig, bucket_mb: float):
    """The same step with torch DDP (gloo), gradients as bucket views like hpcllm's."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = GPT(cfg)
    ddp = DDP(model, bucket_cap_mb=bucket_mb, gradient_as_bucket_view=True)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95), foreach=False)

    def step(x, y) -> float:
        optimizer.zero_grad(set_to_none=False)
        loss = ddp(x, y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()
    return step


def bench_train(args, world: MPI.Comm) -> dict:
    import torch.distributed as dist

    rank, size = world.Get_rank(), world.Get_size()
    torch.set_num_threads(args.threads)
    cfg = train_config(args)
    # Synthetic batches: uniform random tokens, different on each rank, the same for both
    # implementations; drawn up front so data generation is not timed.
    gen = torch.Generator().manual_seed(1000 + rank)
    batches = [torch.randint(cfg.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen)
               for _ in range(4)]
    batches = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in batches]

    port = world.bcast(_free_port() if rank == 0 else None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    comm = TensorComm(world)
    step_times = {"hpcllm": [], "ddp": []}
    waits, last_loss = [], {}
    for r in range(args.rounds):
        name = "hpcllm" if r % 2 == 0 else "ddp"
        if name == "hpcllm":
            step, dp = hpcllm_stepper(cfg, comm, args.bucket_mb, batches[0][0].shape)
        else:
            step, dp = ddp_stepper(cfg, args.bucket_mb), None
        world.Barrier()
        seconds, waited = [], 0.0
        for i in range(args.warmup + args.steps):
            x, y = batches[i % len(batches)]
            wait_before = dp.wait_seconds if dp else 0.0
            start = time.perf_counter()
            last_loss[name] = step(x, y)
            if i >= args.warmup:
                seconds.append(time.perf_counter() - start)
                waited += dp.wait_seconds - wait_before if dp else 0.0
        seconds = slowest(world, seconds)
        step_times[name] += seconds
        if dp:
            waits.append(world.allreduce(waited, op=MPI.SUM) / size / sum(seconds))
        print0(f"round {r + 1}/{args.rounds} {name}: median {1e3 * statistics.median(seconds):.1f} ms/step")
    dist.destroy_process_group()

    tokens = size * args.micro_batch * args.seq_len  # per optimizer step, all ranks
    n_params = sum(p.numel() for p in GPT(cfg).parameters())
    result = {"benchmark": "train", "ranks": size, "threads_per_rank": args.threads,
              "model": vars(cfg), "params": n_params, "micro_batch": args.micro_batch,
              "seq_len": args.seq_len, "tokens_per_step": tokens, "steps": args.steps,
              "warmup": args.warmup, "rounds": args.rounds, "data": "uniform random tokens",
              "env": environment()}
    rows = []
    for name in ("hpcllm", "ddp"):
        ms = 1e3 * statistics.median(step_times[name])
        result[name] = {"median_ms": ms, "tokens_per_s": tokens / ms * 1e3, "last_loss": last_loss[name]}
        rows.append([name if name == "hpcllm" else "torch DDP (gloo)", ms, tokens / ms * 1e3, last_loss[name]])
    result["hpcllm"]["comm_wait_frac"] = statistics.median(waits)
    result["ratio_vs_ddp"] = result["hpcllm"]["tokens_per_s"] / result["ddp"]["tokens_per_s"]
    print0(f"training throughput on {size} rank(s) x {args.threads} thread(s): GPT {n_params / 1e6:.2f}M "
           f"params ({cfg.n_layer} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}), "
           f"{args.micro_batch} x {args.seq_len} random tokens per rank per step; "
           f"median of {args.steps} steps per round after {args.warmup} warmup, {args.rounds} rounds")
    print0(table(["implementation", "ms/step", "tokens/s", f"loss @ step {args.warmup + args.steps}"], rows))
    print0(f"hpcllm / DDP throughput: {result['ratio_vs_ddp']:.3f} (target >= 1.0); hpcllm exposed "
           f"communication (DataParallel wait / step): {100 * result['hpcllm']['comm_wait_frac']:.1f}%")
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- scaling ----------------------------------------------------------------------------------

def bench_scaling(args, world: MPI.Comm) -> dict:
    if world.Get_size() > 1:
        raise ValueError("run `python -m hpcllm.bench scaling` without mpirun: it starts mpirun itself")
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    env = {**os.environ, **MPI_ENV}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            out = os.path.join(tmp, f"np{n}.json")
            cmd = [mpirun if os.path.exists(mpirun) else "mpirun", "-np", str(n), sys.executable, "-m",
                   "hpcllm.bench", "train", "--json", out, *train_argv(args)]
            print(f"$ {' '.join(cmd[:3])} python -m hpcllm.bench train {' '.join(train_argv(args))}", flush=True)
            subprocess.run(cmd, env=env, check=True)
            with open(out) as f:
                runs[n] = json.load(f)
    rows, result = [], {"benchmark": "scaling", "runs": runs, "env": environment()}
    for name, label in (("hpcllm", "hpcllm"), ("ddp", "torch DDP (gloo)")):
        t1, t2 = runs[1][name]["tokens_per_s"], runs[2][name]["tokens_per_s"]
        result[f"{name}_efficiency"] = t2 / (2 * t1)
        rows.append([label, t1, t2, 100 * t2 / (2 * t1)])
    print(f"\nweak scaling np 1 -> np 2 ({runs[1]['micro_batch']} x {runs[1]['seq_len']} tokens per rank, "
          f"1 thread per rank):")
    print(table(["implementation", "np 1 tokens/s", "np 2 tokens/s", "efficiency %"], rows))
    for n in (1, 2):
        result[f"ratio_vs_ddp_np{n}"] = runs[n]["ratio_vs_ddp"]
        print(f"np {n}: hpcllm / DDP {runs[n]['ratio_vs_ddp']:.3f}, hpcllm exposed communication "
              f"{100 * runs[n]['hpcllm']['comm_wait_frac']:.1f}%")
    print("targets: hpcllm >= 1.0 x DDP; weak-scaling efficiency >= 95%", flush=True)
    return result


def train_argv(args) -> list[str]:
    """The `train` options of `args`, as command-line arguments for the child runs."""
    keys = ("steps", "warmup", "rounds", "micro_batch", "seq_len", "n_layer", "n_head", "d_model",
            "vocab", "bucket_mb")
    return [a for k in keys for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


# -- entry ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hpcllm.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", metavar="PATH", help="also write the results as JSON (rank 0)")

    a = sub.add_parser("allreduce", parents=[common], help="bucketed gradient all-reduce vs raw MPI")
    a.add_argument("--mb", type=float, default=64.0, help="gradient MiB in total (default 64)")
    a.add_argument("--bucket-mb", type=float, default=25.0, help="DataParallel bucket size, MiB (default 25)")
    a.add_argument("--iters", type=int, default=20, help="timed iterations (default 20)")
    a.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default 3)")

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--steps", type=int, default=30, help="timed steps per round (default 30)")
    model.add_argument("--warmup", type=int, default=5, help="untimed steps per round (default 5)")
    model.add_argument("--rounds", type=int, default=3, help="alternating rounds hpcllm, DDP, hpcllm, ... (default 3)")
    model.add_argument("--micro-batch", type=int, default=8, help="sequences per rank per step (default 8)")
    model.add_argument("--seq-len", type=int, default=128)
    model.add_argument("--n-layer", type=int, default=4)
    model.add_argument("--n-head", type=int, default=4)
    model.add_argument("--d-model", type=int, default=256)
    model.add_argument("--vocab", type=int, default=4096)
    model.add_argument("--bucket-mb", type=float, default=25.0)
    t = sub.add_parser("train", parents=[common, model], help="training tokens/s: hpcllm vs torch DDP (gloo)")
    t.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    sub.add_parser("scaling", parents=[common, model], help="weak scaling np 1 -> np 2 (runs mpirun itself)")
    args = parser.parse_args(argv)
    if getattr(args, "rounds", 2) < 2:
        parser.error("--rounds must be at least 2 (one of each implementation)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    bench = {"allreduce": bench_allreduce, "train": bench_train, "scaling": bench_scaling}[args.command]
    write_json(args.json, bench(args, MPI.COMM_WORLD))
    return 0


if __name__ == "__main__":
    spmd_main(main)
