"""What a resume must refuse rather than continue silently: another tokenizer behind the same
data.path, and a fresh run (checkpoint.resume false) among another run's checkpoints."""

from __future__ import annotations

import shutil

from hpcllm import checkpoint

from helpers import TINY, prepare_data, train, write_corpus


def bpe_data(folder, seed_words: int):
    from hpcllm.data.prepare import prepare

    corpus = write_corpus(folder.parent / f"{folder.name}-corpus", words_per_doc=seed_words)
    prepare([str(corpus)], str(folder), tokenizer="bpe", vocab_size=300, val_fraction=0.1)
    return folder


def test_resume_refuses_data_reprepared_with_another_tokenizer(tmp_path):
    data, run_dir = tmp_path / "shards", tmp_path / "run"
    bpe_data(data, 2000)
    settings = {**TINY, "data.path": data, "run.dir": run_dir, "train.max_steps": 2}
    first = train(None, settings)
    assert first.returncode == 0, first
    # The same folder prepared again from other text: a tokenizer of the same size, other merges.
    shutil.rmtree(data)
    other = write_corpus(tmp_path / "other-corpus", num_docs=3, words_per_doc=2500)
    (other / "doc0.txt").write_text("zebra quartz jukebox " * 900)
    from hpcllm.data.prepare import prepare

    prepare([str(other)], str(data), tokenizer="bpe", vocab_size=300, val_fraction=0.1)
    again = train(None, {**settings, "train.max_steps": 4})
    assert again.returncode == 2, again
    assert "was trained with another tokenizer" in again.stderr, again
    assert "Traceback" not in again.stderr and "step 3" not in again.stdout, again


def test_a_fresh_run_among_another_runs_checkpoints_is_refused(tmp_path):
    data, run_dir = prepare_data(tmp_path / "shards"), tmp_path / "run"
    settings = {**TINY, "data.path": data, "run.dir": run_dir, "checkpoint.every": 2}
    first = train(None, {**settings, "train.max_steps": 6})
    assert first.returncode == 0, first
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    fresh = train(None, {**settings, "train.max_steps": 3, "checkpoint.resume": False})
    assert fresh.returncode == 2, fresh
    assert "checkpoint.resume is false, but run.dir" in fresh.stderr, fresh
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # untouched
    assert checkpoint.find_latest(str(run_dir))[0].name == "step_000006"
