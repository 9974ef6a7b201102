"""Single-process tests of hpcllm.data: tokenizers, the shard format, prepare, and the loader."""

import json
import os
import random
import re
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from hpcllm.data.loader import Loader, step_positions, val_batches
from hpcllm.data.prepare import (
    BINARY,
    LINK_FOLDER,
    LINK_OUTSIDE,
    NOT_TEXT_NAME,
    PIECE_CHARS,
    SKIP_DIRS,
    SPECIAL,
    UNREADABLE,
    _text_pieces,
    default_corpus_files,
    prepare,
)
from hpcllm.data.shards import DataError, open_shards, open_splits, write_shard
from hpcllm.data.tokenizer import (
    MAX_PRETOKEN_BYTES,
    BPETokenizer,
    ByteTokenizer,
    load_tokenizer,
)

TEXT = "def héllo():\n    return 'wörld ✓'  # <|endoftext|> stays text\n"


def write_unique_shards(data_dir, sizes, split="train"):
    """Shards whose tokens are 0, 1, 2, ... across all files, so a sample's first token names it."""
    os.makedirs(data_dir, exist_ok=True)
    start = 0
    for i, n in enumerate(sizes):
        write_shard(
            os.path.join(data_dir, f"{split}-{i:04d}.h5"),
            np.arange(start, start + n),
            vocab_size=100_000,
            tokenizer="bpe",
            eot_id=99_999,
        )
        start += n


def sample_ids(x: torch.Tensor, first_token_to_index: dict) -> list[int]:
    return [first_token_to_index[int(t)] for t in x[:, 0]]


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int64 and list(ids) == list(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    assert tok.decode([*list(ids), tok.eot_id]) == TEXT  # EOT is dropped
    assert tok.decode(torch.tensor(tok.encode("é")[:1])) == "\ufffd"  # cut character -> replacement


def test_bpe_train_save_load_round_trip(tmp_path):
    corpus = [TEXT * 3, "import os\nimport sys\n" * 20, "for i in range(10):\n    print(i)\n" * 10]
    tok = BPETokenizer.train(corpus, vocab_size=300)
    assert tok.name == "bpe" and 257 < tok.vocab_size <= 300
    assert tok._tokenizer.id_to_token(tok.eot_id) == "<|endoftext|>"
    ids = tok.encode(TEXT)
    assert tok.eot_id not in ids  # the literal marker in the text is not the EOT token
    assert len(ids) < len(TEXT.encode("utf-8"))  # merges were learned and used
    assert tok.decode(ids) == TEXT
    tok.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path, "bpe")
    assert (loaded.vocab_size, loaded.eot_id) == (tok.vocab_size, tok.eot_id)
    assert np.array_equal(loaded.encode(TEXT), ids) and loaded.decode(ids) == TEXT
    with pytest.raises(ValueError, match=r"at least 257"):
        BPETokenizer.train(corpus, vocab_size=100)


def test_load_tokenizer_errors(tmp_path):
    assert isinstance(load_tokenizer(tmp_path, "byte"), ByteTokenizer)
    with pytest.raises(DataError, match=r"tokenizer.json is missing"):
        load_tokenizer(tmp_path, "bpe")
    with pytest.raises(DataError, match=r"unknown tokenizer 'gpt9'"):
        load_tokenizer(tmp_path, "gpt9")


def _damage_ids(d):
    d["model"]["vocab"][next(iter(d["model"]["vocab"]))] = 99_999


def _rename_eot(d):
    d["added_tokens"][0]["content"] = "<|end|>"
    d["model"]["vocab"]["<|end|>"] = d["model"]["vocab"].pop("<|endoftext|>")


@pytest.mark.parametrize(
    "damage, message",
    [
        (b"", r"is not a tokenizer \(EOF while parsing"),
        (b"\xff\xfe", r"is not a tokenizer"),
        (b"[1, 2]", r"is not a tokenizer \(invalid type: sequence"),
        (b'{"added_tokens": []}', r"is not a tokenizer \(Model missing"),
        (lambda d: d["model"].update(type="WordLevel"), r"not a tokenizer|holds a WordLevel model"),
        (
            _damage_ids,
            r"has 2\d\d tokens with ids from \d to 99999 .* ids must be 0..2\d\d, each once",
        ),
        (_rename_eot, r"has no <\|endoftext\|> token"),
        (None, r"is a FIFO, not a regular file"),
    ],
)
def test_damaged_tokenizer_json_is_named(tmp_path, damage, message):
    tokens = np.arange(100, dtype=np.uint16)
    write_tokens(tmp_path / "train-0000.h5", tokens)
    write_tokens(tmp_path / "val-0000.h5", tokens)
    path = tmp_path / "tokenizer.json"
    if damage is None:
        os.mkfifo(path)  # loading used to wait forever for a writer
    elif isinstance(damage, bytes):
        path.write_bytes(damage)
    else:
        BPETokenizer.train(["abc abd " * 50], vocab_size=300).save(path)
        saved = json.loads(path.read_text())
        damage(saved)
        path.write_text(json.dumps(saved))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} .*{message}.*prepare"):
        open_splits(tmp_path)


