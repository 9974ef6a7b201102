"""Shared test helpers: a tiny corpus, prepared shards, and `python -m hpcllm.train` runs.

Runs go through subprocesses with a timeout and their own process group, so a hung
job is killed whole (mpirun and every rank) and the test fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The smallest model and batch that still exercise every code path; seconds per run.
TINY = {
    # The tests' own fixed model and optimizer, whatever the job's defaults (llama, muon).
    "model.arch": "gpt2",
    "optim.name": "adamw",
    "optim.lr": 1e-3,
    "optim.min_lr": 1e-4,
    "model.n_layer": 2,
    "model.n_head": 2,
    "model.d_model": 32,
    "train.seq_len": 32,
    "train.micro_batch_size": 2,
    "train.log_every": 1,
    "train.eval_every": 0,  # validation still runs once, at the end
    "train.eval_batches": 2,
    "optim.warmup_steps": 5,
    "run.sample_tokens": 0,
    "checkpoint.every": 0,  # a checkpoint is still saved at the end
}


def write_corpus(root: Path, num_docs: int = 4, words_per_doc: int = 3000) -> Path:
    """A few deterministic text files of pseudo-English; returns the folder."""
    import random

    rng = random.Random(0)
    vocab = (
        "the quick brown fox jumps over a lazy dog def return class import self value "
        "data model train loss step rank grid shard token"
    ).split()
    root.mkdir(parents=True, exist_ok=True)
    for i in range(num_docs):
        words = " ".join(rng.choice(vocab) for _ in range(words_per_doc))
        (root / f"doc{i}.txt").write_text(f"# document {i}\n{words}\n", encoding="utf-8")
    return root


def prepare_data(out: Path, corpus: Path | None = None) -> Path:
    """Byte-tokenized shards (vocab 257) of the tiny corpus in `out`; returns `out`."""
    from hpcllm.data.prepare import prepare

    corpus = corpus or write_corpus(out.parent / (out.name + "-corpus"))
    prepare([str(corpus)], str(out), tokenizer="byte", val_fraction=0.1)
    return out


def subprocess_env(extra: dict | None = None) -> dict:
    """os.environ (conftest set the MPI-as-root variables) with the repo importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    # Ranks idle in collectives yield the core: tests run more ranks than the machine has cores.
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    for key in ("HPCLLM_FAIL_AT_STEP", "HPCLLM_FAIL_RANK", "HPCLLM_CUDA_AWARE"):
        env.pop(key, None)
    env.update(extra or {})
    return env


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    wall: float  # seconds from launch to exit

    def __str__(self) -> str:
        return (
            f"exit {self.returncode} after {self.wall:.1f}s\n--- stdout (tail) ---\n{self.stdout[-3000:]}"
            f"\n--- stderr (tail) ---\n{self.stderr[-3000:]}"
        )


