"""The default job (llama + Muon + a BPE vocabulary) end to end under dp, pp and tp, and its
losses pinned, so a refactoring that changes what the default job computes cannot pass.

The pinned losses were recorded by the code before the trainer's redesign, on the machine and
CPU kernels named in the file: there they must match bit for bit; on other CPU kernels the same
maths rounds in another order (tests/helpers.py, FP32_EPS), so they must match to a relative
1e-4 (Muon's Newton-Schulz iterations amplify rounding; a changed computation moves the
losses by 1e-3 and more). HPCLLM_PIN_DEFAULT_JOB=1 records them anew.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from helpers import losses, read_metrics, run, write_corpus

PINNED = Path(__file__).parent / "data" / "default_job_losses.json"
STEPS = 8
# Only what a short test needs differs from the default job: the data (a small BPE corpus the
# test prepares), the steps, and no evaluation, sample or intermediate checkpoint.
SHORT = {
    "train.max_steps": STEPS,
    "train.log_every": 1,
    "train.eval_every": 0,
    "train.eval_batches": 1,
    "run.sample_tokens": 0,
    "checkpoint.every": 0,
}


def kernels() -> dict:
    import torch

    return {"torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability()}


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory) -> Path:
    from hpcllm.data.prepare import prepare

    root = tmp_path_factory.mktemp("default-job")
    corpus = write_corpus(root / "corpus", num_docs=6, words_per_doc=4000)
    prepare([str(corpus)], str(root / "shards"), tokenizer="bpe", vocab_size=320, val_fraction=0.1)
    return root / "shards"


def default_job(np: int, run_dir: Path, data: Path, **layout) -> dict[int, float]:
    settings = {**SHORT, "data.path": data, "run.dir": run_dir, **layout}
    args = [a for key, value in settings.items() for a in (f"--{key}", str(value))]
    result = run(
        ["mpirun", "-np", str(np), sys.executable, "-m", "hpcllm.train", *args], timeout=240
    )
    assert result.returncode == 0, result
    assert "llama" in (run_dir / "config.toml").read_text()
    # Shares of a step, each counted once (Muon's all-gathers were once subtracted twice,
    # making fixed_frac negative).
    for record in read_metrics(run_dir)[0]:
        for key in ("loader_frac", "fixed_frac", "comm_wait_frac"):
            assert 0 <= record[key] < 1, (key, record)
    return losses(run_dir)


def test_default_job_losses_are_pinned_and_layouts_agree(bpe_data, tmp_path):
    dp2 = default_job(2, tmp_path / "dp2", bpe_data)
    assert sorted(dp2) == list(range(1, STEPS + 1))
    if os.environ.get("HPCLLM_PIN_DEFAULT_JOB"):
        PINNED.write_text(json.dumps({**kernels(), "losses": dp2}, indent=1) + "\n")
    pinned = json.loads(PINNED.read_text())
    want = {int(step): loss for step, loss in pinned["losses"].items()}
    if {k: pinned[k] for k in kernels()} == kernels():
        assert dp2 == want, "the default job's losses changed (bitwise, same kernels)"
    else:
        assert dp2 == pytest.approx(want, rel=1e-4)
    # The same global batch (32 sequences) under pp 2 and tp 2: the same maths in another order.
    for name, layout in {
        "pp2": {"parallel.pp": 2, "train.grad_accum_steps": 2},
        "tp2": {"parallel.tp": 2, "train.grad_accum_steps": 2},
    }.items():
        got = default_job(2, tmp_path / name, bpe_data, **layout)
        assert got == pytest.approx(dp2, rel=1e-4), name
