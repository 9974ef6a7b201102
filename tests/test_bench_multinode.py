"""The multi-node benchmark's bookkeeping (hpcllm.bench.multinode), without hosts or MPI jobs:
variants from the command line, and what it reads from a run's metrics.jsonl."""

import json

import pytest

from hpcllm.bench.multinode import parse_variant, summarise, time_to_loss


def test_variants_are_plain_overrides():
    assert parse_variant("bf16=--parallel.grad_compression=bf16") == (
        "bf16",
        ["--parallel.grad_compression=bf16"],
    )
    assert parse_variant("b1=--parallel.bucket_mb 1 --parallel.allreduce=flat") == (
        "b1",
        ["--parallel.bucket_mb", "1", "--parallel.allreduce=flat"],
    )
    assert parse_variant("none=") == ("none", [])
    with pytest.raises(ValueError, match="NAME=OVERRIDES"):
        parse_variant("--parallel.allreduce=flat")


def test_summary_of_metrics_and_time_to_the_baseline_loss(tmp_path):
    records = [
        {"step": 1, "loss": 5.0, "ms_per_step": 900.0},  # the first step warms up
        {"step": 3, "loss": 4.0, "ms_per_step": 100.0, "grad_wire_bytes": 2048},  # 2 steps
        {"step": 3, "val_loss": 4.5},
        {"step": 4, "loss": 3.0, "ms_per_step": 300.0, "grad_wire_bytes": 4096},
        {"step": 4, "val_loss": 3.5},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    got = summarise(path)
    assert got["median_ms_per_step"] == 200.0
    assert got["logged_wire_bytes_per_step"] == 3072
    assert got["steps"] == 4 and got["train_s"] == pytest.approx(1.4)
    assert got["vals"] == [(3, 4.5, pytest.approx(1.1)), (4, 3.5, pytest.approx(1.4))]
    assert got["final_val_loss"] == 3.5
    assert time_to_loss(got["vals"], 4.5) == pytest.approx(1.1)
    assert time_to_loss(got["vals"], 4.0) == pytest.approx(1.4)
    assert time_to_loss(got["vals"], 3.0) is None
