"""A step whose loss or gradient norm is not finite is never applied and never saved."""

import json

import pytest

from helpers import TINY, losses, prepare_data, read_metrics, train

CONSTANT_LR = {"optim.warmup_steps": 0, "optim.min_lr": 1e-3, "optim.lr": 1e-3}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("div") / "data")


def test_huge_lr_stops_without_saving_the_diverged_state_and_a_lower_lr_reruns(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    settings = {
        **TINY,
        "data.path": data_dir,
        "run.dir": run_dir,
        "train.max_steps": 6,
        "checkpoint.every": 1,
        "optim.warmup_steps": 0,
    }
    result = train(2, {**settings, "optim.lr": 1e6, "optim.min_lr": 1}, timeout=120)
    assert result.returncode == 3, result
    err = result.stderr
    assert "diverged" in err and "was not applied and not saved" in err, err
    assert "lower optim.lr" in err
    assert "Traceback" not in err
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "diverged"
    bad = status["step"]
    ckpts = run_dir / "checkpoints"
    # No checkpoint of the failing step, and the one of the state that produced it is set aside.
    assert not (ckpts / f"step_{bad:06d}").exists()
    assert not (ckpts / f"step_{bad - 1:06d}").exists()
    assert (ckpts / f"diverged-step_{bad - 1:06d}").is_dir()
    # The rerun with a lower learning rate starts from what is left and trains to the end.
    again = train(2, {**settings, "optim.lr": 1e-3, "optim.min_lr": 1e-4}, timeout=120)
    assert again.returncode == 0, again
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 7))
    assert all(loss < 10 for loss in got.values()), got


def test_a_nan_step_is_not_applied_and_the_last_good_checkpoint_resumes(data_dir, tmp_path):
    """Divergence at step 7 with checkpoints every 2 steps: the step-6 checkpoint is the state
    that failed, set aside; the rerun resumes from step 4 and equals the uninterrupted run."""
    base = {
        **TINY,
        **CONSTANT_LR,
        "data.path": data_dir,
        "checkpoint.every": 2,
        "train.max_steps": 8,
    }
    ref = train(2, {**base, "run.dir": tmp_path / "ref"}, timeout=120)
    assert ref.returncode == 0, ref
    run_dir = tmp_path / "run"
    bad = train(2, {**base, "run.dir": run_dir}, faults={"NAN_AT_STEP": 7}, timeout=120)
    assert bad.returncode == 3, bad
    assert "step 7 diverged: loss nan" in bad.stderr
    assert "resume from" in bad.stderr and "step_000004" in bad.stderr
    records, _ = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 7))  # step 7 was never logged as done
    rerun = train(2, {**base, "run.dir": run_dir}, timeout=120)
    assert rerun.returncode == 0, rerun
    assert "resumed from" in rerun.stdout and "step_000004" in rerun.stdout
    want, got = losses(tmp_path / "ref"), losses(run_dir)
    for step in range(1, 9):
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
