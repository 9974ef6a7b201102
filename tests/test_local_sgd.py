"""Local SGD and DiLoCo (`parallel.sync_every H > 1`): the outer step, the dp ranks' models
between and at averages, exact resume between averages, pp x dp, and the refusals.

The outer step is checked in one process against a fake two-rank communicator; the rest are
`python -m hpcllm.train` runs of a tiny model on 2 (and one on 4) ranks.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from torch import nn

from hpcllm.config import ConfigError, parse_args
from hpcllm.optim.local_sgd import LocalSGD

from helpers import assert_reordered_close, losses, prepare_data, read_metrics, refusal, train

H = 4
STEPS = 20


class OtherRank:
    """A dp communicator of two ranks whose other rank holds `other` (a flat tensor)."""

    size, rank = 2, 0

    def __init__(self, other: torch.Tensor):
        self.other = other

    def allreduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.add_(self.other)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@torch.no_grad()
def set_flat(model: nn.Module, values: torch.Tensor) -> None:
    offset = 0
    for p in model.parameters():
        p.copy_(values[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


@pytest.mark.numerics
def test_outer_step_is_model_averaging_or_diloco_nesterov():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    start = flat(model).clone()
    for outer_lr, mu in ((1.0, 0.0), (0.7, 0.9)):
        set_flat(model, start)
        local = LocalSGD(model, OtherRank(torch.zeros(0)), 4, outer_lr, mu)  # type: ignore[arg-type]
        anchor, momentum = start.clone(), torch.zeros_like(start)
        for sync in range(3):
            # Each rank moved its own way since the last average.
            mine = anchor + torch.randn_like(anchor) * 0.1
            other = anchor + torch.randn_like(anchor) * 0.1
            set_flat(model, mine)
            local.comm = OtherRank(other)  # type: ignore[assignment]
            local.average()
            mean = (mine + other) / 2
            if mu == 0:
                # Plain local SGD: exactly the mean, on every parameter.
                assert torch.equal(flat(model), mean), sync
                anchor = mean
                continue
            delta = anchor - mean
            momentum = mu * momentum + delta
            anchor = anchor - outer_lr * (delta + mu * momentum)
            # The test's formula rounds in another order than LocalSGD's in-place updates.
            assert_reordered_close(flat(model), anchor, steps=sync + 1)
            assert not torch.allclose(flat(model), mean)
        # Each rank clipped its own gradient; both log the root mean square of the two norms.
        local.comm = OtherRank(torch.tensor([4.0**2], dtype=torch.float64))  # type: ignore[assignment]
        assert local.agreed_norm(3.0) == pytest.approx(math.sqrt((9 + 16) / 2))
        # The outer state by parameter name round-trips (the checkpoint's path).
        state = local.state_by_name()
        again = LocalSGD(model, OtherRank(torch.zeros(0)), 4, outer_lr, mu)  # type: ignore[arg-type]
        again.load_state_by_name(state)
        assert torch.equal(again.anchor, local.anchor)
        if mu:
            assert local.momentum is not None and again.momentum is not None
            assert torch.equal(again.momentum, local.momentum) and local.momentum.abs().sum() > 0


def test_config_refuses_what_local_sgd_does_not_combine_with():
    refused = {
        "parallel.zero 1": ["--parallel.zero", "1"],
        "parallel.grad_compression bf16": ["--parallel.grad_compression", "bf16"],
    }
    for name, args in refused.items():
        with pytest.raises(ConfigError, match=f"sync_every = 4 does not combine with {name}"):
            # adamw first: muon, the default, refuses zero 1 on its own (a later --optim.name wins)
            parse_args(["--parallel.sync_every", "4", "--optim.name", "adamw", *args])
    with pytest.raises(ConfigError, match="apply to local SGD only"):
        parse_args(["--parallel.outer_momentum", "0.9"])
    with pytest.raises(ConfigError, match=r"parallel\.outer_momentum = 1\.0 is out of range"):
        parse_args(["--parallel.sync_every", "4", "--parallel.outer_momentum", "1"])


# ----------------------------------------------------------------- end-to-end runs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("local-sgd-data") / "shards")


@pytest.fixture(scope="module")
def diloco_run(data_dir, tmp_path_factory):
    """dp 2, H 4 with DiLoCo's outer momentum, 20 steps, checkpoints at 10 (between averages)
    and 20 (right after one)."""
    run_dir = tmp_path_factory.mktemp("diloco") / "run"
    args = {
        "data.path": data_dir,
        "run.dir": run_dir,
        "train.max_steps": STEPS,
        "checkpoint.every": 10,
        "parallel.sync_every": H,
        "parallel.outer_lr": 0.7,
        "parallel.outer_momentum": 0.9,
    }
    result = train(2, args, timeout=180)
    assert result.returncode == 0, result
    return run_dir, args


def dp_copies(folder) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{parameter: (dp rank 0's, dp rank 1's)} of a dp-2 local SGD checkpoint."""
    from hpcllm.checkpoint import TensorFiles, read_meta

    meta = read_meta(folder)
    files, tensors = TensorFiles(folder), meta["tensors"]
    return {
        key[len("model/") :]: (files.read(key, e), files.read(f"dp1/{key}", tensors[f"dp1/{key}"]))
        for key, e in tensors.items()
        if key.startswith("model/")
    }