def test_bpe_on_a_long_run_without_whitespace_is_fast():
    # One 400 KB "word" (think DNA or base64) used to be one pre-token, which BPE training
    # rescans for every merge: minutes. Pre-tokens are now capped, so time is linear.
    dna = "".join(random.Random(0).choice("ACGT") for _ in range(400_000))
    start = time.perf_counter()
    tok = BPETokenizer.train([dna], vocab_size=1024)
    ids = tok.encode(dna)
    assert time.perf_counter() - start < 60  # about 1 s here; quadratic took over a minute
    assert tok.decode(ids) == dna and len(ids) < len(dna) / 3
    pieces = tok._tokenizer.pre_tokenizer.pre_tokenize_str(dna[:1000])
    assert {len(p) for p, _ in pieces} == {MAX_PRETOKEN_BYTES, 1000 % MAX_PRETOKEN_BYTES}
    longest = max(len(t.encode()) for t in tok._tokenizer.get_vocab())
    assert longest <= MAX_PRETOKEN_BYTES


# ---------------------------------------------------------------- shards


def test_shard_round_trip_and_sample_layout(tmp_path):
    # 8k+1 tokens hold k samples of seq_len 8; shards of 0 and 1 tokens hold none.
    sizes = [8 * 5 + 1, 1, 0, 8 * 3 + 7, 8 * 2 + 1]
    write_unique_shards(tmp_path, sizes)
    assert not list(tmp_path.glob("*.tmp"))
    with open_shards(tmp_path, "train") as shards:
        assert [os.path.basename(p) for p in shards.paths] == [
            f"train-{i:04d}.h5" for i in range(5)
        ]
        assert (shards.vocab_size, shards.tokenizer, shards.eot_id) == (100_000, "bpe", 99_999)
        assert shards.num_tokens == sum(sizes)
        assert shards.num_samples(8) == 5 + 3 + 2
        assert shards.num_samples(1) == sum(max(n - 1, 0) for n in sizes)
        starts = [0, 8, 16, 24, 32, 42, 50, 58, 73, 81]  # shards start at tokens 0, 41, 42, 42, 73
        for index, start in enumerate(starts):
            sample = shards.read_sample(index, 8)
            assert sample.dtype == np.int64 and list(sample) == list(range(start, start + 9))
        with pytest.raises(IndexError):
            shards.read_sample(10, 8)
        with pytest.raises(DataError, match=r"too few for one sample of seq_len 100"):
            shards.num_samples(100)


@pytest.mark.parametrize(
    "vocab_size, dtype", [(257, np.uint16), (65536, np.uint16), (65537, np.uint32)]
)
def test_shard_dtype_follows_vocab(tmp_path, vocab_size, dtype):
    tokens = np.array([0, 1, vocab_size - 1])
    write_shard(
        tmp_path / "train-0000.h5", tokens, vocab_size=vocab_size, tokenizer="bpe", eot_id=0
    )
    with h5py.File(tmp_path / "train-0000.h5", "r") as f:
        assert f["tokens"].dtype == dtype and list(f["tokens"][:]) == list(tokens)
        assert f.attrs["format"] == "hpcllm-tokens" and f.attrs["format_version"] == 1
    with pytest.raises(ValueError, match=r"\[0, 257\)"):
        write_shard(
            tmp_path / "bad.h5", np.array([257]), vocab_size=257, tokenizer="byte", eot_id=256
        )


def test_open_shards_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing.*does not exist.*hpcllm.data.prepare"):
        open_shards(tmp_path / "missing", "train")
    write_unique_shards(tmp_path, [50], split="val")
    with pytest.raises(DataError, match=r"no train shards"):
        open_shards(tmp_path, "train")

    write_unique_shards(tmp_path, [100, 100])
    with h5py.File(tmp_path / "train-0001.h5", "r+") as f:
        f.attrs["num_tokens"] = 150
    with pytest.raises(DataError, match=r"train-0001.h5 is truncated"):
        open_shards(tmp_path, "train")

    write_unique_shards(tmp_path, [100, 100])
    write_shard(
        tmp_path / "train-0001.h5", np.arange(10), vocab_size=300, tokenizer="bpe", eot_id=299
    )
    with pytest.raises(DataError, match=r"vocab_size.*train-0000.h5.*train-0001.h5"):
        open_shards(tmp_path, "train")

    write_unique_shards(tmp_path, [100, 100])
    with h5py.File(tmp_path / "train-0000.h5", "r+") as f:
        f.attrs["format_version"] = 2
    with pytest.raises(DataError, match=r"train-0000.h5 has format_version 2"):
        open_shards(tmp_path, "train")

    write_unique_shards(tmp_path, [100_000])
    path = tmp_path / "train-0000.h5"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"train-0000.h5 is not a readable HDF5 file"):
        open_shards(tmp_path, "train")


