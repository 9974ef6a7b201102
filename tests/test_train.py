"""Training end to end: data parallelism against one rank, resume, failures, bad inputs, sampling.

Most tests run `python -m hpcllm.train` as a subprocess (under `mpirun -np N`, or plain
`python` where one rank will do) on a tiny byte-level corpus, and read metrics.jsonl.
Every subprocess has a timeout and is killed with its whole process group, so a hung
rank fails the test instead of hanging the suite.
"""

import json
import math
import shutil
import sys
from contextlib import nullcontext

import pytest
import torch

from hpcllm.config import Config, load_toml
from hpcllm.models.gpt import GPT, ModelConfig
from hpcllm.training import mfu

from helpers import losses, prepare_data, read_metrics, refusal, run, train

STEPS = 20


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("train-data") / "shards")


def settings(data_dir, run_dir, more: dict | None = None) -> dict:
    """Overrides of helpers.TINY for a 20-step run with checkpoints every 10 steps."""
    return {
        "data.path": data_dir,
        "run.dir": run_dir,
        "train.max_steps": STEPS,
        "checkpoint.every": 10,
        **(more or {}),
    }


@pytest.fixture(scope="session")
def dp2_run(data_dir, tmp_path_factory):
    """The reference run: 2 ranks, dp=2, no accumulation, 20 steps, checkpoints at 10 and 20."""
    run_dir = tmp_path_factory.mktemp("dp2") / "run"
    args = settings(
        data_dir, run_dir, {"parallel.dp": 2, "train.grad_accum_steps": 1, "run.sample_tokens": 10}
    )
    result = train(2, args, timeout=180)
    assert result.returncode == 0, result
    return run_dir, args, result


# ----------------------------------------------------------------- gradients, in process


@pytest.mark.numerics
@pytest.mark.mpi(ranks=2, timeout=120)
def test_dp2_gradient_equals_one_rank_on_the_concatenated_batch(comm):
    from hpcllm.distributed.comm import TensorComm
    from hpcllm.distributed.data_parallel import DataParallel
    from hpcllm.distributed.pipeline import PipelineStage, Schedule
    from hpcllm.distributed.steps import clip_grad_norm, train_step
    from hpcllm.distributed.topology import Grid
    from hpcllm.models.gpt import GPT, ModelConfig, cross_entropy, param_groups

    cfg = ModelConfig(vocab_size=61, block_size=32, n_layer=2, n_head=2, d_model=32)
    grid = Grid.build(comm)
    assert grid.dims == {"pp": 1, "dp": 2, "tp": 1}
    model, reference = GPT(cfg, init_seed=5), GPT(cfg, init_seed=5)
    ddp = DataParallel(model, TensorComm(grid.comm("dp")), bucket_mb=0.01)  # several buckets
    # SGD, not AdamW: Adam's first step divides by |g|, so a 1e-9 gradient difference in a
    # near-zero entry would become a visible weight difference and hide what is compared here.
    optimizer = torch.optim.SGD(param_groups(model, 0.1), lr=0.5, momentum=0.9)
    ref_optimizer = torch.optim.SGD(param_groups(reference, 0.1), lr=0.5, momentum=0.9)
    pp_comm = TensorComm(grid.comm("pp"), name="pp")
    model_comms = [pp_comm]

    # Each step: a global batch of 4 sequences, the same on every rank; rank r trains on rows 2r, 2r+1.
    for step, accum in enumerate([1, 2, 1]):
        g = torch.Generator().manual_seed(100 + step)
        tokens = torch.randint(0, cfg.vocab_size, (4, cfg.block_size + 1), generator=g)
        x, y = tokens[:, :-1], tokens[:, 1:]
        mine = slice(2 * comm.rank, 2 * comm.rank + 2)
        # With accumulation, the rank's two rows go through as two micro-batches of one.
        micro = (
            [(x[mine], y[mine])]
            if accum == 1
            else [(x[mine][i : i + 1], y[mine][i : i + 1]) for i in range(2)]
        )
        # The training loop's own step: one pipeline stage holding the whole model.
        act_shape = (len(micro[0][0]), cfg.block_size, cfg.d_model)
        stage = PipelineStage(
            model, pp_comm, stage=0, num_stages=1, act_shape=act_shape, device=torch.device("cpu")
        )
        loss_sum = train_step(Schedule(stage, "1f1b"), ddp, micro, nullcontext())
        norm = clip_grad_norm(model, 0.0, model_comms)  # 0: measure, do not clip

        ref_optimizer.zero_grad(set_to_none=True)
        ref_loss = cross_entropy(reference(x), y)
        ref_loss.backward()
        ref_norm = torch.cat([p.grad.reshape(-1) for p in reference.parameters()]).norm().item()

        total = TensorComm(comm).allreduce_(loss_sum.reshape(1).clone()).item() / (2 * accum)
        assert total == pytest.approx(ref_loss.item(), rel=1e-6, abs=1e-7), step
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(
                p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=f"step {step} {name}"
            )
        assert norm == pytest.approx(ref_norm, rel=1e-5), step
        assert norm > 0

        optimizer.step()
        ref_optimizer.step()
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"after step {step}: {name}")
    grid.free()


