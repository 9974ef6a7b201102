"""The slurm/ scripts on a real single-node Slurm (tests/slurm_cluster.py starts it, or the
tests skip saying why): a 2-task CPU job to completion through `srun --mpi=pmix`, the
pre-timeout SIGUSR1 reaching the ranks through the batch shell, a resubmission that finishes the
run with the uninterrupted run's losses, and a job that requeues itself under `mpirun` and
resumes in the same run folder. The scripts' documentation is checked without Slurm.

Jobs are submitted from a scratch folder that links to the repository's slurm/, so the
default run folders (runs/<job name>-<job id>) land there and not in the repository.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, TINY, losses, overrides, prepare_data, subprocess_env, train

pytestmark = pytest.mark.slow  # a private Slurm cluster, jobs through sbatch

SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch"))
CONSTANT_LR = {
    "optim.warmup_steps": 0,
    "optim.lr": 1e-3,
    "optim.min_lr": 1e-3,
}  # losses independent of max_steps
DONE = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("slurm-data") / "shards")


@pytest.fixture
def submit_dir(tmp_path):
    (tmp_path / "slurm").symlink_to(REPO / "slurm")
    return tmp_path


class Job:
    def __init__(self, cluster, job_id: str, output: Path):
        self.cluster, self.id, self.output = cluster, job_id, output

    def text(self) -> str:
        return self.output.read_text() if self.output.exists() else ""

    def info(self) -> dict:
        return self.cluster.job_info(self.id)

    def wait_done(self, timeout: float = 120) -> dict:
        try:
            self.cluster.wait_state(self.id, DONE, timeout)
        except TimeoutError as e:
            self.cluster.run("scancel", self.id, check=False)
            pytest.fail(f"{e}\n{self.text()[-3000:]}\n{self.cluster.log_tail()}")
        return self.info()

    def wait_for_step(self, run_dir: Path, step: int, timeout: float = 90) -> None:
        """Until metrics.jsonl has a record of `step` or later."""
        deadline = time.monotonic() + timeout
        metrics = run_dir / "metrics.jsonl"
        while not (
            metrics.exists()
            and any(
                json.loads(line)["step"] >= step
                for line in metrics.read_text().splitlines()
                if line.endswith("}")
            )
        ):
            if self.cluster.job_state(self.id) in DONE or time.monotonic() > deadline:
                self.cluster.run("scancel", self.id, check=False)
                pytest.fail(f"job {self.id} never reached step {step}:\n{self.text()[-3000:]}")
            time.sleep(0.05)


def submit(
    cluster,
    submit_dir: Path,
    script: str,
    train_args: dict,
    *,
    env: dict | None = None,
    sbatch_args: tuple = (),
) -> Job:
    """sbatch slurm/<script> on 2 tasks of the test partition, with TINY overridden by train_args."""
    output = submit_dir / "job-%j.out"
    cmd = [
        "sbatch",
        "--parsable",
        "--partition=debug",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        # Above every script's --signal=B:USR1@ lead (600 s for the GPU multi-node one), or
        # Slurm sends the time warning as soon as the job starts and stops it early.
        "--time=30",
        f"--output={output}",
        *sbatch_args,
        f"slurm/{script}",
        *overrides({**TINY, **train_args}),
    ]
    # sbatch exports this environment to the job: the venv's mpirun first on PATH, the MPI-as-root
    # variables from conftest, and HPCLLM_VENV for the script's `source .../bin/activate`.
    job_env = cluster.client_env({**subprocess_env(), "HPCLLM_VENV": sys.prefix, **(env or {})})
    job_id = cluster.run(*cmd, env=job_env, cwd=submit_dir).stdout.strip().split(";")[0]
    return Job(cluster, job_id, Path(str(output).replace("%j", job_id)))


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


# ----------------------------------------------------------------- the scripts themselves


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_documented_and_valid_bash(script):
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert directives, "no #SBATCH lines"
    for line in directives:
        assert re.match(r"#SBATCH \S+\s+# \S", line), f"uncommented directive: {line}"
    for needed in (
        "--signal=B:USR1@",
        "--requeue",
        "--open-mode=append",
        "--time=",
        "--ntasks-per-node=",
    ):
        assert any(needed in line for line in directives), needed
    assert "CHANGE" in text and "source slurm/launch.sh" in text and "hpcllm_launch" in text
    if "gpu" in script.name:
        assert (
            "--train.device cuda" in text
            and "--gpus-per-node=" in text
            and "HPCLLM_CUDA_AWARE" in text
        )
    # Directives after the first command are ignored by sbatch: all of them must come first.
    first_command = next(
        i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#")
    )
    assert all(
        i < first_command for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH")
    )


@pytest.mark.parametrize("helper", ["launch.sh", "gpu_checks.sh"])
def test_helper_scripts_are_valid_bash(helper):
    assert subprocess.run(["bash", "-n", str(REPO / "slurm" / helper)]).returncode == 0


# ----------------------------------------------------------------- jobs on the test cluster


def test_cpu_script_trains_on_two_tasks(slurm, submit_dir, data_dir):
    job = submit(
        slurm, submit_dir, "train_cpu.sbatch", {"data.path": data_dir, "train.max_steps": 8}
    )
    info = job.wait_done()
    out = job.text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    # One job of 2 ranks (srun --mpi=pmix), not two 1-rank jobs.
    assert "srun --mpi=pmix" in out and "world 2 = pp 1 x dp 2 x tp 1" in out, out
    run_dir = submit_dir / "runs" / f"hpcllm-cpu-{job.id}"
    assert sorted(losses(run_dir)) == list(range(1, 9))
    assert status(run_dir) == {"state": "complete", "step": 8, "max_steps": 8, "reason": None}
    assert (run_dir / f"slurm-{job.id}.out").resolve() == job.output.resolve()
    assert "run state: complete at step 8" in out


@pytest.mark.parametrize(
    "script", ["train_cpu_multinode.sbatch", "train_gpu.sbatch", "train_gpu_multinode.sbatch"]
)
def test_other_scripts_launch_on_the_test_node(script, slurm, submit_dir, data_dir):
    """Their launch path on the one CPU node: --nodes=1, no GPUs, and --train.device cpu after
    the GPU scripts' own --train.device cuda (the last one given wins)."""
    gpu = "gpu" in script
    job = submit(
        slurm,
        submit_dir,
        script,
        {"data.path": data_dir, "train.max_steps": 3, **({"train.device": "cpu"} if gpu else {})},
        sbatch_args=("--nodes=1", *(["--gpus-per-node=0"] if gpu else [])),
    )
    info = job.wait_done()
    out = job.text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    assert "world 2 = pp 1 x dp 2 x tp 1" in out and "run state: complete at step 3" in out, out