def write_tokens(path, tokens, **attrs):
    """A shard with an arbitrary 'tokens' dataset, as a foreign or damaged writer might leave it."""
    meta = {"vocab_size": 300, "tokenizer": "bpe", "eot_id": 299, **attrs}
    with h5py.File(path, "w") as f:
        f.create_dataset("tokens", data=tokens)
        f.attrs.update(format="hpcllm-tokens", format_version=1, num_tokens=len(tokens), **meta)


@pytest.mark.parametrize(
    "tokens, attrs, message",
    [
        (np.arange(100, dtype=np.float32), {}, "dtype float32"),
        (np.arange(100, dtype=np.int32), {}, "dtype int32"),
        (np.arange(100, dtype=np.uint8), {}, "dtype uint8.*holds vocab_size 300.*uint16"),
        (np.arange(100, dtype=np.uint16), {"tokenizer": "byte"}, "vocab_size 300 and eot_id 299"),
        (np.arange(100, dtype=np.uint16), {"eot_id": 300}, "eot_id 300.*\\[0, vocab_size\\)"),
        (np.arange(100, dtype=np.uint16), {"tokenizer": "gpt9"}, "tokenizer 'gpt9'"),
    ],
)
def test_shards_that_cannot_be_right_are_refused(tmp_path, tokens, attrs, message):
    write_tokens(tmp_path / "train-0000.h5", tokens, **attrs)
    with pytest.raises(DataError, match=f"train-0000.h5.*{message}"):
        open_shards(tmp_path, "train")


def _tokens_elsewhere(f, folder, tokens):
    other = folder / "other.h5"
    with h5py.File(other, "w") as g:
        g["tokens"] = tokens
    return other


def _external_link(f, folder, tokens):
    f["tokens"] = h5py.ExternalLink(str(_tokens_elsewhere(f, folder, tokens)), "/tokens")


def _soft_link(f, folder, tokens):
    f["data"] = tokens
    f["tokens"] = h5py.SoftLink("/data")


def _virtual(f, folder, tokens):
    layout = h5py.VirtualLayout(shape=tokens.shape, dtype=tokens.dtype)
    layout[:] = h5py.VirtualSource(
        str(_tokens_elsewhere(f, folder, tokens)), "tokens", tokens.shape
    )
    f.create_virtual_dataset("tokens", layout)


def _external_raw(f, folder, tokens):
    (folder / "raw.bin").write_bytes(tokens.tobytes())  # any local file the user can read
    f.create_dataset(
        "tokens", tokens.shape, tokens.dtype, external=[(str(folder / "raw.bin"), 0, tokens.nbytes)]
    )


def _gzip(f, folder, tokens):
    f.create_dataset("tokens", data=tokens, chunks=(64,), compression="gzip")


def _chunks_unwritten(f, folder, tokens):
    f.create_dataset("tokens", tokens.shape, tokens.dtype, chunks=(64,))[:100] = tokens[:100]


def _never_written(f, folder, tokens):
    f.create_dataset("tokens", tokens.shape, tokens.dtype)  # contiguous, storage never allocated


def _compact(f, folder, tokens):
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.COMPACT)
    space = h5py.h5s.create_simple(tokens.shape)
    h5py.h5d.create(f.id, b"tokens", h5py.h5t.STD_U16LE, space, dcpl=dcpl).write(
        h5py.h5s.ALL, h5py.h5s.ALL, tokens
    )


@pytest.mark.parametrize(
    "make, message",
    [
        (_external_link, r"'tokens' is an external link to /tokens in .*other.h5"),
        (_soft_link, r"'tokens' is a soft link to /data"),
        (_virtual, r"'tokens' is a virtual dataset reading from .*other.h5"),
        (_external_raw, r"'tokens' is stored in the external raw file .*raw.bin"),
        (_gzip, r"'tokens' has compressed or filtered chunks \(deflate\)"),
        (_chunks_unwritten, r"only 2 of the 16 chunks of 'tokens' were written.*fill values"),
        (_never_written, r"'tokens' has 0 bytes stored but its 1000 tokens need 2000"),
        (_compact, r"'tokens' has a compact layout"),
    ],
)
def test_shards_that_keep_their_tokens_elsewhere_are_refused(tmp_path, make, message):
    tokens = np.arange(1000, dtype=np.uint16) % 300
    path = tmp_path / "train-0000.h5"
    with h5py.File(path, "w") as f:
        make(f, tmp_path, tokens)
        f.attrs.update(
            format="hpcllm-tokens",
            format_version=1,
            num_tokens=len(tokens),
            vocab_size=300,
            tokenizer="bpe",
            eot_id=299,
        )
    with pytest.raises(DataError, match=f"^{path}: {message}"):
        open_shards(tmp_path, "train")