# ----------------------------------------------------------------- end-to-end runs


def test_reference_run_writes_metrics_config_checkpoints_and_sample(dp2_run):
    run_dir, _args, result = dp2_run
    train_records, val_records = read_metrics(run_dir)
    assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train_records)
    # MFU from the probed CPU peak; the loader (prefetching) and fixed costs as step shares.
    assert all(0 < r["mfu"] < 1 for r in train_records)
    for key in ("loader_frac", "fixed_frac", "comm_wait_frac"):
        assert all(0 <= r[key] < 1 for r in train_records), key
    # 20 steps of a tiny model on repetitive text: the loss must go down from ln(257).
    assert train_records[0]["loss"] == pytest.approx(math.log(257), abs=0.2)
    assert train_records[-1]["loss"] < train_records[0]["loss"] - 0.1
    assert [r["step"] for r in val_records] == [STEPS] and math.isfinite(val_records[0]["val_loss"])
    # parallel.overlap auto (the default) timed both schedules and says which it kept.
    assert result.stdout.count("parallel.overlap auto: ") == 1, result

    saved = load_toml_file(run_dir / "config.toml")
    assert saved.train.max_steps == STEPS and saved.parallel.dp == 2
    assert (
        saved.model.vocab_size == 257 and saved.model.block_size == 32
    )  # resolved from data and seq_len

    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000010", "step_000020"]
    assert (ckpts / "latest").read_text().strip() == "step_000020"
    meta = json.loads((ckpts / "step_000020" / "meta.json").read_text())
    assert (
        meta["step"] == STEPS
        and meta["world_size"] == 2
        and meta["grid"] == {"pp": 1, "dp": 2, "tp": 1}
    )
    assert meta["loader"]["consumed_samples"] == STEPS * 2 * 2  # steps x micro_batch x dp
    # parallel.sync_every 1 (the default) averages gradients: no local SGD state or metrics.
    assert "local_sgd" not in meta and not any(
        k.startswith(("dp1/", "outer/")) for k in meta["tensors"]
    )
    assert not any("synced" in r for r in train_records)
    assert "world 2 = pp 1 x dp 2 x tp 1" in result.stdout
    assert "\nsample:\n" in result.stdout


def load_toml_file(path):
    cfg = Config()
    load_toml(cfg, str(path))
    return cfg


