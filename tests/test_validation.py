"""Inputs that cannot be right stop the job with a message naming the key, file or option:
damaged or mismatched shards at start-up (in process, through hpcllm.train's own start-up:
helpers.refusal), a bad token id met in the middle of training (every rank ends, one line
each)."""

import shutil
import sys

import h5py
import numpy as np
import pytest

from hpcllm import generate
from hpcllm.data.shards import write_shard

from helpers import prepare_data, refusal, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("validation-data") / "shards")


def copy_with(data_dir, tmp_path, change) -> str:
    """A copy of the shards with `change(folder)` applied."""
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    change(copy)
    return str(copy)


def bpe_val_split(folder):
    (val,) = folder.glob("val-*.h5")
    write_shard(val, np.arange(299), vocab_size=300, tokenizer="bpe", eot_id=299)


def float_tokens(folder):
    (shard,) = folder.glob("train-*.h5")
    with h5py.File(shard, "r+") as f:
        tokens = f["tokens"][:].astype(np.float32)
        del f["tokens"]
        f.create_dataset("tokens", data=tokens)


def byte_vocab_300(folder):
    for shard in folder.glob("*.h5"):
        with h5py.File(shard, "r+") as f:
            f.attrs["vocab_size"] = 300


# Settings out of range are config.validate's (tests/test_config.py); these are the shards'.
STARTUP_ERRORS = {
    # name: (a function of the shard folder to apply to a copy, texts the error must hold)
    "val split of another tokenizer": (bpe_val_split, ["val-0000-0000.h5", "tokenizer 'bpe'"]),
    "float tokens": (float_tokens, ["train-0000-0000.h5", "dtype float32"]),
    "byte shards with vocab 300": (byte_vocab_300, ["vocab_size 300", "vocab_size 257"]),
}


@pytest.mark.parametrize("case", list(STARTUP_ERRORS))
def test_damaged_shards_are_refused_before_training(case, data_dir, tmp_path):
    change, expected = STARTUP_ERRORS[case]
    path = copy_with(data_dir, tmp_path, change)
    message = refusal({"data.path": path, "run.dir": tmp_path / "run", "train.max_steps": 5})
    for text in expected:
        assert text in message, (text, message)


def test_bad_token_id_mid_training_ends_every_rank_with_one_line(data_dir, tmp_path):
    def damage(folder):
        # The second half of the train shard holds an id beyond the byte vocabulary (257),
        # so some early step of some rank reads one; the val shard is clean, so start-up passes.
        (shard,) = folder.glob("train-*.h5")
        with h5py.File(shard, "r+") as f:
            f["tokens"][len(f["tokens"]) // 2 :] = 300

    path = copy_with(data_dir, tmp_path, damage)
    result = train(
        2,
        {"data.path": path, "run.dir": tmp_path / "run", "train.max_steps": 50},
        timeout=120,
    )
    assert result.returncode != 0, result
    assert result.wall < 60, result  # the failing rank aborts the other, nobody waits
    assert "Traceback" not in result.stderr and "IndexError" not in result.stderr, result
    failed = [line for line in result.stderr.splitlines() if "failed: DataError" in line]
    assert failed and "train-0000-0000.h5: token id 300 at token offset" in failed[0], result
    assert "is outside the vocabulary [0, 257)" in failed[0], result


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tokens", "0"], "--tokens = 0 is out of range: it must be >= 1"),
        (["--temperature", "0"], "--temperature = 0.0 is out of range: it must be > 0"),
        (["--temperature", "nan"], "--temperature = nan is out of range"),
        (["--top-k", "-1"], "--top-k = -1 is out of range: it must be >= 0"),
        (["--num-samples", "0"], "--num-samples = 0 is out of range: it must be >= 1"),
        (["--prompt", ""], "--prompt is empty"),
    ],
)
def test_generate_options(args, message, tmp_path, capsys):
    # Checked before the checkpoint is looked for: the run folder need not exist.
    assert generate.main(["--run-dir", str(tmp_path / "none"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_generate_options_in_range_pass_the_check(tmp_path, capsys):
    args = ["--tokens", "1", "--temperature", "2", "--top-k", "0", "--prompt", " "]
    assert generate.main(["--run-dir", str(tmp_path / "none"), *args]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err  # got past the option checks


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
