"""Multi-node behaviour on emulated hosts (tests/emulated_hosts.py): one network namespace and
hostname per "node", Open MPI launching through a namespace-entering agent instead of ssh.

- dp and dp x pp spread over 2 hosts give the single-host run's losses;
- a host whose processes are all killed, or whose link is cut, ends the job within 30 s with a
  message naming it, and a rerun on the remaining hosts (fewer dp ranks, the same global batch)
  resumes from the last checkpoint;
- slurm/launch.sh's mpirun path runs over a host list.

They need root and iproute2 (`ip`, `tc`) and skip with the reason otherwise. Select them with
`pytest -m emulated_hosts`. mpirun's exit status alone proves nothing here (it exits 0 after
losing a host), so every check reads the run's status.json and metrics.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emulated_hosts import EmulatedHosts, unavailable
from helpers import REPO, TINY, losses, overrides, prepare_data, run, subprocess_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.emulated_hosts,
    pytest.mark.skipif(unavailable() is not None, reason=unavailable() or ""),
]

STEPS = 12
GLOBAL_ACCUM = 4  # micro-batches per step on a single rank: the global batch is 4 x 2 sequences


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("multinode-data") / "shards")


def train_cmd(settings: dict) -> list[str]:
    return [sys.executable, "-m", "hpcllm.train", *overrides({**TINY, **settings})]


def status(run_dir: Path) -> dict | None:
    path = run_dir / "status.json"
    return json.loads(path.read_text()) if path.is_file() else None


def latest_checkpoint_step(run_dir: Path) -> int:
    name = (run_dir / "checkpoints" / "latest").read_text().strip()
    return int(name.rsplit("_", 1)[1])


# ----------------------------------------------------------------- the same losses as one host


@pytest.fixture(scope="module")
def single_host_run(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    settings = {
        "data.path": data_dir,
        "run.dir": run_dir,
        "train.max_steps": STEPS,
        "train.grad_accum_steps": GLOBAL_ACCUM,
    }
    result = run(train_cmd(settings), timeout=120)
    assert result.returncode == 0, result
    return run_dir


@pytest.mark.parametrize(
    "np, layout",
    [
        (2, {"parallel.dp": 2}),
        (4, {"parallel.dp": 2, "parallel.pp": 2}),
        (4, {"parallel.dp": 4, "parallel.allreduce": "hierarchical"}),
        (4, {"parallel.dp": 4, "parallel.allreduce": "hierarchical", "parallel.zero": 1}),
    ],
    ids=["dp2", "dp2xpp2", "dp4-hierarchical", "dp4-hierarchical-zero1"],
)
def test_layout_over_two_hosts_equals_the_single_host_run(
    np, layout, data_dir, single_host_run, tmp_path
):
    run_dir = tmp_path / "run"
    dp = layout["parallel.dp"]
    settings = {
        "data.path": data_dir,
        "run.dir": run_dir,
        "train.max_steps": STEPS,
        "train.grad_accum_steps": GLOBAL_ACCUM // dp,
        **layout,
    }
    with EmulatedHosts(2) as hosts:
        result = run(hosts.mpirun_args(np) + train_cmd(settings), timeout=120)
        names = [h.name for h in hosts.hosts]
    assert result.returncode == 0, result
    assert status(run_dir) == {
        "state": "complete",
        "step": STEPS,
        "max_steps": STEPS,
        "reason": None,
    }, result
    # Both hosts took part: their ranks are listed under their own hostnames.
    per_host = np // 2
    assert f"{names[0]} (rank{'s 0-1' if per_host == 2 else ' 0'})" in result.stdout, result
    assert f"{names[1]} (rank{'s 2-3' if per_host == 2 else ' 1'})" in result.stdout, result
    if layout.get("parallel.allreduce") == "hierarchical":  # found the hosts as nodes
        assert "all-reduce over dp: hierarchical (2 nodes x 2 dp ranks)" in result.stdout, result
    ref, got = losses(single_host_run), losses(run_dir)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), (step, got[step], ref[step])
    assert abs(ref[STEPS] - ref[1]) > 0.1  # the loss moved: not trivially equal


# ----------------------------------------------------------------- a host dies


def run_until_fault(hosts: EmulatedHosts, np: int, settings: dict, fault) -> tuple[float, str]:
    """Start a long run on every host; once a checkpoint is saved, apply `fault()`; return the
    seconds from the fault to the end of mpirun, and everything it printed."""
    proc = subprocess.Popen(
        hosts.mpirun_args(np) + train_cmd(settings),
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("saved ") and "step_000010" in line:
                break
        else:
            pytest.fail("the job ended before its first checkpoint:\n" + "".join(lines[-60:]))
        fault()
        start = time.perf_counter()
        out, _ = proc.communicate(timeout=60)
        ended = time.perf_counter() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return ended, "".join(lines) + out


@pytest.mark.parametrize(
    "fault, num_hosts",
    [("kill", 4), ("cut", 2)],
    ids=["kill-every-process-of-a-host", "cut-a-host's-link"],
)
def test_a_dead_host_ends_the_job_and_the_rerun_on_the_others_resumes(
    fault, num_hosts, data_dir, tmp_path
):
    run_dir = tmp_path / "run"
    settings = {
        "data.path": data_dir,
        "run.dir": run_dir,
        # Far more steps than it can make in the time allowed: only the fault ends it.
        "train.max_steps": 100_000,
        "checkpoint.every": 10,
        "checkpoint.keep": 100,
        "parallel.dp": num_hosts,
        "train.grad_accum_steps": 1,
    }
    with EmulatedHosts(num_hosts) as hosts:
        dead = hosts.hosts[-1]
        ended, out = run_until_fault(
            hosts,
            num_hosts,
            settings,
            lambda: hosts.kill_host(dead.index) if fault == "kill" else hosts.cut_link(dead.index),
        )
        assert ended < 30, f"the job went on {ended:.0f} s after the fault\n{out[-3000:]}"
        # mpirun may exit 0: the run's own record says it did not finish.
        assert status(run_dir) is None, out[-3000:]
        assert dead.name in out.split("step 10/")[-1], (
            f"no message names the dead host {dead.name}:\n{out[-3000:]}"
        )
        resume_from = latest_checkpoint_step(run_dir)
        before = losses(run_dir)

        # The rerun: half the hosts, half the dp ranks, twice the accumulation.
        survivors = list(range(num_hosts // 2))
        np = len(survivors)
        rerun = {
            **settings,
            "train.max_steps": resume_from + 5,
            "parallel.dp": np,
            "train.grad_accum_steps": num_hosts // np,
        }
        result = run(hosts.mpirun_args(np, survivors) + train_cmd(rerun), timeout=120)
    assert result.returncode == 0, result
    assert f"checkpoints/step_{resume_from:06d} at step {resume_from}" in result.stdout, result
    assert status(run_dir)["state"] == "complete", result
    after = losses(run_dir)
    assert min(s for s in after if s > resume_from) == resume_from + 1
    # The same samples and weights: the steps both runs made have the same loss.
    for step in range(resume_from + 1, resume_from + 6):
        if step in before:
            assert after[step] == pytest.approx(before[step], rel=1e-5), step


# ----------------------------------------------------------------- slurm/launch.sh's mpirun path


def test_slurm_launch_script_mpirun_path_over_a_host_list(data_dir, tmp_path):
    """hpcllm_launch with HPCLLM_LAUNCHER=mpirun, the hosts in HPCLLM_MPIRUN_ARGS (no Slurm:
    the variables it reads from the allocation are set by hand)."""
    run_dir = tmp_path / "run"
    settings = {"data.path": data_dir, "train.max_steps": 3, "parallel.dp": 2}
    with EmulatedHosts(2) as hosts:
        mpirun_args = ["--hostfile", str(hosts.hostfile()), "--map-by", "ppr:1:node"]
        env = {
            "HPCLLM_LAUNCHER": "mpirun",
            "HPCLLM_MPIRUN_ARGS": " ".join(mpirun_args + hosts.mca_args(bind_none=False)),
            "HPCLLM_RUN_DIR": str(run_dir),
            "SLURM_JOB_ID": "4242",
            "SLURM_NTASKS": "2",
            "SLURM_JOB_NUM_NODES": "2",
        }
        script = f"source slurm/launch.sh && hpcllm_launch {' '.join(overrides(settings))}"
        result = run([*hosts.exec_args(0), "bash", "-c", script], timeout=120, env=env)
        names = [h.name for h in hosts.hosts]
    assert result.returncode == 0, result
    assert "mpirun exited with 0; run state: complete at step 3" in result.stdout, result
    assert f"hosts: {names[0]} (rank 0), {names[1]} (rank 1)" in result.stdout, result
