"""Operations under plain mpirun: signals, time budget, dead and hung ranks, interrupted saves,
resuming on another number of ranks, and resuming with the wrong model.

Each test starts `mpirun -np N python -m hpcllm.train` as a subprocess in its own process group
(killed whole on timeout), acts on it from outside while it runs (a signal to one rank, kill -9,
a half-written checkpoint folder) and then checks what a user would: the exit code, the time to
exit, status.json, the checkpoints, and that the rerun's losses equal an uninterrupted run's.

Interrupted runs train with a constant learning rate (no warmup, min_lr = lr), so a run's
losses do not depend on train.max_steps: a run can be stopped at whatever step the signal
lands and then finished with a smaller max_steps, and still be compared step by step with one
uninterrupted reference run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (
    REPO,
    TINY,
    losses,
    overrides,
    prepare_data,
    read_metrics,
    refusal,
    subprocess_env,
    train,
)

REF_STEPS = 40  # the uninterrupted reference run; interrupted runs are finished up to here
CONSTANT_LR = {"optim.warmup_steps": 0, "optim.lr": 1e-3, "optim.min_lr": 1e-3}
ENDLESS = 100_000  # max_steps of a run that is stopped from outside


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("ops-data") / "shards")


def ops_settings(data_dir, run_dir, **more) -> dict:
    return {"data.path": data_dir, "run.dir": run_dir, **CONSTANT_LR, **more}


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """Uninterrupted 2-rank run of REF_STEPS steps at the constant learning rate: {step: loss}."""
    run_dir = tmp_path_factory.mktemp("ops-ref") / "run"
    result = train(
        2, ops_settings(data_dir, run_dir, **{"train.max_steps": REF_STEPS}), timeout=120
    )
    assert result.returncode == 0, result
    ref = losses(run_dir)
    assert sorted(ref) == list(range(1, REF_STEPS + 1))
    return run_dir, ref


class Job:
    """`mpirun -np N python -m hpcllm.train` running in the background, output in files."""

    def __init__(
        self,
        np: int,
        settings: dict,
        workdir: Path,
        *,
        env: dict | None = None,
        python_args: list[str] | None = None,
    ):
        self.run_dir = Path(settings["run.dir"])
        self.out, self.err = workdir / "stdout.txt", workdir / "stderr.txt"
        cmd = [
            "mpirun",
            "-np",
            str(np),
            sys.executable,
            *(python_args or ["-m", "hpcllm.train"]),
            *overrides({**TINY, **settings}),
        ]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=subprocess_env(env),
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.started = time.monotonic()

    def last_step(self) -> int:
        """The newest step in metrics.jsonl (0 before the first)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return 0
        steps = [
            json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")
        ]
        return max(steps, default=0)

    def wait_for_step(self, step: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.last_step() < step:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"the job ended (exit {self.proc.returncode}) before step {step}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no step {step} within {timeout}s:\n{self.output()}")
            time.sleep(0.02)

    def rank_pid(self, rank: int) -> int:
        """The pid of world rank `rank`: a child of mpirun (prterun) whose environment names it."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                environ = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == self.proc.pid and f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ:
                return int(entry.name)
        pytest.fail(f"no process of rank {rank} under mpirun {self.proc.pid}")

    def wait(self, timeout: float) -> float:
        """Wait for mpirun to exit; returns the seconds it took from now."""
        start = time.monotonic()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the job did not exit within {timeout}s:\n{self.output()}")
        return time.monotonic() - start

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def output(self) -> str:
        return (
            f"--- stdout ---\n{self.out.read_text()[-3000:]}\n"
            f"--- stderr ---\n{self.err.read_text()[-3000:]}"
        )


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(
        int(p.name[5:])
        for p in (run_dir / "checkpoints").glob("step_*")
        if (p / "meta.json").exists()
    )


def assert_same_losses(got: dict, ref: dict, steps) -> None:
    for step in steps:
        assert got[step] == ref[step], (
            f"step {step}: {got[step]} after the interruption, {ref[step]} uninterrupted"
        )


def finish(np: int, data_dir, run_dir: Path, steps: int = REF_STEPS, **more):
    """Rerun the same command with max_steps `steps`: it resumes and completes."""
    result = train(
        np, ops_settings(data_dir, run_dir, **{"train.max_steps": steps, **more}), timeout=120
    )
    assert result.returncode == 0, result
    assert status(run_dir)["state"] == "complete"
    return result


# ----------------------------------------------------------------- signals and time budget


def test_sigterm_to_one_rank_saves_everywhere_and_the_rerun_matches(data_dir, reference, tmp_path):
    _ref_dir, ref = reference
    run_dir = tmp_path / "run"
    job = Job(2, ops_settings(data_dir, run_dir, **{"train.max_steps": ENDLESS}), tmp_path)
    job.wait_for_step(3)
    os.kill(job.rank_pid(1), signal.SIGTERM)
    seconds = job.wait(timeout=60)
    assert job.proc.returncode == 0, job.output()
    assert seconds < 60
    state = status(run_dir)
    assert state["state"] == "stopped" and state["reason"] == "SIGTERM", state
    stopped_at = state["step"]
    assert f"stopping at step {stopped_at}: SIGTERM" in job.out.read_text()
    # One collective save: the checkpoint of the step where both ranks agreed to stop.
    assert checkpoint_steps(run_dir) == [stopped_at]
    assert stopped_at < REF_STEPS, (
        f"the signal landed late (step {stopped_at}); the test needs it earlier"
    )

    result = finish(2, data_dir, run_dir)
    assert (
        f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:06d}'} at step {stopped_at}"
        in result.stdout
    )
    assert_same_losses(losses(run_dir), ref, range(1, REF_STEPS + 1))


def test_time_budget_saves_and_exits_0(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    start = time.monotonic()
    result = train(
        2,
        ops_settings(
            data_dir,
            run_dir,
            **{"train.max_steps": ENDLESS, "run.time_limit_s": 4, "train.log_every": 100},
        ),
        timeout=90,
    )
    assert result.returncode == 0, result
    state = status(run_dir)
    assert state["state"] == "stopped" and state["reason"].startswith("time budget"), state
    assert 0 < state["step"] < ENDLESS and checkpoint_steps(run_dir) == [state["step"]]
    # The budget counts from the start of the ranks (start-up included), then a step and a save.
    assert time.monotonic() - start < 4 + 30, result


# ----------------------------------------------------------------- dead and hung ranks


def test_kill_9_of_one_rank_ends_the_job_and_the_rerun_matches(data_dir, reference, tmp_path):
    _ref_dir, ref = reference
    run_dir = tmp_path / "run"
    job = Job(
        2,
        ops_settings(data_dir, run_dir, **{"train.max_steps": ENDLESS, "checkpoint.every": 5}),
        tmp_path,
    )
    job.wait_for_step(12)
    os.kill(job.rank_pid(1), signal.SIGKILL)
    seconds = job.wait(timeout=30)  # mpirun notices the dead rank and kills the others
    assert job.proc.returncode != 0, job.output()
    assert "signal 9" in job.err.read_text() or "Killed" in job.err.read_text(), job.output()
    assert not (run_dir / "status.json").exists()
    last = checkpoint_steps(run_dir)[-1]
    assert 10 <= last < REF_STEPS, f"newest checkpoint at step {last}"
    print(f"mpirun exited {seconds:.1f}s after kill -9 of rank 1 (exit {job.proc.returncode})")

    result = finish(2, data_dir, run_dir)
    assert f"at step {last}" in result.stdout, result
    assert_same_losses(losses(run_dir), ref, range(last + 1, REF_STEPS + 1))
    # The steps after `last`, logged before the kill, were trained again: each is logged once.
    records, val = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, REF_STEPS + 1))
    assert [r["step"] for r in val] == [REF_STEPS]


def test_a_hung_rank_is_named_and_aborts_the_job(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = train(
        2,
        ops_settings(data_dir, run_dir, **{"train.max_steps": 50, "run.watchdog_s": 2}),
        faults={"HANG_AT_STEP": 3, "HANG_RANK": 1},
        timeout=60,
    )
    assert result.returncode != 0, result
    assert "watchdog: rank 1 on" in result.stderr and "at step 3" in result.stderr, result
    assert "training step 3" in result.stderr, result  # what it was doing
    assert max(losses(run_dir)) == 2


# Fault injection from outside: run hpcllm.train with its first training step (on every rank)
# and rank 0's first checkpoint file write slower than run.watchdog_s. Rank 0 writes the files
# (rank 1 holds a dp replica), so rank 1 waits for it in the save's barrier meanwhile.
SLOW_STEP_AND_SAVE = """
import time
from contextlib import contextmanager
import hpcllm.train as train
from hpcllm.runtime.spmd import spmd_main
from hpcllm.training.trainer import Trainer
from hpcllm.runtime.watchdog import WATCHDOG
from mpi4py import MPI
step, paused = Trainer.train_step, WATCHDOG.paused
slept = False
def slow_step(*args, **kwargs):
    if WATCHDOG.step == 1:
        time.sleep(SECONDS)
    return step(*args, **kwargs)