def test_dp2_equals_dp1_with_grad_accum_2(dp2_run, data_dir, tmp_path):
    """Same micro-batch, same global batch: the same samples and the same averaged gradient."""
    ref_dir, _, _ = dp2_run
    run_dir = tmp_path / "dp1"
    result = train(
        None,
        settings(
            data_dir,
            run_dir,
            {
                "parallel.dp": 1,
                "train.grad_accum_steps": 2,
                "checkpoint.every": 0,
                "train.peak_tflops": 0.5,
            },
        ),
        timeout=120,
    )
    assert result.returncode == 0, result
    assert "world 1 = pp 1 x dp 1 x tp 1" in result.stdout
    # train.peak_tflops sets the peak: MFU = tokens/s x FLOPs per token / 0.5 TFLOP/s.
    cfg = ModelConfig(vocab_size=257, block_size=32, n_layer=2, n_head=2, d_model=32)
    flops = mfu.flops_per_token(mfu.matmul_weights(GPT(cfg)), n_layer=2, d_model=32, seq_len=32)
    for r in read_metrics(run_dir)[0]:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / 0.5e12, rel=1e-9)
    ref, got = losses(ref_dir), losses(run_dir)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), (step, got[step], ref[step])
    # Not trivially equal: the loss moved during the run.
    assert abs(ref[STEPS] - ref[1]) > 0.1


def test_resume_continues_the_uninterrupted_run_exactly(dp2_run, tmp_path):
    """Restart from the step-10 checkpoint of the reference run, as if a crash hit the step-20 save."""
    ref_dir, args, _ = dp2_run
    run_dir = tmp_path / "resumed"
    shutil.copytree(ref_dir, run_dir)
    (run_dir / "metrics.jsonl").unlink()
    # The step-20 save was interrupted: its folder is still the temporary one and has no meta.json.
    ckpts = run_dir / "checkpoints"
    (ckpts / "step_000020").rename(ckpts / ".tmp-step_000020")
    (ckpts / ".tmp-step_000020" / "meta.json").unlink()

    result = train(2, {**args, "run.dir": run_dir}, timeout=180)
    assert result.returncode == 0, result
    assert f"resumed from {ckpts / 'step_000010'} at step 10" in result.stdout, result
    assert (
        "warning: ignoring incomplete checkpoint" in result.stdout
        and ".tmp-step_000020" in result.stdout
    )

    ref, got = losses(ref_dir), losses(run_dir)
    assert sorted(got) == list(range(11, STEPS + 1)), "training must restart at step 11"
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=0), (step, got[step], ref[step])
    assert read_metrics(run_dir)[1][0]["val_loss"] == pytest.approx(
        read_metrics(ref_dir)[1][0]["val_loss"], rel=1e-6
    )
    assert (ckpts / "step_000020" / "meta.json").is_file() and not (
        ckpts / ".tmp-step_000020"
    ).exists()


def test_one_failing_rank_ends_the_job(data_dir, tmp_path):
    run_dir = tmp_path / "fail"
    result = train(
        2,
        # Rank 0's communication thread is waiting for rank 1 in a reduction when it aborts.
        settings(
            data_dir,
            run_dir,
            {"train.max_steps": 200, "parallel.overlap": "on", "parallel.comm_thread": True},
        ),
        timeout=90,
        faults={"FAIL_AT_STEP": 3, "FAIL_RANK": 1},
    )
    assert result.returncode != 0, result
    # Startup (~5-10 s) plus the abort; a hang would run into the 90 s timeout instead.
    assert result.wall < 40, result
    assert "rank 1/2" in result.stderr and "injected failure at step 3" in result.stderr, result
    assert "mpi_abort" in result.stderr.lower(), result  # hpcllm's or Open MPI's own notice
    # Rank 0 could not finish step 3 without rank 1.
    assert max(losses(run_dir)) <= 2


# ----------------------------------------------------------------- bad inputs
# Settings, config files and keys are config.parse_args's (tests/test_config.py); these are
# found once the run folder is taken, by hpcllm.train's start-up in this process.

BAD_INPUTS = {
    # name: (a function of (data_dir, tmp_path) giving extra settings, texts the error holds)
    "truncated shard": (
        lambda d, t: {"data.path": truncated_copy(d, t)},
        ["train-0000-0000.h5", "truncated"],
    ),
    "shard vocab too large": (
        lambda d, t: {"model.vocab_size": 100},
        ["train-0000-0000.h5", "vocab_size 257", "model.vocab_size 100"],
    ),
}


