"""HDF5 token shards: the on-disk format between `prepare` and the training loader.

A data directory holds `train-*.h5` and `val-*.h5`. Each file has one 1-D dataset
`tokens` (documents concatenated, the EOT id after each) and attributes that describe it:
`format`, `format_version`, `vocab_size`, `tokenizer`, `eot_id`, `num_tokens`. The token
count is stored separately from the dataset so a shard cut short is caught on open instead
of silently training on less data.

A training sample is a window of seq_len + 1 tokens (inputs and shifted targets) taken at
stride seq_len inside one shard; windows never cross shard boundaries, so a shard of n
tokens holds (n - 1) // seq_len samples.
"""

from __future__ import annotations

import glob
import os
import stat
from typing import BinaryIO

import h5py
import numpy as np
from h5py import h5d

FORMAT = "hpcllm-tokens"
FORMAT_VERSION = 1
PREPARE_HINT = "run python -m hpcllm.data.prepare --out {}"


class DataError(ValueError):
    """A data directory or shard the user pointed at is missing, damaged or inconsistent."""


def token_dtype(vocab_size: int) -> type:
    """The smallest unsigned dtype that holds every id of a vocabulary."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_shard(path, tokens: np.ndarray, *, vocab_size: int, tokenizer: str, eot_id: int) -> None:
    """Write one shard atomically: readers see either no file or the complete one."""
    path = os.fspath(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(
            f"{path}: token ids must lie in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]"
        )
    tmp = path + ".tmp"
    # Locking off: some cluster filesystems (Lustre, NFS) have no flock and HDF5 fails on it.
    with h5py.File(tmp, "w", locking=False) as f:
        # Contiguous layout: a sample read is then one plain read at a computed offset.
        f.create_dataset("tokens", data=tokens.astype(token_dtype(vocab_size)))
        f.attrs.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            vocab_size=int(vocab_size),
            tokenizer=str(tokenizer),
            eot_id=int(eot_id),
            num_tokens=int(tokens.size),
        )
    os.replace(tmp, path)


def open_shards(data_dir, split: str) -> ShardSet:
    """Open every `{split}-*.h5` shard in `data_dir`, in name order, after checking them."""
    data_dir = os.fspath(data_dir)
    hint = PREPARE_HINT.format(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} does not exist; {hint}")
    paths = sorted(glob.glob(os.path.join(glob.escape(data_dir), f"{split}-*.h5")))
    if not paths:
        raise DataError(f"no {split} shards ({split}-*.h5) in {data_dir}; {hint}")
    return ShardSet(paths)


def _read_attr(f: h5py.File, path: str, key: str):
    if key not in f.attrs:
        raise DataError(
            f"{path} has no attribute '{key}'; it was not written by "
            f"hpcllm.data.prepare or is damaged, prepare the data again"
        )
    value = f.attrs[key]
    return value.decode() if isinstance(value, bytes) else value


def check_regular(path: str, mode: int) -> None:
    """DataError unless `mode` (from a stat of `path`) is a regular file's: reading a FIFO
    waits forever for a writer and a device such as /dev/zero never ends."""
    if not stat.S_ISREG(mode):
        kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket"}
        kind = next((k for test, k in kinds.items() if test(mode)), "a device or special file")
        raise DataError(f"{path} is {kind}, not a regular file")


def open_regular(path: str) -> tuple[BinaryIO, int]:
    """`path` opened for binary reading if it is a regular file (links followed), and its size
    then: read no more than that, a file that grows meanwhile must not read on forever.
    DataError for a FIFO, device or folder; OSError if it cannot be opened."""
    check_regular(path, os.stat(path).st_mode)  # before opening: opening a tape device rewinds it
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO swapped in meanwhile must not block
    f = open(fd, "rb")
    try:
        info = os.fstat(fd)
        check_regular(path, info.st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        f.close()
        raise
    return f, info.st_size


def read_regular(path: str) -> bytes:
    """The bytes of the regular file `path` (see `open_regular`)."""
    f, size = open_regular(path)
    with f:
        return f.read(size)


def _open_checked(path: str) -> tuple[h5py.File, dict]:
    """Open one shard read-only and check its format; returns the file and its metadata."""
    try:
        check_regular(path, os.stat(path).st_mode)
    except OSError as e:
        raise DataError(f"{path} cannot be read: {e.strerror}") from e
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        raise DataError(
            f"{path} is not a readable HDF5 file (truncated or not a shard?): {e}"
        ) from e
    try:
        fmt = _read_attr(f, path, "format")
        if fmt != FORMAT:
            raise DataError(
                f"{path} has format '{fmt}', expected '{FORMAT}'; it is not an hpcllm token shard"
            )
        version = int(_read_attr(f, path, "format_version"))
        if version != FORMAT_VERSION:
            raise DataError(
                f"{path} has format_version {version} but this hpcllm reads version "
                f"{FORMAT_VERSION}; prepare the data again with this version"
            )
        meta = {
            key: _read_attr(f, path, key)
            for key in ("vocab_size", "tokenizer", "eot_id", "num_tokens")
        }
        meta = {key: (str(v) if key == "tokenizer" else int(v)) for key, v in meta.items()}
        tokens = _tokens_in_file(f, path)
        if len(tokens) != meta["num_tokens"]:
            raise DataError(
                f"{path} is truncated: attribute num_tokens is {meta['num_tokens']} but the "
                f"'tokens' dataset holds {len(tokens)}; prepare the data again"
            )
        _check_meta(path, meta, tokens.dtype)
    except BaseException:
        f.close()
        raise
    return f, meta


def _tokens_in_file(f: h5py.File, path: str) -> h5py.Dataset:
    """The 'tokens' dataset, if its bytes lie in this file, unfiltered and all written, as
    `write_shard` stores them; DataError naming what is wrong otherwise.

    Looks only at the link, the creation property list and the chunk index, never at the
    data: anything else would make the trainer read other files (external links, external
    raw storage, virtual datasets), decompress without bound (a few KB of gzip chunks can
    stand for gigabytes) or train on fill values (chunks never written).
    """
    again = "a shard must hold its tokens itself, as python -m hpcllm.data.prepare writes them"
    link = f.get("tokens", getlink=True)
    if isinstance(link, h5py.ExternalLink):
        raise DataError(
            f"{path}: 'tokens' is an external link to {link.path} in {link.filename}; {again}"
        )
    if isinstance(link, h5py.SoftLink):
        raise DataError(f"{path}: 'tokens' is a soft link to {link.path}; {again}")
    tokens = f.get("tokens")
    if not isinstance(tokens, h5py.Dataset) or tokens.ndim != 1:
        raise DataError(f"{path} has no 1-D 'tokens' dataset; prepare the data again")
    dsid = tokens.id
    dcpl = dsid.get_create_plist()
    layout = dcpl.get_layout()
    if layout == h5d.VIRTUAL:
        sources = {dcpl.get_virtual_filename(i) for i in range(dcpl.get_virtual_count())}
        raise DataError(
            f"{path}: 'tokens' is a virtual dataset reading from {', '.join(sorted(sources))}; "
            f"{again}"
        )
    if dcpl.get_external_count():
        name = dcpl.get_external(0)[0].decode(errors="replace")
        raise DataError(f"{path}: 'tokens' is stored in the external raw file {name}; {again}")
    itemsize = tokens.dtype.itemsize
    if layout == h5d.CONTIGUOUS:
        needed = tokens.size * itemsize
    elif layout == h5d.CHUNKED:
        if dcpl.get_nfilters():
            names = [
                dcpl.get_filter(i)[3].decode(errors="replace") for i in range(dcpl.get_nfilters())
            ]
            raise DataError(
                f"{path}: 'tokens' has compressed or filtered chunks ({', '.join(names)}); "
                f"{again}, uncompressed"
            )
        (chunk,) = dcpl.get_chunk()
        num_chunks = -(-tokens.size // chunk)
        if dsid.get_num_chunks() != num_chunks:
            raise DataError(
                f"{path}: only {dsid.get_num_chunks()} of the {num_chunks} chunks of 'tokens' "
                f"were written, the rest would be read as fill values; prepare the data again"
            )
        needed = num_chunks * chunk * itemsize  # an unfiltered chunk is stored whole
    else:
        raise DataError(f"{path}: 'tokens' has a compact layout; {again}")
    if dsid.get_storage_size() != needed:
        raise DataError(
            f"{path}: 'tokens' has {dsid.get_storage_size()} bytes stored but its "
            f"{tokens.size} tokens need {needed}; it was never fully written, prepare the "
            f"data again"
        )
    return tokens


# The vocabulary each tokenizer implies, where it is fixed (None: learned, any size).
TOKENIZER_VOCAB = {"byte": (257, 256), "bpe": None}  # name -> (vocab_size, eot_id)


def _check_meta(path: str, meta: dict, dtype: np.dtype) -> None:
    """Refuse metadata that cannot describe real token data, before anything trains on it."""
    vocab_size, tokenizer, eot_id = meta["vocab_size"], meta["tokenizer"], meta["eot_id"]
    again = "prepare the data again with python -m hpcllm.data.prepare"
    if tokenizer not in TOKENIZER_VOCAB:
        raise DataError(
            f"{path} has tokenizer '{tokenizer}', expected one of "
            f"{', '.join(TOKENIZER_VOCAB)}; {again}"
        )
    fixed = TOKENIZER_VOCAB[tokenizer]
    if fixed is not None and (vocab_size, eot_id) != fixed:
        raise DataError(
            f"{path} says tokenizer '{tokenizer}' with vocab_size {vocab_size} and "
            f"eot_id {eot_id}, but that tokenizer has vocab_size {fixed[0]} and eot_id "
            f"{fixed[1]}; {again}"
        )
    if vocab_size < 1 or not 0 <= eot_id < vocab_size:
        raise DataError(
            f"{path} has vocab_size {vocab_size} and eot_id {eot_id}; the EOT id must lie "
            f"in [0, vocab_size); {again}"
        )
    # A float or signed dataset would be cast to ids silently (2.7 -> 2, -1 -> a huge id).
    if dtype.kind != "u" or np.iinfo(dtype).max < vocab_size - 1:
        raise DataError(
            f"{path}: the 'tokens' dataset has dtype {dtype}, but token ids need an "
            f"unsigned integer dtype that holds vocab_size {vocab_size} (e.g. "
            f"{np.dtype(token_dtype(vocab_size))}); {again}"
        )


def open_splits(data_dir) -> tuple[ShardSet, ShardSet]:
    """The train and val shards of `data_dir`, checked to share one tokenizer and vocabulary,
    and for BPE to match the tokenizer.json beside them, so that a mismatch stops the run
    at start-up rather than at the first validation or the final sample."""
    from hpcllm.data.tokenizer import TOKENIZER_FILE, load_tokenizer  # it imports this module

    train = open_shards(data_dir, "train")
    val = None
    try:
        val = open_shards(data_dir, "val")
        tok = load_tokenizer(data_dir, train.tokenizer)
        expected = _identity(train.tokenizer, train)
        for where, found in (
            (val.paths[0], _identity(val.tokenizer, val)),
            (os.path.join(os.fspath(data_dir), TOKENIZER_FILE), _identity(tok.name, tok)),
        ):
            for key, value in found.items():
                if value != expected[key]:
                    raise DataError(
                        f"{where} has {key} {value!r} but {train.paths[0]} has "
                        f"{expected[key]!r}; they come from different prepare runs, "
                        f"prepare the data again into an empty folder"
                    )
    except BaseException:
        train.close()
        if val is not None:
            val.close()
        raise
    return train, val


def _identity(name: str, source) -> dict:
    return {"tokenizer": name, "vocab_size": source.vocab_size, "eot_id": source.eot_id}


class ShardSet:
    """The shards of one split, kept open for repeated sample reads.

    Attributes: `paths`, `vocab_size`, `tokenizer` (its name), `eot_id`, `num_tokens`.
    """

    def __init__(self, paths: list[str]):
        self.paths = list(paths)
        self._files: list[h5py.File] = []
        try:
            metas = []
            for path in self.paths:
                f, meta = _open_checked(path)
                self._files.append(f)
                metas.append(meta)
                for key in ("vocab_size", "tokenizer", "eot_id"):
                    if meta[key] != metas[0][key]:
                        raise DataError(
                            f"shards disagree on {key}: {self.paths[0]} has {metas[0][key]!r} "
                            f"but {path} has {meta[key]!r}; they come from different prepare "
                            f"runs, remove the stale ones and prepare again"
                        )
        except BaseException:
            self.close()
            raise
        self._tokens = [f["tokens"] for f in self._files]
        self._shard_tokens = np.array([m["num_tokens"] for m in metas], dtype=np.int64)
        self.vocab_size = metas[0]["vocab_size"]
        self.tokenizer = metas[0]["tokenizer"]
        self.eot_id = metas[0]["eot_id"]
        self.num_tokens = int(self._shard_tokens.sum())
        self._cumulative: dict[
            int, np.ndarray
        ] = {}  # seq_len -> samples up to and including shard i

    def _cumulative_samples(self, seq_len: int) -> np.ndarray:
        if seq_len not in self._cumulative:
            if seq_len < 1:
                raise ValueError(f"seq_len must be positive, got {seq_len}")
            per_shard = np.maximum(self._shard_tokens - 1, 0) // seq_len
            self._cumulative[seq_len] = np.cumsum(per_shard)
        return self._cumulative[seq_len]

    def num_samples(self, seq_len: int) -> int:
        """How many windows of seq_len + 1 tokens the shards hold; DataError if none."""
        total = int(self._cumulative_samples(seq_len)[-1])
        if total == 0:
            raise DataError(
                f"the {len(self.paths)} shard(s) starting with {self.paths[0]} hold "
                f"{self.num_tokens} tokens, too few for one sample of seq_len {seq_len} "
                f"(a shard needs at least {seq_len + 1}); use a shorter seq_len or more data"
            )
        return total

    def read_sample(self, index: int, seq_len: int) -> np.ndarray:
        """Sample `index` (counted over all shards in order) as int64 tokens of length seq_len + 1."""
        cumulative = self._cumulative_samples(seq_len)
        if not 0 <= index < cumulative[-1]:
            raise IndexError(
                f"sample {index} out of range [0, {cumulative[-1]}) for seq_len {seq_len}"
            )
        shard = int(np.searchsorted(cumulative, index, side="right"))
        local = index - (int(cumulative[shard - 1]) if shard else 0)
        start = local * seq_len
        sample = self._tokens[shard][start : start + seq_len + 1].astype(np.int64)
        # One max per sample: a damaged id would otherwise fail deep inside the embedding.
        if sample.max() >= self.vocab_size:
            bad = int(np.argmax(sample >= self.vocab_size))
            raise DataError(
                f"{self.paths[shard]}: token id {int(sample[bad])} at token offset "
                f"{start + bad} is outside the vocabulary [0, {self.vocab_size}); the "
                f"shard is damaged, prepare the data again"
            )
        return sample

    def close(self) -> None:
        """Close the HDF5 files; the set cannot read afterwards."""
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> ShardSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