@contextmanager
def slow_write():
    global slept
    with paused():
        if MPI.COMM_WORLD.Get_rank() == 0 and WATCHDOG.step == 3 and not slept:
            slept = True
            time.sleep(SECONDS)
        yield
Trainer.train_step, WATCHDOG.paused = slow_step, slow_write
spmd_main(train.main)
"""


def test_watchdog_spares_a_slow_first_step_and_a_slow_save(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    settings = ops_settings(
        data_dir,
        run_dir,
        **{
            "train.max_steps": 6,
            "checkpoint.every": 3,
            "run.watchdog_s": 2,
            "run.watchdog_first_step_s": 30,
        },
    )
    code = SLOW_STEP_AND_SAVE.replace("SECONDS", "4")
    job = Job(2, settings, tmp_path, python_args=["-c", code])
    job.wait(timeout=90)
    assert job.proc.returncode == 0, job.output()
    assert "watchdog" not in job.err.read_text(), job.output()
    assert checkpoint_steps(run_dir) == [3, 6] and status(run_dir)["state"] == "complete"


# ----------------------------------------------------------------- frozen ranks
# A frozen rank (SIGSTOP here; a stuck NFS read or a dead node alike) cannot report itself:
# the ranks waiting for it must end the job and name it, not themselves.

# Start-up on a loaded 2-core test machine has pauses of seconds: a generous first-step limit.
FROZEN = {"run.watchdog_s": 2, "run.watchdog_first_step_s": 10}


def first_watchdog_line(stderr: str) -> str:
    return next((line for line in stderr.splitlines() if "watchdog:" in line), "")


def assert_named(job: Job, rank: int, within: float) -> str:
    seconds = job.wait(timeout=within)
    err = job.err.read_text()
    assert job.proc.returncode != 0, job.output()
    first = first_watchdog_line(err)
    assert first.startswith(f"[hpcllm] watchdog: rank {rank} "), job.output()
    print(f"job ended {seconds:.1f}s after the freeze; {first}")
    return first


def test_a_rank_frozen_mid_training_is_named_by_the_others(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    job = Job(
        3, ops_settings(data_dir, run_dir, **{"train.max_steps": ENDLESS, **FROZEN}), tmp_path
    )
    job.wait_for_step(3)
    os.kill(job.rank_pid(1), signal.SIGSTOP)
    first = assert_named(job, 1, within=40)
    assert "heartbeat stopped" in first and "frozen" in first, first


# Rank 1 stops itself (SIGSTOP) as it calls MODULE.FUNCTION, when CONDITION holds for its args.
FREEZE_RANK_1 = """
import os, signal
import hpcllm.train as train
import MODULE as module
from hpcllm.runtime.spmd import spmd_main
from mpi4py import MPI
original = module.FUNCTION
def freezing(*args, **kwargs):
    if MPI.COMM_WORLD.Get_rank() == 1 and CONDITION:
        os.kill(os.getpid(), signal.SIGSTOP)
    return original(*args, **kwargs)
