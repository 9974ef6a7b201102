"""`python -m hpcllm.bench multinode`: gradient all-reduce and training across 2 emulated
hosts (tests/emulated_hosts.py: network namespaces, needs root) x 2 ranks (--ranks-per-host),
the link between them capped by `tc tbf`. Run it without mpirun: it starts its own jobs.

    python -m hpcllm.bench multinode --rates 1gbit 100mbit --mb 4 25
    python -m hpcllm.bench multinode --rates 100mbit --steps 60 \\
        --variant flat=--parallel.allreduce=flat --variant hier=--parallel.allreduce=hierarchical

Without --variant, for each rate and buffer size: one MPI Allreduce (Open MPI's tuned
component, HAN excluded), DataParallel's flat path (Iallreduce), hpcllm's hierarchical
all-reduce, and in a second mpirun Open MPI's own hierarchical component (`--mca coll han`,
its priority raised; the run checks in Open MPI's own selection log that HAN was chosen), plus
the choice `parallel.allreduce auto` makes. With --variant NAME=OVERRIDES (repeatable; the
first is the baseline), a short training job per variant, plain `python -m hpcllm.train`
overrides, reporting the bytes that crossed the link per step (counted on host 1's veth,
start-up and validation included), `grad_wire_bytes` where metrics.jsonl logs it, the median
step time, the final val loss, and the training time (sum of step times) at which the variant
first reached the baseline's final val loss.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from mpi4py import MPI

from hpcllm.bench.common import (
    BENCH_MODEL,
    MPI_ENV,
    ForeignLoad,
    environment,
    slowest,
    table,
    timed,
)
from hpcllm.distributed.comm import TensorComm
from hpcllm.distributed.hierarchical import select_allreduce
from hpcllm.distributed.topology import Grid
from hpcllm.runtime.spmd import print0

REPO = Path(__file__).resolve().parents[2]
NUM_HOSTS = 2
RESULT = "multinode-result: "  # prefix of the ranks' JSON line that the driver reads
# Open MPI's selection log (coll_base_verbose) names the component chosen per communicator.
SELECTED = re.compile(r"coll:base:comm_select: selecting\s+(\w+)")


def add_arguments(parser) -> None:
    parser.add_argument(
        "--rates",
        nargs="+",
        default=["1gbit", "100mbit"],
        help="link caps, tc units, or 'none' (default 1gbit 100mbit)",
    )
    parser.add_argument(
        "--mb",
        type=float,
        nargs="+",
        default=[4.0, 25.0],
        help="all-reduce sizes in MiB (default 4: the default model's gradients; 25: a bucket)",
    )
    parser.add_argument("--iters", type=int, default=5, help="timed iterations (default 5)")
    parser.add_argument(
        "--ranks-per-host", type=int, default=2, help="ranks on each of the 2 hosts (default 2)"
    )
    parser.add_argument(
        "--placement",
        choices=["block", "round-robin"],
        default="block",
        help="ranks 0..k-1 on host 0 (block, default) or alternating between the hosts",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="train instead: one job per variant, e.g. bf16=--parallel.grad_compression=bf16",
    )
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    parser.add_argument(
        "--eval-every", type=int, default=10, help="validation every N steps (default 10)"
    )
    parser.add_argument(
        "--train-args", default="", help="overrides for every variant, e.g. '--data.path X'"
    )
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per mpirun job")
    # What the mpirun children run: the ranks' side of the collectives measurement.
    parser.add_argument(
        "--role", choices=["driver", "ranks", "han"], default="driver", help=argparse.SUPPRESS
    )


def run(args, world: MPI.Comm) -> dict:
    if args.role != "driver":
        return measure(args, world)
    if world.Get_size() > 1:
        raise ValueError("run `python -m hpcllm.bench multinode` without mpirun: it starts its own")
    # The harness lives with the tests that use it; the benchmark borrows it from the checkout.
    sys.path.insert(0, str(REPO / "tests"))
    try:
        harness = importlib.import_module("emulated_hosts")
    except ImportError as e:
        raise RuntimeError(f"multinode needs the repository's tests/emulated_hosts.py: {e}") from e
    reason = harness.unavailable()
    if reason:
        raise RuntimeError(f"multinode: {reason}")
    results = []
    for rate in args.rates:
        with harness.EmulatedHosts(NUM_HOSTS, rate=None if rate == "none" else rate) as hosts:
            if args.variant:
                results.append(train_variants(args, hosts, rate))
            else:
                results.append(collectives(args, hosts, rate))
    return {"benchmark": "multinode", "results": results, "env": environment()}


# ----------------------------------------------------------------- collectives, on the ranks


def measure(args, world: MPI.Comm) -> dict:
    """Rank side: time each path on each size; rank 0 prints one JSON line for the driver."""
    torch.set_num_threads(1)
    grid = Grid.build(world)  # all ranks data-parallel
    dp = TensorComm(grid.comm("dp"), name="dp")
    size = world.Get_size()
    if args.role == "han":
        reducer, how = None, "not used"
    else:
        reducer, how = select_allreduce("hierarchical", grid, dp, 0)
        if reducer is None:
            raise RuntimeError(f"the emulated hosts are not seen as nodes: {how}")
    load = ForeignLoad(world)
    sizes = []
    for mb in args.mb:
        numel = max(1, round(mb * 2**18 / size)) * size
        buf = torch.ones(numel)
        paths = _paths(world, dp, reducer, buf)
        times: dict[str, list[float]] = {k: [] for k in paths}
        for it in range(args.iters + 1):
            for name, fn in paths.items():
                buf.fill_(1.0)
                t = timed(world, fn)
                if not torch.all(buf == size):
                    raise RuntimeError(f"rank {world.Get_rank()}: {name} summed wrongly")
                if it:  # the first round is warm-up
                    times[name].append(t)
        ms = {k: 1e3 * statistics.median(slowest(world, v)) for k, v in times.items()}
        entry: dict = {"mb": numel * 4 / 2**20, "bytes": numel * 4, "ms": ms}
        if reducer is not None:
            chosen, auto_how = select_allreduce("auto", grid, dp, numel)
            entry["auto"] = "flat" if chosen is None else "hierarchical"
            entry["auto_why"] = auto_how
        sizes.append(entry)
    result = {"ranks": size, "hierarchical": how, "sizes": sizes, "foreign_load": load.share()}
    print0(RESULT + json.dumps(result))
    return result


def _paths(world: MPI.Comm, dp: TensorComm, reducer, buf: torch.Tensor) -> dict:
    """What is timed: HAN's run has only MPI's Allreduce, which HAN then serves."""
    if reducer is None:
        return {"han": lambda: world.Allreduce(MPI.IN_PLACE, buf.numpy())}
    return {
        "allreduce": lambda: world.Allreduce(MPI.IN_PLACE, buf.numpy()),
        "iallreduce": lambda: dp.iallreduce_(buf).wait(),
        "hierarchical": lambda: reducer.start(buf).wait(),
    }


def busbw(nbytes: int, ms: float, n: int) -> float:
    """GB/s as nccl-tests count it: what each rank sends in a bandwidth-optimal all-reduce."""
    return 2 * (n - 1) / n * nbytes / ms / 1e6


def _mpirun(hosts, args, extra: list[str], argv: list[str]) -> str:
    cmd = [*hosts.mpirun_args(NUM_HOSTS * args.ranks_per_host), *extra, sys.executable, *argv]
    if args.placement == "round-robin":  # rank r on host r % 2: neighbours on different hosts
        cmd[cmd.index("--map-by") + 1] = "node"
    out = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout, env=_env()
    )
    if out.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        )
    return out.stdout + out.stderr


def _env() -> dict:
    return {**os.environ, **MPI_ENV, "PYTHONPATH": str(REPO)}


def collectives(args, hosts, rate: str) -> dict:
    """Both mpirun jobs on one set of hosts (same link), then the table."""
    common = ["-m", "hpcllm.bench", "multinode", "--mb", *map(str, args.mb)]
    common += ["--iters", str(args.iters)]
    verbose = ["--mca", "coll_base_verbose", "10"]
    flat_out = _mpirun(
        hosts, args, ["--mca", "coll", "^han", *verbose], [*common, "--role", "ranks"]
    )
    han_out = _mpirun(
        hosts, args, ["--mca", "coll_han_priority", "100", *verbose], [*common, "--role", "han"]
    )
    ours, han = (_result(out) for out in (flat_out, han_out))
    han_selected = SELECTED.findall(han_out).count("han")
    example = next(
        (line for line in han_out.splitlines() if "selecting" in line and "han" in line), ""
    )
    flat_han = SELECTED.findall(flat_out).count("han")
    n = ours["ranks"]
    rows, per_size = [], []
    for mine, theirs in zip(ours["sizes"], han["sizes"], strict=True):
        ms = {**mine["ms"], "han": theirs["ms"]["han"]}
        faster = "hierarchical" if ms["hierarchical"] < ms["iallreduce"] else "flat"
        for path, label in (
            ("allreduce", "flat MPI Allreduce (tuned)"),
            ("iallreduce", "flat Iallreduce (DataParallel, parallel.allreduce flat)"),
            ("hierarchical", "hpcllm hierarchical"),
            ("han", "Open MPI HAN Allreduce"),
        ):
            rows.append([f"{mine['mb']:.1f}", label, ms[path], busbw(mine["bytes"], ms[path], n)])
        rows.append([f"{mine['mb']:.1f}", f"auto chose: {mine['auto']}", "-", "-"])
        per_size.append(
            {**mine, "ms": ms, "faster": faster, "auto_is_faster": mine["auto"] == faster}
        )
    print(
        f"\nlink {rate}: {NUM_HOSTS} emulated hosts x {args.ranks_per_host} ranks ({args.placement}); {ours['hierarchical']}; "
        f"medians of {args.iters} iterations (slowest rank); HAN selected on {han_selected} "
        f"communicator(s) in its run, on {flat_han} in the other; other processes used "
        f"{100 * ours['foreign_load']:.0f}% of the CPUs",
        flush=True,
    )
    print(table(["MiB", "path", "ms", "busbw GB/s"], rows), flush=True)
    for entry in per_size:
        print(
            f"{entry['mb']:.1f} MiB: auto chose {entry['auto']}, the bench's faster of flat "
            f"Iallreduce and hierarchical: {entry['faster']} ({entry['auto_why']})",
            flush=True,
        )
    print(f"Open MPI's log in the HAN run: {example.strip() or 'HAN never selected'}", flush=True)
    if not han_selected:
        print("warning: Open MPI did not select HAN: the HAN row is its default path", flush=True)
    return {
        "rate": rate,
        "ranks_per_host": args.ranks_per_host,
        "placement": args.placement,
        "sizes": per_size,
        "han_selected_comms": han_selected,
        "han_log_example": example.strip(),
        "han_in_flat_run": flat_han,
        "foreign_load": ours["foreign_load"],
    }


def _result(output: str) -> dict:
    for line in output.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    raise RuntimeError(f"no result line in:\n{output[-3000:]}")


# ----------------------------------------------------------------- training variants


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, eq, overrides = text.partition("=")
    if not eq or not name or name.startswith("-"):
        raise ValueError(f"--variant {text!r}: expected NAME=OVERRIDES, e.g. bf16=--x.y=z")
    return name, shlex.split(overrides)


def link_bytes(veth: str) -> int:
    """Bytes through a host's veth in both directions: all traffic between it and the others."""
    stats = Path("/sys/class/net") / veth / "statistics"
    return sum(int((stats / f).read_text()) for f in ("tx_bytes", "rx_bytes"))