def run(cmd: list[str], *, timeout: float, env: dict | None = None) -> Result:
    """Run `cmd` in its own process group; on timeout kill the whole group and fail the test."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=subprocess_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, stderr = proc.communicate()
        pytest.fail(
            f"{' '.join(cmd)}\ndid not finish within {timeout}s (hung?); killed.\n"
            f"--- stdout ---\n{stdout[-3000:]}\n--- stderr ---\n{stderr[-3000:]}"
        )
    return Result(proc.returncode, stdout, stderr, time.perf_counter() - start)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def overrides(settings: dict) -> list[str]:
    """{'train.max_steps': 5} -> ['--train.max_steps', '5']."""
    args = []
    for key, value in settings.items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def train(
    np: int | None,
    settings: dict,
    *,
    timeout: float = 120,
    env: dict | None = None,
    extra_args: list[str] = (),
    faults: dict | None = None,
) -> Result:
    """`mpirun -np N python -m hpcllm.train` (or plain `python -m hpcllm.train` for np=None)
    with TINY overridden by `settings`. With `faults` ({"FAIL_AT_STEP": 3, "FAIL_RANK": 1})
    the job runs through tests/faults.py, which injects them."""
    launcher = [] if np is None else ["mpirun", "-np", str(np)]
    entry = [str(REPO / "tests" / "faults.py")] if faults else ["-m", "hpcllm.train"]
    cmd = [
        *launcher,
        sys.executable,
        *entry,
        *overrides({**TINY, **settings}),
        *extra_args,
    ]
    env = {**(env or {}), **{f"HPCLLM_{key}": str(v) for key, v in (faults or {}).items()}}
    return run(cmd, timeout=timeout, env=env)


def refusal(settings: dict, *, extra_args: list[str] = (), base: dict = TINY) -> str:
    """The error that `python -m hpcllm.train` (`base` overridden by `settings`) stops with
    before training, found in this process by the entry point's own `main` on MPI.COMM_WORLD
    (this one rank, or every rank of an mpi test): parse, layout, data, build and resume
    checks. Asserts that nothing was trained or left in a run folder it created. What the
    process then does with the error (exit 2, one "error: " line, no traceback) is the CLI
    contract, tested by test_train.py's two subprocess smoke tests."""
    from hpcllm import train as entry
    from hpcllm.runtime.spmd import StartupError

    settings = {**base, **settings}
    run_dir = Path(settings.get("run.dir", "runs/default"))
    existed = run_dir.exists()
    metrics = run_dir / "metrics.jsonl"
    before = metrics.read_text() if metrics.exists() else None
    with pytest.raises(StartupError) as refused:
        entry.main([*overrides(settings), *extra_args])
    from mpi4py import MPI

    MPI.COMM_WORLD.Barrier()  # rank 0 has removed the folder it created
    assert existed or not run_dir.exists(), f"the refused run left {run_dir} behind"
    assert (metrics.read_text() if metrics.exists() else None) == before, "a refused run trained"
    return str(refused.value)


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a run's metrics.jsonl."""
    records = [
        json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss by step."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)[0]}


def merged_params(checkpoint_dir: Path) -> dict:
    """Every parameter of a checkpoint under its global name, merged from all its shards."""
    from hpcllm import checkpoint

    return checkpoint.read_model(checkpoint_dir, checkpoint.read_meta(checkpoint_dir))


def assert_close_dicts(got: dict, ref: dict, **tol) -> None:
    """Same keys, and each value within `tol` (torch.testing.assert_close's rtol, atol)."""
    import torch

    assert set(got) == set(ref), set(got) ^ set(ref)
    for key in sorted(ref):
        torch.testing.assert_close(
            torch.as_tensor(got[key]),
            torch.as_tensor(ref[key]),
            **tol,
            msg=lambda m, k=key: f"{k}: {m}",
        )


def resume_elsewhere(
    source: Path,
    step: int,
    target: Path,
    np: int | None,
    settings: dict,
    *,
    loss_tol: dict,
    param_tol: dict | None = None,
    timeout: float = 240,
) -> Result:
    """The step-`step` checkpoint of the uninterrupted run in `source`, alone in the fresh run
    folder `target`, resumed by `np` ranks under `settings` (another layout, or another
    setting of a feature): it says so, its later steps repeat `source`'s losses within
    `loss_tol` and, with `param_tol`, its final weights `source`'s. Returns the run."""
    folder = f"checkpoints/step_{step:06d}"
    shutil.copytree(Path(source) / folder, Path(target) / folder)
    result = train(np, {**settings, "run.dir": target}, timeout=timeout)
    assert result.returncode == 0, result
    assert f"resumed from {Path(target) / folder} at step {step} " in result.stdout, result
    got, uninterrupted = losses(target), losses(source)
    assert sorted(got) == [s for s in sorted(uninterrupted) if s > step], sorted(got)
    assert_close_dicts(got, {s: uninterrupted[s] for s in got}, **loss_tol)
    if param_tol is not None:
        last = f"checkpoints/step_{max(uninterrupted):06d}"
        assert_close_dicts(
            merged_params(Path(target) / last), merged_params(Path(source) / last), **param_tol
        )
    return result


# ------------------------------------------------------------------ float32 tolerances
# float32 keeps a 24-bit significand: FP32_EPS = 2**-23 (~1.2e-7) is one unit in the last place
# (ulp) at 1.0. The same maths computed in another order - a tp slice of a matrix product, a sum
# split over dp ranks or pipeline stages, another CPU kernel (AVX-512, AVX2, scalar: torch picks
# by CPU, ATEN_CPU_CAPABILITY overrides) - rounds differently at every operation: a dot product
# of K terms by up to ~K/2 ulps of its magnitude (K <= 128 in these tests' models), and each
# optimizer step carries that into the weights, where it adds up. So results that are not the
# same operation sequence are compared within ULPS_PER_STEP ulps per step taken, of the larger
# of the tensor's magnitude and 1 (a tensor near 0 moves by lr-sized steps, not by its own
# magnitude). A fault - a wrong slice, a missing reduction, a skipped step - moves weights by
# ~lr (>= 1e-3), hundreds of times more. Results that ARE the same sequence compare bitwise.
FP32_EPS = 2.0**-23
ULPS_PER_STEP = 64


def reordered_tol(steps: int = 1, scale: float = 1.0, ulps_per_step: float = ULPS_PER_STEP):
    """assert_close's tolerance for float32 values of magnitude `scale` (floored at 1) that
    two orders of the same computation reach after `steps` optimizer steps."""
    return {"rtol": 0.0, "atol": ulps_per_step * max(steps, 1) * FP32_EPS * max(scale, 1.0)}


def assert_reordered_close(got, want, *, steps: int = 1, msg=None, **kwargs) -> None:
    """`got` equals `want` up to float32 rounding in another order (see FP32_EPS), per tensor."""
    import torch

    got, want = torch.as_tensor(got), torch.as_tensor(want)
    scale = want.detach().abs().max().item() if want.numel() else 0.0
    tol = reordered_tol(steps, scale, **kwargs)
    if os.environ.get("HPCLLM_TOL_REPORT"):  # how close to the bound each comparison came
        worst = (got.detach().double() - want.detach().double()).abs().max().item()
        with open(os.environ["HPCLLM_TOL_REPORT"], "a") as report:
            report.write(
                f"{os.environ.get('PYTEST_CURRENT_TEST', '?')}\t{worst / tol['atol']:.4f}\n"
            )
    torch.testing.assert_close(got, want, **tol, msg=msg)