module.FUNCTION = freezing
spmd_main(train.main)
"""


def freeze_rank_1(module: str, function: str, condition: str = "True") -> list[str]:
    code = FREEZE_RANK_1.replace("MODULE", module).replace("FUNCTION", function)
    return ["-c", code.replace("CONDITION", condition)]


def test_a_rank_frozen_while_another_saves_is_named(data_dir, tmp_path):
    """Rank 1 freezes as it enters the save of step 3, while rank 0 is inside that save."""
    run_dir = tmp_path / "run"
    settings = ops_settings(
        data_dir, run_dir, **{"train.max_steps": 6, "checkpoint.every": 3, **FROZEN}
    )
    job = Job(
        2,
        settings,
        tmp_path,
        python_args=freeze_rank_1(
            "hpcllm.training.checkpointer", "Checkpointer.save", "args[0].trainer.step == 3"
        ),
    )
    assert_named(job, 1, within=40)
    assert "noticed by rank 0 on" in job.err.read_text(), job.output()
    assert "in: checkpoint save at step 3" in job.err.read_text(), job.output()


def test_a_rank_frozen_in_start_up_is_named(data_dir, tmp_path):
    """Rank 1 freezes in start-up, after MPI is up, as it opens the data shards."""
    run_dir = tmp_path / "run"
    settings = ops_settings(data_dir, run_dir, **{"train.max_steps": 6, **FROZEN})
    job = Job(
        2, settings, tmp_path, python_args=freeze_rank_1("hpcllm.training.trainer", "resolve_data")
    )
    assert_named(job, 1, within=40)


def test_a_rank_hung_before_mpi_init_ends_the_job(data_dir, tmp_path):
    """Rank 1 hangs before it imports mpi4py, while rank 0 waits inside MPI's start-up."""
    run_dir = tmp_path / "run"
    # The limit of the command line holds from the process's start, before the config is
    # read by the job itself.
    settings = ops_settings(
        data_dir, run_dir, **{"train.max_steps": 6, "run.watchdog_first_step_s": 6}
    )
    job = Job(2, settings, tmp_path, env={"HPCLLM_HANG_AT_START": "1"})
    first = assert_named(job, 1, within=40)
    assert "start-up before MPI" in first, first