def summarise(metrics: Path) -> dict:
    """Median step time, wire bytes if logged, and the val losses with the training time (sum
    of step times so far) at which each was measured."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps, train_s, prev = [], 0.0, 0
    vals, wire = [], []
    for r in records:
        if "ms_per_step" in r:
            train_s += r["ms_per_step"] / 1e3 * (r["step"] - prev)
            prev = r["step"]
            steps.append(r["ms_per_step"])
            wire += [r[k] for k in r if k.endswith("wire_bytes")]
        if "val_loss" in r:
            vals.append((r["step"], r["val_loss"], train_s))
    if not vals:
        raise RuntimeError(f"{metrics}: no val_loss record")
    return {
        "median_ms_per_step": statistics.median(steps[1:] or steps),  # the first step warms up
        "logged_wire_bytes_per_step": statistics.median(wire) if wire else None,
        "vals": vals,
        "final_val_loss": vals[-1][1],
        "steps": prev,
        "train_s": train_s,
    }


def time_to_loss(vals: list[tuple[int, float, float]], target: float) -> float | None:
    """Training seconds at the first validation (step, loss, seconds) at or below `target`."""
    return next((seconds for _, loss, seconds in vals if loss <= target), None)


def train_variants(args, hosts, rate: str) -> dict:
    variants = [parse_variant(v) for v in args.variant]
    veth = hosts.hosts[1].veth
    results = []
    with tempfile.TemporaryDirectory(prefix="hpcllm-multinode-") as tmp:
        for name, overrides in variants:
            run_dir = Path(tmp) / name
            argv = [
                "-m",
                "hpcllm.train",
                *BENCH_MODEL,
                f"--run.dir={run_dir}",
                f"--train.max_steps={args.steps}",
                f"--train.eval_every={args.eval_every}",
                "--train.log_every=1",
                "--run.sample_tokens=0",
                *shlex.split(args.train_args),
                *overrides,
            ]
            before, start = link_bytes(veth), time.perf_counter()
            out = _mpirun(hosts, args, [], argv)
            wall, moved = time.perf_counter() - start, link_bytes(veth) - before
            status = run_dir / "status.json"
            if not status.is_file() or json.loads(status.read_text())["state"] != "complete":
                raise RuntimeError(f"variant {name} did not complete:\n{out[-3000:]}")
            summary = summarise(run_dir / "metrics.jsonl")
            chosen = re.search(r"gradient all-reduce over dp: (.*)", out)
            results.append(
                {
                    "variant": name,
                    "overrides": overrides,
                    "link_bytes_per_step": moved / summary["steps"],
                    "job_wall_s": wall,
                    "allreduce": chosen.group(1) if chosen else None,
                    **summary,
                }
            )
    target = results[0]["final_val_loss"]
    rows = []
    for r in results:
        reached = time_to_loss(r["vals"], target)
        r["train_s_to_baseline_loss"] = reached
        rows.append(
            [
                r["variant"],
                r["link_bytes_per_step"] / 2**20,
                "-"
                if r["logged_wire_bytes_per_step"] is None
                else r["logged_wire_bytes_per_step"] / 2**20,
                r["median_ms_per_step"],
                r["final_val_loss"],
                "not reached" if reached is None else reached,
                r["job_wall_s"],
            ]
        )
    print(
        f"\nlink {rate}: {NUM_HOSTS} emulated hosts x {args.ranks_per_host} ranks, {args.steps} steps, "
        f"validation every {args.eval_every}; baseline {results[0]['variant']} "
        f"(final val loss {target:.4f})",
        flush=True,
    )
    print(
        table(
            [
                "variant",
                "link MiB/step",
                "logged wire MiB/step",
                "median ms/step",
                "val loss",
                "train s to baseline loss",
                "job wall s",
            ],
            rows,
        ),
        flush=True,
    )
    for r in results:
        print(f"{r['variant']}: {shlex.join(r['overrides'])} -> {r['allreduce']}", flush=True)
    return {"rate": rate, "steps": args.steps, "variants": results}
