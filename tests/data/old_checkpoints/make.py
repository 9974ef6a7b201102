"""Writes the checkpoints of tests/test_old_checkpoints.py with the code of the repository it
runs in (they were written at commit 3a0f978, before checkpoints were built from pieces):

    PYTHONPATH=$PWD python tests/data/old_checkpoints/make.py

Each case trains a tiny model on 2 ranks for 3 steps, saves, and continues to step 6 from
that checkpoint. The step-3 checkpoint and the continuation's losses are kept.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from helpers import losses, prepare_data, train  # noqa: E402

# Smaller than helpers.TINY: 20-60 KB of tensors per checkpoint.
SMALL = {
    **{"model.n_layer": 1, "model.d_model": 8, "model.tie_embeddings": True},
    **{"train.seq_len": 16, "checkpoint.keep": 0},
}
CASES = {
    "zero1-muon": {"parallel.dp": 2, "parallel.zero": 1, "optim.name": "muon"},
    "local-sgd": {
        "parallel.dp": 2,
        "parallel.sync_every": 2,
        "parallel.outer_lr": 0.7,
        "parallel.outer_momentum": 0.9,
    },
    "powersgd": {
        "parallel.dp": 2,
        "parallel.grad_compression": "powersgd",
        "parallel.powersgd_rank": 2,
        "parallel.powersgd_warmup": 1,
    },
}
SAVED, STEPS = 3, 6


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    data = prepare_data(tmp / "data")
    record = {}
    for name, settings in CASES.items():
        run_dir = tmp / name
        args = {**SMALL, **settings, "data.path": data, "run.dir": run_dir}
        first = train(2, {**args, "train.max_steps": SAVED}, timeout=300)
        assert first.returncode == 0, first
        (run_dir / "metrics.jsonl").unlink()
        resumed = train(2, {**args, "train.max_steps": STEPS}, timeout=300)
        assert resumed.returncode == 0, resumed
        out = HERE / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(run_dir / "checkpoints" / f"step_{SAVED:06d}", out / f"step_{SAVED:06d}")
        record[name] = {
            "settings": {**SMALL, **settings},
            "losses": {str(k): v for k, v in losses(run_dir).items()},
        }
    (HERE / "losses.json").write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