# Rank 1's `import torch` never returns (a hung shared file system), once MPI is up.
STUCK_IMPORTING_TORCH = """
import os, runpy, sys, time
class StuckImportingTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and os.environ.get("OMPI_COMM_WORLD_RANK") == "1":
            while True:
                time.sleep(3600)
        return None
sys.meta_path.insert(0, StuckImportingTorch())
runpy.run_module("hpcllm.train", run_name="__main__", alter_sys=True)
"""


def test_a_rank_stuck_importing_torch_is_named(data_dir, tmp_path):
    """The watchdog is armed before torch loads, so a rank hung in `import torch` ends the job."""
    run_dir = tmp_path / "run"
    settings = ops_settings(
        data_dir, run_dir, **{"train.max_steps": 6, "run.watchdog_first_step_s": 6}
    )
    job = Job(2, settings, tmp_path, python_args=["-c", STUCK_IMPORTING_TORCH])
    first = assert_named(job, 1, within=40)
    assert "in: start-up: imports and config" in first, first
    assert "in find_spec" in job.err.read_text(), job.output()  # its stack shows where


def test_the_job_plumbing_loads_without_torch():
    """The watchdog, stop and run folder (and the config they read) must work before torch
    loads; a fresh interpreter shows what importing them pulls in."""
    modules = "hpcllm.runtime.watchdog, hpcllm.config, hpcllm.runtime.stop, hpcllm.runtime.rundir"
    code = f"import sys, {modules}; print(sorted(m for m in ('torch', 'hpcllm.models.gpt') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == "[]", out