def test_plainly_chunked_shards_are_read(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) % 300
    with h5py.File(tmp_path / "train-0000.h5", "w") as f:
        f.create_dataset("tokens", data=tokens, chunks=(64,))  # last chunk only partly used
        f.attrs.update(format="hpcllm-tokens", format_version=1, num_tokens=1000)
        f.attrs.update(vocab_size=300, tokenizer="bpe", eot_id=299)
    with open_shards(tmp_path, "train") as shards:
        assert np.array_equal(shards.read_sample(98, 10), tokens[980:991])


def test_a_fifo_shard_is_refused(tmp_path):
    os.mkfifo(tmp_path / "train-0001.h5")  # h5py would wait forever for a writer
    with pytest.raises(DataError, match=r"train-0001.h5 is a FIFO, not a regular file"):
        open_shards(tmp_path, "train")


def test_out_of_vocabulary_id_names_shard_offset_and_id(tmp_path):
    tokens = np.arange(200, dtype=np.uint16) % 256
    tokens[150] = 4000  # inside the second sample of seq_len 100... of the second shard
    write_tokens(tmp_path / "train-0000.h5", np.zeros(101, dtype=np.uint16))
    write_tokens(tmp_path / "train-0001.h5", tokens)
    with open_shards(tmp_path, "train") as shards:
        assert list(shards.read_sample(0, 10)) == [0] * 11
        shards.read_sample(5, 10)  # tokens 40..50 of the second shard: clean
        with pytest.raises(DataError) as e:
            shards.read_sample(24, 10)  # tokens 140..150 of the second shard
    assert str(e.value).startswith(str(tmp_path / "train-0001.h5"))
    assert "token id 4000 at token offset 150" in str(e.value) and "[0, 300)" in str(e.value)


def test_open_splits_refuses_mismatched_splits(tmp_path):
    tokens = np.arange(100, dtype=np.uint16)
    write_tokens(tmp_path / "train-0000.h5", tokens)
    write_tokens(tmp_path / "val-0000.h5", tokens)
    with pytest.raises(DataError, match=r"tokenizer.json is missing"):
        open_splits(tmp_path)  # a BPE data folder needs its tokenizer
    tok = BPETokenizer.train(["abc abd " * 50], vocab_size=300)  # runs out of merges early
    tok.save(tmp_path / "tokenizer.json")
    assert tok.vocab_size < 300
    with pytest.raises(DataError, match=rf"tokenizer.json has vocab_size {tok.vocab_size} but "):
        open_splits(tmp_path)

    vocab = {"vocab_size": tok.vocab_size, "eot_id": tok.eot_id}
    write_tokens(tmp_path / "train-0000.h5", tokens, **vocab)
    write_tokens(tmp_path / "val-0000.h5", tokens, **vocab)
    train, val = open_splits(tmp_path)
    assert train.vocab_size == val.vocab_size == tok.vocab_size
    train.close()
    val.close()
    write_tokens(tmp_path / "val-0000.h5", tokens, **{**vocab, "vocab_size": 400})
    with pytest.raises(DataError, match=r"val-0000.h5 has vocab_size 400 but .*train-0000.h5 has"):
        open_splits(tmp_path)


def test_open_splits_byte(tmp_path):
    write_shard(
        tmp_path / "train-0.h5", np.arange(256), vocab_size=257, tokenizer="byte", eot_id=256
    )
    write_shard(tmp_path / "val-0.h5", np.arange(256), vocab_size=257, tokenizer="byte", eot_id=256)
    train, val = open_splits(tmp_path)
    train.close()
    val.close()
    write_tokens(tmp_path / "val-0.h5", np.arange(100, dtype=np.uint16))  # a BPE val split
    with pytest.raises(
        DataError, match=r"val-0.h5 has tokenizer 'bpe' but .*train-0.h5 has 'byte'"
    ):
        open_splits(tmp_path)


# ---------------------------------------------------------------- prepare

DOCS = {
    "a.py": "import os\n" * 40 + "print('ü')\n",
    "notes/b.txt": "Some notes about training.\n" * 30,
    "notes/deep/README": "extension-less text file " * 25,
    "notes/c.md": "# Title\n\nbody ✓\n" * 20,
}


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8: skipped
    (root / "data.bin").write_bytes(b"\0\1\2")  # not a text extension: ignored
    (root / ".hidden").write_text("ignored")
    return root


