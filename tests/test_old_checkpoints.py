"""Checkpoints written before checkpoints were built from pieces (tests/data/old_checkpoints,
written by make.py there at commit 3a0f978) still resume, and continue with the losses the
code of that time continued with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import losses, prepare_data, train

OLD = Path(__file__).parent / "data" / "old_checkpoints"
RECORD = json.loads((OLD / "losses.json").read_text())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # make.py's corpus and shards: the loader position of the checkpoints refers to them.
    return prepare_data(tmp_path_factory.mktemp("old") / "data")


@pytest.mark.parametrize("case", sorted(RECORD))
def test_an_old_checkpoint_resumes_with_the_old_losses(case, data_dir, tmp_path):
    saved = next((OLD / case).glob("step_*"))
    run_dir = tmp_path / "run"
    shutil.copytree(saved, run_dir / "checkpoints" / saved.name)
    record = RECORD[case]
    steps = max(int(s) for s in record["losses"])
    settings = {**record["settings"], "data.path": data_dir, "run.dir": run_dir}
    result = train(2, {**settings, "train.max_steps": steps}, timeout=180)
    assert result.returncode == 0, result
    assert f"resumed from {run_dir / 'checkpoints' / saved.name}" in result.stdout, result
    # The compression state (error feedback, Q) of the old checkpoint was restored.
    assert "starts afresh" not in result.stdout + result.stderr, result
    # The same operations in the same order as the old code's continuation: bitwise.
    assert losses(run_dir) == {int(s): v for s, v in record["losses"].items()}