# ----------------------------------------------------------------- the run folder


def test_a_second_run_on_the_same_run_dir_is_refused_naming_the_holder(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    # The holder runs on one rank, so it keeps one core busy, not both: two ranks of an endless
    # job (computing, or spinning in MPI while they wait for each other) starved the second
    # job's start-up on a 2-core machine (90 s instead of seconds).
    job = Job(1, ops_settings(data_dir, run_dir, **{"train.max_steps": ENDLESS}), tmp_path)
    job.wait_for_step(2)
    # The second run's start-up, in this process (a process other than the holder).
    second = refusal(ops_settings(data_dir, run_dir, **{"train.max_steps": 5}))
    holder = f"host {socket.gethostname()}, pid {job.rank_pid(0)}"
    assert f"run.dir {run_dir} is in use by another run: {holder}" in second, second
    job.wait_for_step(job.last_step() + 2)  # the first run goes on undisturbed
    os.kill(job.rank_pid(0), signal.SIGKILL)  # the OS releases the lock of a dead process
    job.wait(timeout=30)
    finish(1, data_dir, run_dir, steps=job.last_step() + 2)


def test_sigint_stops_like_sigterm_and_is_reported_as_sigint(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    job = Job(2, ops_settings(data_dir, run_dir, **{"train.max_steps": ENDLESS}), tmp_path)
    job.wait_for_step(2)
    os.kill(job.rank_pid(1), signal.SIGINT)
    job.wait(timeout=60)
    assert job.proc.returncode == 0, job.output()
    state = status(run_dir)
    assert state["state"] == "stopped" and state["reason"] == "SIGINT", state
    assert checkpoint_steps(run_dir) == [state["step"]]


def test_resume_with_another_global_batch_or_data_path_warns(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    finish(None, data_dir, run_dir, steps=3)
    copy = tmp_path / "copy-of-data"
    shutil.copytree(data_dir, copy)
    result = finish(None, copy, run_dir, steps=5, **{"train.grad_accum_steps": 2})
    assert "warning: resuming from" in result.stdout, result
    assert (
        "the global batch (micro_batch_size x grad_accum_steps x dp) is 4 sequences, 2 in the checkpoint"
        in result.stdout
    )
    assert f"data.path is {copy}, {data_dir} in the checkpoint" in result.stdout
    same = finish(None, copy, run_dir, steps=6, **{"train.grad_accum_steps": 2})
    assert "warning" not in same.stdout, same


# ----------------------------------------------------------------- interrupted save


def test_incomplete_checkpoint_is_ignored_with_a_warning(data_dir, reference, tmp_path):
    _ref_dir, ref = reference
    run_dir = tmp_path / "run"
    finish(2, data_dir, run_dir, steps=4)
    # A save of step 8 killed half-way: its temporary folder with a truncated model file, no meta.json.
    ckpts = run_dir / "checkpoints"
    partial = ckpts / ".tmp-step_000008"
    partial.mkdir()
    (partial / "model-pp0-dp0-tp0.safetensors").write_bytes(
        (ckpts / "step_000004" / "model-pp0-dp0-tp0.safetensors").read_bytes()[:1000]
    )
    result = finish(2, data_dir, run_dir, steps=8)
    assert f"warning: ignoring incomplete checkpoint {partial}" in result.stdout, result
    assert f"resumed from {ckpts / 'step_000004'} at step 4" in result.stdout, result
    assert_same_losses(losses(run_dir), ref, range(1, 9))
    assert checkpoint_steps(run_dir) == [4, 8] and not partial.exists()


# ----------------------------------------------------------------- elastic resume


@pytest.fixture(scope="module")
def dp4_reference(data_dir, tmp_path_factory):
    """Uninterrupted 4-rank run, global batch 4 x 2 = 8 sequences, 8 steps."""
    run_dir = tmp_path_factory.mktemp("ops-dp4") / "run"
    result = train(4, ops_settings(data_dir, run_dir, **{"train.max_steps": 8}), timeout=180)
    assert result.returncode == 0, result
    return losses(run_dir)


# (np, grad_accum_steps) before and after the resize; micro_batch_size 2, so the global batch is 8.
RESIZES = {"dp4->dp2": ((4, 1), (2, 2)), "dp2->dp4": ((2, 2), (4, 1))}


@pytest.mark.parametrize("resize", list(RESIZES))
def test_resume_on_another_dp_keeps_the_global_batch(resize, data_dir, dp4_reference, tmp_path):
    (np_before, accum_before), (np_after, accum_after) = RESIZES[resize]
    run_dir = tmp_path / "run"
    finish(np_before, data_dir, run_dir, steps=4, **{"train.grad_accum_steps": accum_before})
    result = finish(np_after, data_dir, run_dir, steps=8, **{"train.grad_accum_steps": accum_after})
    # The loader continues at the first sample the old layout had not consumed: 4 steps x 8.
    assert "at step 4 (sample 32, layout" in result.stdout, result
    meta = json.loads((run_dir / "checkpoints" / "step_000008" / "meta.json").read_text())
    assert meta["loader"]["consumed_samples"] == 8 * 8 and meta["grid"]["dp"] == np_after
    got = losses(run_dir)
    # The next step sees the same weights and samples; only the reduction order differs.
    assert got[5] == pytest.approx(dp4_reference[5], rel=1e-5), (got[5], dp4_reference[5])
    for step in range(6, 9):
        assert got[step] == pytest.approx(dp4_reference[step], rel=1e-4), step


@pytest.mark.parametrize("resize", list(RESIZES))
def test_resized_layouts_read_every_sample_once(resize):
    """The stream positions of steps 1-4 in the old layout and 5-8 in the new one tile [0, 64)."""
    from hpcllm.data.loader import step_positions

    positions = []
    for step in range(8):
        np_, accum = RESIZES[resize][step >= 4]
        for rank in range(np_):
            for micro in step_positions(
                step * 8, micro_batch_size=2, grad_accum_steps=accum, dp_rank=rank, dp_size=np_
            ):
                positions += micro.tolist()
    assert sorted(positions) == list(range(64))


def test_resume_with_another_model_shape_is_refused_naming_the_key(data_dir, reference, tmp_path):
    ref_dir, _ = reference
    before = sorted(p.name for p in (ref_dir / "checkpoints").iterdir())
    message = refusal(  # one rank, in this process: the model is checked before the layout
        ops_settings(data_dir, ref_dir, **{"train.max_steps": REF_STEPS + 5, "model.d_model": 64})
    )
    assert "model.d_model = 32 in the checkpoint, 64 now" in message, message
    assert sorted(p.name for p in (ref_dir / "checkpoints").iterdir()) == before


def test_the_first_step_limit_is_read_before_anything_else(tmp_path):
    """From the command line over the TOML file over the default; a config with a mistake
    leaves the default (the job reports the mistake itself, once it starts)."""
    from hpcllm.config import RunConfig
    from hpcllm.runtime.watchdog import first_step_limit

    toml = tmp_path / "job.toml"
    toml.write_text("[run]\nwatchdog_first_step_s = 40\n")
    assert first_step_limit(["--config", str(toml)]) == 40
    assert first_step_limit(["--config", str(toml), "--run.watchdog_first_step_s", "7"]) == 7
    assert first_step_limit(["--run.watchdog_first_step_s=12", "--dry-run"]) == 12
    default = RunConfig().watchdog_first_step_s
    assert first_step_limit(["--run.watchdog_first_step_s", "soon"]) == default
    assert first_step_limit(["--config", str(tmp_path / "missing.toml")]) == default