def read_stream(data_dir, split) -> list[int]:
    """All tokens of a split, shard after shard in name order."""
    with open_shards(data_dir, split) as shards:
        paths = shards.paths
    stream = []
    for path in paths:
        with h5py.File(path, "r") as f:
            stream += f["tokens"][:].tolist()
    return stream


def expected_streams(texts, val_fraction, eot):
    train, val = [], []
    for text in texts:
        ids = list(text.encode("utf-8"))
        cut = len(ids) - int(len(ids) * val_fraction)
        train += [*ids[:cut], eot]
        val += [*ids[cut:], eot] if cut < len(ids) else []
    return train, val


def test_prepare_byte_streams(corpus, tmp_path):
    out = tmp_path / "out"
    summary = prepare([str(corpus)], str(out), val_fraction=0.1, shard_tokens=300)
    texts = [DOCS[name] for name in sorted(DOCS, key=lambda n: str(corpus / n))]
    train, val = expected_streams(texts, 0.1, eot=256)
    assert summary["files"] == len(DOCS) and summary["skipped"] == 2
    assert summary["skipped_why"] == {
        NOT_TEXT_NAME: [1, str(corpus / "data.bin")],
        BINARY: [1, str(corpus / "latin1.txt")],
    }
    num_eots = 2 * len(texts)  # one after each document's train part and one after its val part
    assert (
        summary["train_tokens"] + summary["val_tokens"]
        == sum(len(t.encode()) for t in texts) + num_eots
    )
    assert (summary["train_tokens"], summary["val_tokens"]) == (len(train), len(val))
    assert len(summary["shards"]) > 2  # shard_tokens=300 forces several train shards
    assert sorted(os.listdir(out)) == summary["shards"]
    assert read_stream(out, "train") == train and read_stream(out, "val") == val
    with open_shards(out, "val") as shards:
        assert shards.num_samples(8) > 0


def test_prepare_overwrite(corpus, tmp_path):
    out = tmp_path / "out"
    prepare([str(corpus)], str(out), shard_tokens=300)
    with pytest.raises(DataError, match=r"already holds.*--overwrite"):
        prepare([str(corpus)], str(out))
    summary = prepare([str(corpus / "a.py")], str(out), overwrite=True)
    assert (
        sorted(os.listdir(out)) == ["train-0000-0000.h5", "val-0000-0000.h5"] == summary["shards"]
    )
    assert summary["files"] == 1


def test_prepare_needs_text(corpus, tmp_path):
    with pytest.raises(DataError, match=r"no text to train on.*1 skipped; 1 that are binary"):
        prepare([str(corpus / "latin1.txt")], str(tmp_path / "out"))
    (tmp_path / "binaries").mkdir()
    (tmp_path / "binaries" / "model.bin").write_bytes(b"\0")
    with pytest.raises(DataError, match=r"no text files .* under .*binaries"):
        prepare([str(tmp_path / "binaries")], str(tmp_path / "out"))


def test_prepare_bpe(corpus, tmp_path):
    out = tmp_path / "out"
    summary = prepare([str(corpus)], str(out), tokenizer="bpe", vocab_size=300, val_fraction=0.1)
    with open_shards(out, "train") as shards:
        tok = load_tokenizer(out, shards.tokenizer)
    assert isinstance(tok, BPETokenizer) and summary["vocab_size"] == tok.vocab_size
    train, val = read_stream(out, "train"), read_stream(out, "val")
    assert len(train) == summary["train_tokens"] and len(val) == summary["val_tokens"] > 0

    def parts(stream):
        ends = [i for i, t in enumerate(stream) if t == tok.eot_id]
        return [
            tok.decode(stream[a + 1 if a >= 0 else 0 : b])
            for a, b in zip([-1, *ends], ends, strict=False)
        ]

    texts = [DOCS[name] for name in sorted(DOCS, key=lambda n: str(corpus / n))]
    assert [t + v for t, v in zip(parts(train), parts(val), strict=True)] == texts


def test_prepare_reports_progress(corpus, tmp_path, capsys):
    prepare([str(corpus)], str(tmp_path / "quiet"))
    assert capsys.readouterr().err == ""  # small inputs finish before the first report is due
    prepare([str(corpus)], str(tmp_path / "out"), tokenizer="bpe", vocab_size=300, progress_s=0)
    err = capsys.readouterr().err
    assert "prepare: learning BPE merges (vocab 300) from 5 of 5 files" in err
    assert "prepare: reading text for BPE: 1/5 files" in err
    assert "prepare: tokenizing: 5/5 files" in err and "(100%)" in err and "MB/s" in err