def test_usr1_saves_and_a_resubmission_matches_the_uninterrupted_run(
    slurm, submit_dir, data_dir, tmp_path
):
    run_dir = tmp_path / "run"
    args = {"data.path": data_dir, **CONSTANT_LR}
    env = {"HPCLLM_RUN_DIR": str(run_dir), "HPCLLM_REQUEUE": "0"}
    job = submit(
        slurm, submit_dir, "train_cpu.sbatch", {**args, "train.max_steps": 100_000}, env=env
    )
    job.wait_for_step(run_dir, 3)
    # What `#SBATCH --signal=B:USR1@300` does before the time limit: signal the batch shell only.
    slurm.run("scancel", "--signal=USR1", "--batch", job.id)
    info = job.wait_done()
    out = job.text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    assert "batch shell got SIGUSR1: sending SIGUSR1 to srun" in out, out
    state = status(run_dir)
    assert state["state"] == "stopped" and state["reason"] == "SIGUSR1", state
    stopped_at = state["step"]
    assert f"stopping at step {stopped_at}: SIGUSR1" in out and "not requeued" in out, out

    final = stopped_at + 4
    resubmitted = submit(
        slurm, submit_dir, "train_cpu.sbatch", {**args, "train.max_steps": final}, env=env
    )
    info = resubmitted.wait_done()
    out = resubmitted.text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    assert f"at step {stopped_at}" in out and status(run_dir)["state"] == "complete", out

    ref_dir = tmp_path / "reference"
    ref = train(2, {**args, "run.dir": ref_dir, "train.max_steps": final}, timeout=120)
    assert ref.returncode == 0, ref
    got, expected = losses(run_dir), losses(ref_dir)
    assert sorted(got) == sorted(expected) == list(range(1, final + 1))
    for step in expected:
        assert got[step] == expected[step], (step, got[step], expected[step])


def test_usr1_requeues_the_job_under_mpirun_and_it_resumes(slurm, submit_dir, data_dir):
    # max_steps lives in a config file, so that the requeued job (same script, same arguments)
    # can be told to finish soon: the test shortens the run while the job waits in the queue.
    config = submit_dir / "run.toml"
    config.write_text("[train]\nmax_steps = 100000\n")
    job = submit(
        slurm,
        submit_dir,
        "train_cpu.sbatch",
        {"config": config, "data.path": data_dir, **CONSTANT_LR},
        env={"HPCLLM_LAUNCHER": "mpirun"},
        sbatch_args=("--job-name=requeue",),
    )
    run_dir = submit_dir / "runs" / f"requeue-{job.id}"
    job.wait_for_step(run_dir, 3)
    slurm.run("scancel", "--signal=USR1", "--batch", job.id)
    slurm.wait_state(job.id, {"PENDING"} | DONE, timeout=60)
    info = job.info()
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", (info, job.text())
    out = job.text()
    assert "batch shell got SIGUSR1: sending SIGUSR1 to mpirun" in out, out
    stopped_at = status(run_dir)["step"]
    assert f"stopped early (SIGUSR1) at step {stopped_at}: requeueing job {job.id}" in out, out

    config.write_text(f"[train]\nmax_steps = {stopped_at + 3}\n")
    # Slurm holds a requeued job for 2 minutes; start it sooner, though not within the second
    # of the requeue (slurmd still rejects the job's new credential then).
    slurm.run("scontrol", "update", f"jobid={job.id}", "starttime=now+3")
    info = job.wait_done()
    out = job.text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    assert (
        "(restart 1)" in out
        and f"resumed from runs/requeue-{job.id}/checkpoints/step_{stopped_at:06d}" in out
    )
    assert status(run_dir)["state"] == "complete" and max(losses(run_dir)) == stopped_at + 3