def test_diloco_trains_and_the_dp_models_agree_only_at_averages(diloco_run):
    run_dir, _ = diloco_run
    records, val = read_metrics(run_dir)
    assert records[-1]["loss"] < records[0]["loss"] - 0.1 and math.isfinite(val[0]["val_loss"])
    assert [r["synced"] for r in records] == [r["step"] % H == 0 for r in records]
    # Averaging bytes only at averages: a dp-2 ring all-reduce sends the fp32 model once.
    numel = sum(a.numel() for a, _ in dp_copies(run_dir / "checkpoints/step_000020").values())
    assert {r["sync_bytes_per_step"] for r in records} == {0, 4 * numel}
    ckpts = run_dir / "checkpoints"
    between, after = dp_copies(ckpts / "step_000010"), dp_copies(ckpts / "step_000020")
    assert all(torch.equal(a, b) for a, b in after.values())
    assert all(not torch.equal(a, b) for a, b in between.values())
    meta = json.loads((ckpts / "step_000010" / "meta.json").read_text())
    assert meta["local_sgd"] == {"sync_every": H, "replicas_equal": False}
    assert any(k.startswith("outer/") and k.endswith("/momentum") for k in meta["tensors"])


def test_resume_between_averages_continues_exactly_and_refuses_another_dp(diloco_run, tmp_path):
    ref_dir, args = diloco_run
    run_dir = tmp_path / "resumed"
    shutil.copytree(ref_dir, run_dir)
    (run_dir / "metrics.jsonl").unlink()
    shutil.rmtree(run_dir / "checkpoints" / "step_000020")

    refused = refusal({**args, "run.dir": run_dir})  # one rank, in this process
    assert "is at step 10, between two model averages" in refused, refused
    assert "parallel.dp 2" in refused, refused

    result = train(2, {**args, "run.dir": run_dir}, timeout=180)
    assert result.returncode == 0, result
    assert "at step 10" in result.stdout, result
    ref, got = losses(ref_dir), losses(run_dir)
    assert sorted(got) == list(range(11, STEPS + 1))
    assert all(got[s] == ref[s] for s in got), [(s, got[s], ref[s]) for s in got]


def test_pp2_dp2_with_grad_accum_averages_each_stage(data_dir, tmp_path):
    run_dir = tmp_path / "pp2"
    args = {
        "data.path": data_dir,
        "run.dir": run_dir,
        "train.max_steps": 6,
        "train.grad_accum_steps": 2,
        "parallel.pp": 2,
        "parallel.sync_every": 2,
    }
    result = train(4, args, timeout=240)
    assert result.returncode == 0, result
    records, _ = read_metrics(run_dir)
    assert [r["synced"] for r in records] == [False, True] * 3
    assert all(math.isfinite(r["loss"]) for r in records)
    copies = dp_copies(run_dir / "checkpoints" / "step_000006")
    # Both stages' parameters are there, and each dp pair agrees after the last average.
    assert any(n.startswith("blocks.0") for n in copies) and any(
        n.startswith("lm_head") for n in copies
    )
    assert all(torch.equal(a, b) for a, b in copies.values())