def test_prepare_checks_vocab_size_before_removing_old_shards(corpus, tmp_path):
    out = tmp_path / "out"
    prepare([str(corpus)], str(out))
    before = sorted(os.listdir(out))
    with pytest.raises(ValueError, match=r"at least 257"):
        prepare([str(corpus)], str(out), tokenizer="bpe", vocab_size=100, overwrite=True)
    assert sorted(os.listdir(out)) == before


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "hpcllm.data.prepare", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_prepare_cli(corpus, tmp_path):
    missing = tmp_path / "no-such-dir"
    result = run_cli("--input", str(corpus), str(missing), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and f"error: input {missing} does not exist" in result.stderr

    result = run_cli("--input", str(corpus), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "prepared 4 files" in result.stdout and "skipped 1 file" in result.stderr
    result = run_cli("--input", str(corpus), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (
        run_cli("--input", str(corpus), "--out", str(tmp_path / "out"), "--overwrite").returncode
        == 0
    )
    assert run_cli("--out", str(tmp_path / "x"), "--val-fraction", "1.5").returncode == 2


def test_prepare_reads_regular_files_only_and_says_what_it_skipped(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "good.txt").write_text("some text\n" * 20)
    (corpus / "Apache-2.0").write_text("a license, not a .0 file\n" * 20)  # a version, read
    (corpus / "sub" / "inside.md").write_text("linked from inside\n" * 20)
    (corpus / "inside.md").symlink_to(corpus / "sub" / "inside.md")  # read (twice: two names)
    os.mkfifo(corpus / "pipe")  # reading it used to wait forever
    (corpus / "zero").symlink_to("/dev/zero")  # used to be read until memory ran out
    (tmp_path / "secret.txt").write_text("not part of the corpus\n")
    (corpus / "secret.txt").symlink_to(tmp_path / "secret.txt")
    (corpus / "elsewhere").symlink_to(tmp_path, target_is_directory=True)
    (corpus / "image.png").write_bytes(b"\x89PNG")
    result = run_cli("--input", str(corpus), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "prepared 4 files" in result.stdout
    warnings = sorted(result.stderr.splitlines())
    assert warnings == sorted(
        [
            f"warning: skipped 1 file(s) {LINK_FOLDER}, e.g. {corpus / 'elsewhere'}",
            f"warning: skipped 1 file(s) {NOT_TEXT_NAME}, e.g. {corpus / 'image.png'}",
            f"warning: skipped 1 file(s) {SPECIAL}, e.g. {corpus / 'pipe'}",
            f"warning: skipped 2 file(s) {LINK_OUTSIDE}, e.g. {corpus / 'secret.txt'}",
        ]
    )
    result = run_cli("--input", "/dev/zero", "--out", str(tmp_path / "out2"))
    assert result.returncode == 2
    assert (
        result.stderr == "error: input /dev/zero is a device or special file, not a regular file\n"
    )


def test_prepare_survives_a_file_removed_while_learning_merges(corpus, tmp_path, monkeypatch):
    victim = corpus / "notes" / "deep" / "README"
    learn = BPETokenizer.train.__func__

    def learn_and_remove(cls, texts, vocab_size):
        def removing():
            for i, text in enumerate(texts):
                if i == 0:
                    victim.unlink()
                yield text

        return learn(cls, removing(), vocab_size)

    monkeypatch.setattr(BPETokenizer, "train", classmethod(learn_and_remove))
    summary = prepare([str(corpus)], str(tmp_path / "out"), tokenizer="bpe", vocab_size=300)
    assert summary["files"] == len(DOCS) - 1
    assert summary["skipped_why"][UNREADABLE] == [1, str(victim)]


def test_prepare_keeps_the_old_shards_until_the_new_ones_are_good(corpus, tmp_path):
    out = tmp_path / "out"
    prepare([str(corpus)], str(out))
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    with pytest.raises(DataError, match=r"no text to train on"):
        prepare([str(corpus / "latin1.txt")], str(out), overwrite=True)
    with pytest.raises(DataError, match=r"no validation tokens .* raise --val-fraction"):
        (tmp_path / "tiny.txt").write_text("ab")  # 2 tokens: 0.1 of a validation token
        prepare([str(tmp_path / "tiny.txt")], str(out), overwrite=True, val_fraction=0.05)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_short_documents_still_give_a_validation_split(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(400):
        (corpus / f"doc{i:03d}.txt").write_text(f"d{i:03d}\n")  # 5 tokens: 0.25 at 0.05
    summary = prepare([str(corpus)], str(tmp_path / "out"), val_fraction=0.05)
    val = [t for t in read_stream(tmp_path / "out", "val") if t != 256]
    # 400 * 5 * 0.05 = 100 tokens; the golden-ratio sequence is within a few of its share.
    assert abs(len(val) - 100) <= 3 and summary["val_tokens"] == 2 * len(val)
    assert summary["train_tokens"] + len(val) == 400 * 6  # each token and EOT is in one split


def test_text_is_read_in_pieces_that_encode_as_the_whole(tmp_path):
    rng = random.Random(0)
    words = ["def", "x", "  ", "\t", "é✓", "\n", "\r\n", "\n\n", " \n", "return", "(1)"]
    text = "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(120_000))
    path = tmp_path / "big.txt"
    path.write_bytes(text.encode())  # no newline translation: the CRLFs stay
    pieces = list(_text_pieces(str(path)))
    assert "".join(pieces) == text and len(pieces) > 3
    assert max(len(p) for p in pieces) <= PIECE_CHARS
    tok = BPETokenizer.train([text[:50_000]], vocab_size=400)
    assert np.array_equal(np.concatenate([tok.encode(p) for p in pieces]), tok.encode(text))


def test_default_corpus_files():
    files = default_corpus_files()
    assert len(files) > 100 and all(f.endswith(".py") for f in files)
    assert not [f for f in files if SKIP_DIRS & set(f.split(os.sep))]
    assert any(f.endswith(os.path.join("pydoc_data", "topics.py")) for f in files)


# ---------------------------------------------------------------- loader

SEQ_LEN = 8
SIZES = [8 * 20 + 1, 8 * 13 + 5, 8 * 15 + 1]  # 20 + 13 + 15 = 48 samples


@pytest.fixture
def shards(tmp_path):
    write_unique_shards(tmp_path, SIZES)
    with open_shards(tmp_path, "train") as shard_set:
        yield shard_set


@pytest.fixture
def index_of(shards):
    return {int(shards.read_sample(i, SEQ_LEN)[0]): i for i in range(shards.num_samples(SEQ_LEN))}


def make_loaders(shards, *, mb, accum, dp, seed=0, prefetch=False):
    return [
        Loader(
            shards,
            seq_len=SEQ_LEN,
            micro_batch_size=mb,
            grad_accum_steps=accum,
            dp_rank=r,
            dp_size=dp,
            seed=seed,
            prefetch=prefetch,
        )
        for r in range(dp)
    ]


def global_step(loaders, index_of):
    """Sample indices of one global step by stream position, and all ranks' batches."""
    by_position, batches = {}, []
    for loader in loaders:
        positions = step_positions(
            loader.consumed_samples,
            micro_batch_size=loader.micro_batch_size,
            grad_accum_steps=loader.grad_accum_steps,
            dp_rank=loader.dp_rank,
            dp_size=loader.dp_size,
        )
        step = loader.next_step()
        batches.append(step)
        for micro, (x, y) in zip(positions, step, strict=True):
            assert (
                x.shape == y.shape == (loader.micro_batch_size, SEQ_LEN) and x.dtype == torch.int64
            )
            assert torch.equal(x[:, 1:], y[:, :-1])
            by_position.update(zip(micro.tolist(), sample_ids(x, index_of), strict=True))
    return by_position, batches


def test_step_positions():
    parts = step_positions(100, micro_batch_size=2, grad_accum_steps=3, dp_rank=1, dp_size=4)
    assert [p.tolist() for p in parts] == [[102, 103], [110, 111], [118, 119]]
    every = np.concatenate(
        [
            p
            for r in range(4)
            for p in step_positions(
                100, micro_batch_size=2, grad_accum_steps=3, dp_rank=r, dp_size=4
            )
        ]
    )
    assert sorted(every.tolist()) == list(range(100, 124))


def test_loader_epochs_cover_every_sample_once(shards, index_of):
    loaders = make_loaders(shards, mb=1, accum=2, dp=5)  # G = 10 does not divide N = 48
    stream = {}
    for _ in range(10):
        stream.update(global_step(loaders, index_of)[0])
    assert sorted(stream) == list(range(100))
    epoch0, epoch1 = [stream[p] for p in range(48)], [stream[p] for p in range(48, 96)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(48))
    assert epoch0 != epoch1 and epoch0 != list(range(48))  # shuffled, differently per epoch


def test_loader_global_step_independent_of_layout(shards, index_of):
    runs = []
    for dp, accum in ((1, 4), (2, 2), (4, 1)):
        loaders = make_loaders(shards, mb=3, accum=accum, dp=dp, seed=7)
        assert loaders[0].global_batch_size == 12
        runs.append([sorted(global_step(loaders, index_of)[0].values()) for _ in range(6)])
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize("prefetch", [False, True])
def test_loader_resume(shards, index_of, prefetch):
    uninterrupted = make_loaders(shards, mb=2, accum=2, dp=2, seed=3)
    steps = [global_step(uninterrupted, index_of) for _ in range(5)]
    # With prefetch, step 4 is already being read when the state is taken: it must not count.
    interrupted = make_loaders(shards, mb=2, accum=2, dp=2, seed=3, prefetch=prefetch)
    for _ in range(3):
        global_step(interrupted, index_of)
    states = [loader.state_dict() for loader in interrupted]
    assert states[0] == {"consumed_samples": 24, "seed": 3}

    # Built with another seed: the checkpoint's seed wins, or the epoch in progress would reshuffle.
    resumed = make_loaders(shards, mb=2, accum=2, dp=2, seed=99, prefetch=prefetch)
    if prefetch:  # a read ahead at the resumed position but under another seed is not used
        for _ in range(3):
            global_step(resumed, index_of)
        assert resumed[0]._ahead is not None and resumed[0]._ahead[:2] == (24, 99)
    for loader, state in zip(resumed, states, strict=True):
        loader.load_state_dict(state)
    for _, expected in steps[3:]:
        _, batches = global_step(resumed, index_of)
        for rank_expected, rank_batches in zip(expected, batches, strict=True):
            for (x0, y0), (x1, y1) in zip(rank_expected, rank_batches, strict=True):
                assert torch.equal(x0, x1) and torch.equal(y0, y1)

    # Same global batch on four ranks without accumulation: the same samples follow.
    relaid = make_loaders(shards, mb=2, accum=1, dp=4, seed=3, prefetch=prefetch)
    for loader in relaid:
        loader.load_state_dict(states[0])
    for by_position, _ in steps[3:]:
        assert global_step(relaid, index_of)[0] == by_position


def test_prefetching_loader_gives_the_same_batches_and_counts_its_wait(shards, index_of):
    plain = make_loaders(shards, mb=3, accum=2, dp=2, seed=5)
    ahead = make_loaders(shards, mb=3, accum=2, dp=2, seed=5, prefetch=True)
    for _ in range(12):  # 12 steps of 12 samples: three epochs
        expected, got = global_step(plain, index_of), global_step(ahead, index_of)
        assert expected[0] == got[0]
        for rank_expected, rank_got in zip(expected[1], got[1], strict=True):
            for (x0, y0), (x1, y1) in zip(rank_expected, rank_got, strict=True):
                assert torch.equal(x0, x1) and torch.equal(y0, y1)
    for loader in ahead:
        assert loader._ahead is not None and loader._ahead[0] == loader.consumed_samples
        assert loader.wait_seconds > 0
        loader.close()
        assert loader._reader is None


def test_loader_seed(shards, index_of):
    def order(seed):
        loaders = make_loaders(shards, mb=4, accum=1, dp=2, seed=seed)
        stream = {}
        for _ in range(6):
            stream.update(global_step(loaders, index_of)[0])
        return [stream[p] for p in sorted(stream)]

    assert order(1) == order(1)
    assert order(1) != order(2)
    with pytest.raises(ValueError, match=r"dp_rank"):
        Loader(
            shards, seq_len=8, micro_batch_size=1, grad_accum_steps=1, dp_rank=2, dp_size=2, seed=0
        )


def test_val_batches(shards, index_of):
    got = {}
    for rank in range(2):
        batches = val_batches(
            shards, seq_len=SEQ_LEN, batch_size=5, num_batches=6, dp_rank=rank, dp_size=2
        )
        again = val_batches(
            shards, seq_len=SEQ_LEN, batch_size=5, num_batches=6, dp_rank=rank, dp_size=2
        )
        assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
        got[rank] = [sample_ids(x, index_of) for x, _ in batches]
    # Batch b holds samples 10b .. 10b+9 (mod 48): rank 0 the first five, rank 1 the rest.
    for b in range(6):
        assert got[0][b] + got[1][b] == [(10 * b + i) % 48 for i in range(10)]


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_token_bytes_sum_to_the_text_length(kind):
    """Bits per byte need the bytes each id stands for: they add up to the UTF-8 length."""
    text = "def f(x):\n    return x * 2  # naïve, 漢字 and emoji 🙂\n" * 20
    if kind == "byte":
        tok = ByteTokenizer()
    else:
        tok = BPETokenizer.train([text], vocab_size=300)
    lengths = tok.token_bytes()
    assert lengths.shape == (tok.vocab_size,)
    assert lengths[tok.eot_id] == 0
    ids = tok.encode(text)
    assert lengths[ids].sum() == len(text.encode("utf-8"))
    if kind == "bpe":
        assert ids.size < len(text.encode("utf-8"))  # merges happened: multi-byte tokens