def truncated_copy(data_dir, tmp_path):
    copy = tmp_path / "truncated"
    shutil.copytree(data_dir, copy)
    shard = copy / "train-0000-0000.h5"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    return copy


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_naming_the_file_or_key(case, data_dir, tmp_path):
    extra, expected = BAD_INPUTS[case]
    message = refusal(settings(data_dir, tmp_path / "run", extra(data_dir, tmp_path)))
    for text in expected:
        assert text in message, (text, message)


# The CLI contract, in real processes (every other refusal is tested in process): a job
# refused at start-up exits 2 on every rank with one "error: " line and no traceback, and
# leaves no run folder behind.


def test_cli_refused_job_exits_2_with_one_line_and_writes_nothing(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    # Found after the run folder is taken (data is opened in setup): the folder goes again.
    result = train(None, settings(data_dir, run_dir, {"data.path": tmp_path / "no-such-data"}))
    assert result.returncode == 2, result
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result
    assert "no-such-data" in result.stderr and "does not exist" in result.stderr, result
    assert not run_dir.exists(), result


def test_cli_layout_that_does_not_fit_the_world_fails_every_rank(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = train(2, settings(data_dir, run_dir, {"parallel.dp": 3}), timeout=90)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result
    # Both ranks agree, so the message is printed once, without a rank prefix.
    assert result.stderr.count("error: ") == 1, result
    for text in ("pp=1", "dp=3", "tp=1", "3 ranks", "world has 2"):
        assert text in result.stderr, (text, result)
    assert not run_dir.exists(), result


# ----------------------------------------------------------------- generation and scale


def test_generate_from_a_run(dp2_run, tmp_path):
    run_dir, _, _ = dp2_run
    result = run(
        [
            sys.executable,
            "-m",
            "hpcllm.generate",
            "--run-dir",
            str(run_dir),
            "--tokens",
            "20",
            "--prompt",
            "def ",
        ],
        timeout=60,
    )
    assert result.returncode == 0, result
    assert result.stdout.startswith("def ") and len(result.stdout.rstrip("\n")) > len("def "), (
        result
    )
    assert "step_000020 (step 20)" in result.stderr, result

    result = run(
        [sys.executable, "-m", "hpcllm.generate", "--run-dir", str(tmp_path / "empty")], timeout=60
    )
    assert result.returncode == 2 and "no complete checkpoint under" in result.stderr, result


@pytest.mark.slow
def test_16_ranks_smoke(data_dir, tmp_path):
    run_dir = tmp_path / "np16"
    result = train(
        16,
        settings(
            data_dir,
            run_dir,
            {"train.max_steps": 3, "train.eval_batches": 1, "checkpoint.every": 0},
        ),
        timeout=300,
    )
    assert result.returncode == 0, result
    assert "world 16 = pp 1 x dp 16 x tp 1" in result.stdout
    got = losses(run_dir)
    assert sorted(got) == [1, 2, 3] and all(math.isfinite(v) for v in got.values())
    meta = json.loads((run_dir / "checkpoints" / "step_000003" / "meta.json").read_text())
    assert meta["world_size"] == 16 and meta["loader"]["consumed_samples"] == 3 * 16 * 2


def test_the_recorded_data_path_is_absolute(tmp_path, monkeypatch):
    """config.toml and checkpoints record data.path absolute, so generate and export find the
    data from any folder, whatever folder the job ran in."""
    from mpi4py import MPI

    from hpcllm.config import Config
    from hpcllm.training.trainer import resolve_data

    prepare_data(tmp_path / "shards")
    monkeypatch.chdir(tmp_path)
    cfg = Config()
    cfg.data.path = "shards"
    resolve_data(cfg, MPI.COMM_SELF)
    assert cfg.data.path == str(tmp_path / "shards")
