"""`python -m hpcllm.plot`: metrics.jsonl to a PNG of the loss curves."""

import json

import pytest

from hpcllm.plot import main, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, scale=1.0, bpb=True):
    run_dir.mkdir()
    lines = []
    for step in range(10, 110, 10):
        lines.append({"step": step, "loss": scale * (5 - step / 50), "tokens": step * 512})
        if step % 50 == 0:
            val = {"step": step, "val_loss": scale * (5.1 - step / 50), "tokens": step * 512}
            if bpb:
                val["val_bpb"] = 1.5 * val["val_loss"]
            lines.append(val)
    text = "".join(json.dumps(r) + "\n" for r in lines)
    (run_dir / "metrics.jsonl").write_text(text + '{"step": 11')  # cut short by a crash
    return run_dir


def test_read_metrics_keeps_each_kind_by_step(tmp_path):
    run = read_metrics(write_run(tmp_path / "a"))
    assert sorted(run.train) == list(range(10, 110, 10))
    assert run.val == {50: pytest.approx(4.1), 100: pytest.approx(3.1)}
    assert run.val_bpb[100] == pytest.approx(1.5 * 3.1)
    assert run.tokens_per_step() == 512


def test_one_run_writes_loss_png_in_its_folder(tmp_path, capsys):
    run_dir = write_run(tmp_path / "a")
    assert main([str(run_dir)]) == 0
    png = run_dir / "loss.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert png.stat().st_size > 10_000  # axes, two curves and labels, not an empty canvas
    assert str(png) in capsys.readouterr().out


def test_several_runs_overlay_into_out(tmp_path):
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b", scale=1.2, bpb=False)
    out = tmp_path / "cmp.png"
    assert main([str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob(".*.tmp.png"))


def test_out_naming_a_folder_writes_loss_png_into_it(tmp_path, capsys):
    run_dir, folder = write_run(tmp_path / "a"), tmp_path / "pictures"
    folder.mkdir()
    assert main([str(run_dir), "--out", str(folder)]) == 0
    assert (folder / "loss.png").read_bytes()[:8] == PNG_MAGIC
    assert main([str(run_dir), "--out", str(tmp_path / "no" / "such" / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("error: cannot write ")


def test_missing_or_empty_metrics_exit_2_naming_the_folder(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "nope/metrics.jsonl does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert main([str(tmp_path / "empty")]) == 2
    assert "no loss records" in capsys.readouterr().err


def test_a_run_writes_bits_per_byte_tokens_and_loss_png(tmp_path):
    import math

    from helpers import TINY, prepare_data, read_metrics, train

    data = prepare_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    settings = {**TINY, "data.path": data, "run.dir": run_dir, "train.max_steps": 6}
    result = train(None, {**settings, "train.eval_every": 3}, timeout=120)
    assert result.returncode == 0, result
    assert "bits/byte" in result.stdout
    records, vals = read_metrics(run_dir)
    tokens_per_step = TINY["train.micro_batch_size"] * TINY["train.seq_len"]
    assert [r["tokens"] for r in records] == [s * tokens_per_step for s in range(1, 7)]
    assert [v["step"] for v in vals] == [3, 6]
    for v in vals:
        # Byte tokens are one byte each, the end-of-text ones none: a little above nats / ln 2.
        bits_per_token = v["val_loss"] / math.log(2)
        assert bits_per_token <= v["val_bpb"] < 1.05 * bits_per_token
    assert (run_dir / "loss.png").read_bytes()[:8] == PNG_MAGIC
