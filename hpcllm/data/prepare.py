"""Turn text files into token shards for training.

    python -m hpcllm.data.prepare --out data/stdlib                 # embedded default corpus
    python -m hpcllm.data.prepare --input notes/ book.txt --out data/mine --tokenizer bpe
    mpirun -np 4 python -m hpcllm.data.prepare --out data/stdlib    # ranks share the files

Without --input the corpus is this Python's own standard library (about 12 MB of source),
so a machine with no network still has real text to train on.

Each file is one document. The last `val_fraction` of each document's tokens goes to the
validation split and the rest to training, each part followed by the EOT id, so the split
does not depend on the number of ranks (`_num_val`: documents too short for a validation
token). Under MPI the sorted file list is cut into contiguous, size-balanced ranges; rank
r writes `{split}-{r:04d}-{k:04d}.h5`, so reading the shards in name order gives the same
token stream as a single-rank run.

Only regular files are read (what is left out is reported, by reason), text is read in
bounded pieces, and the new shards are written to a folder inside --out that replaces the
old ones only once everything has succeeded.
"""

from __future__ import annotations

import argparse
import codecs
import glob
import os
import shutil
import stat
import sys
import sysconfig
import time
import traceback
from collections.abc import Iterator

import numpy as np

from hpcllm.data.shards import DataError, check_regular, open_regular, token_dtype, write_shard
from hpcllm.data.tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", "")  # "" = no extension (README, LICENSE, ...)
# Test suites are large, repetitive and full of deliberately odd code; not what we want to model.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
BPE_TRAIN_BYTES = 64 * 2**20  # BPE learns merges from at most this much text (keeps it ~1 minute)
# Text is read, learned from and encoded in pieces of about this many characters, so memory
# stays flat in a file's size (tokenizers' trainer buffers 256 of them at a time).
PIECE_CHARS = 2**16
STAGING = ".prepare-partial"  # inside --out: the new shards until all of them are written

# Why a file is left out: "skipped N file(s) <reason>".
SPECIAL = "that are not regular files (FIFOs, sockets, devices)"
LINK_OUTSIDE = "that are links to outside their --input folder"
LINK_FOLDER = "that are links to folders (not followed)"
NOT_TEXT_NAME = "without a text extension (.py .txt .md .rst or none; name them in --input)"
BINARY = "that are binary or not UTF-8"
UNREADABLE = "that could not be read or were removed meanwhile"


class _Skipped(Exception):
    """A corpus file is left out; the message is the reason."""


def _note(skipped: dict, reason: str, path: str) -> None:
    """Count a skipped file under `reason` in `skipped` (reason -> [count, first path])."""
    skipped.setdefault(reason, [0, path])[0] += 1


def _merge_skipped(parts: list[dict]) -> dict:
    merged: dict = {}
    for part in parts:
        for reason, (count, example) in part.items():
            merged.setdefault(reason, [0, example])[0] += count
    return merged


def default_corpus_files() -> list[str]:
    """The `.py` files of the running interpreter's standard library, without tests and site-packages."""
    files = []
    for root, dirs, names in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        files += [os.path.join(root, n) for n in names if n.endswith(".py")]
    return sorted(files)


def _is_text_name(name: str) -> bool:
    """A walked file is read if its extension is a text one or it has none; a suffix without
    letters is a version, not an extension (`Apache-2.0`, `notes.2024`)."""
    suffix = os.path.splitext(name)[1]
    return suffix in TEXT_SUFFIXES or not any(c.isalpha() for c in suffix)


def _why_not(path: str, name: str, real_root: str) -> tuple[str | None, int]:
    """Why a file found under the folder `real_root` (resolved) is not read (None: it is
    read), and its size."""
    if not _is_text_name(name):
        return NOT_TEXT_NAME, 0
    if os.path.islink(path):
        target = os.path.realpath(path)
        if os.path.commonpath([target, real_root]) != real_root:
            return LINK_OUTSIDE, 0
    try:
        info = os.stat(path)
    except OSError:
        return UNREADABLE, 0  # a dangling link, or removed while walking
    if not stat.S_ISREG(info.st_mode):
        return SPECIAL, 0
    return (None if os.access(path, os.R_OK) else UNREADABLE), info.st_size


def find_text_files(inputs: list[str]) -> tuple[dict[str, int], dict]:
    """The regular files named in `inputs`, plus the text files found by walking the folders
    among them, with their sizes, in name order; and the walked files left out, by reason.

    Hidden files and folders and `__pycache__` are passed over without a word.
    """
    files: dict[str, int] = {}
    skipped: dict = {}
    for given in inputs:
        if not os.path.isdir(given):
            try:
                info = os.stat(given)
            except FileNotFoundError:
                raise DataError(f"input {given} does not exist") from None
            check_regular(f"input {given}", info.st_mode)
            files[os.path.normpath(given)] = info.st_size
            continue
        real_root = os.path.realpath(given)
        for root, dirs, names in os.walk(given):
            # Sorted, so that the example named for each reason is the same on every run.
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
            for d in [d for d in dirs if os.path.islink(os.path.join(root, d))]:
                _note(skipped, LINK_FOLDER, os.path.join(root, d))
                dirs.remove(d)
            for name in sorted(n for n in names if not n.startswith(".")):
                path = os.path.normpath(os.path.join(root, name))
                reason, size = _why_not(path, name, real_root)
                if reason is None:
                    files[path] = size
                else:
                    _note(skipped, reason, path)
    if not files:
        raise DataError(
            f"no text files ({' '.join(s or 'no extension' for s in TEXT_SUFFIXES)}) "
            f"under {' '.join(inputs)}"
            + "".join(f"; skipped {n} {reason}, e.g. {e}" for reason, (n, e) in skipped.items())
        )
    return dict(sorted(files.items())), skipped


def _text_pieces(path: str) -> Iterator[str]:
    """The text of `path` in pieces of about PIECE_CHARS characters; _Skipped with the reason
    if it is not a regular file, cannot be read, or is not UTF-8 text (NUL bytes, valid UTF-8
    though they are, mark binary files).

    A piece ends just before a line end that follows a non-space character: GPT-2's
    pre-tokenizer always splits there, so the pieces encode to the tokens of the whole text.
    """
    try:
        f, size = open_regular(path)
    except DataError:
        raise _Skipped(SPECIAL) from None
    except OSError:
        raise _Skipped(UNREADABLE) from None
    decoder = codecs.getincrementaldecoder("utf-8")()
    text = ""
    with f:
        while True:
            try:
                block = f.read(min(PIECE_CHARS, size))
            except OSError:
                raise _Skipped(UNREADABLE) from None
            size -= len(block)
            last = not block or size <= 0
            if b"\0" in block:
                raise _Skipped(BINARY)
            try:
                text += decoder.decode(block, final=last)
            except UnicodeDecodeError:
                raise _Skipped(BINARY) from None
            while len(text) > PIECE_CHARS:
                cut = _cut(text)
                yield text[:cut]
                text = text[cut:]
            if last:
                if text:
                    yield text
                return


def _cut(text: str) -> int:
    """Where a piece of `text` ends: before the last line end in its first PIECE_CHARS
    characters that follows a non-space character (a CRLF's CR included), else there."""
    i = text.rfind("\n", 1, PIECE_CHARS)
    while i > 0:
        end = i - 1 if text[i - 1] == "\r" else i
        if end > 0 and not text[end - 1].isspace():
            return end
        i = text.rfind("\n", 1, i)
    return PIECE_CHARS


def _assign_ranks(sizes: list[int], size: int) -> list[int]:
    """Owner rank of each file: contiguous ranges holding about the same number of bytes each."""
    total = sum(sizes)
    if total == 0:
        return [i * size // len(sizes) for i in range(len(sizes))]
    # A file goes to the rank whose share of the bytes contains the file's midpoint.
    midpoints = np.cumsum(sizes) - np.asarray(sizes) / 2
    return [min(size - 1, int(m * size / total)) for m in midpoints]


class _ShardWriter:
    """One rank's tokens of one split, written out a shard at a time as they fill up."""

    def __init__(self, out: str, split: str, rank: int, shard_tokens: int, tok):
        self.out, self.split, self.rank, self.shard_tokens, self.tok = (
            out,
            split,
            rank,
            shard_tokens,
            tok,
        )
        self.parts: list[np.ndarray] = []
        self.buffered = 0
        self.num_tokens = 0
        self.names: list[str] = []

    def add(self, ids: np.ndarray) -> None:
        self.parts.append(ids.astype(token_dtype(self.tok.vocab_size)))
        self.buffered += len(ids)
        while self.buffered >= self.shard_tokens:
            self._write(self.shard_tokens)

    def close(self) -> None:
        if self.buffered:
            self._write(self.buffered)

    def _write(self, n: int) -> None:
        tokens = np.concatenate(self.parts)
        self.parts, self.buffered = [tokens[n:]], len(tokens) - n
        name = f"{self.split}-{self.rank:04d}-{len(self.names):04d}.h5"
        write_shard(
            os.path.join(self.out, name),
            tokens[:n],
            vocab_size=self.tok.vocab_size,
            tokenizer=self.tok.name,
            eot_id=self.tok.eot_id,
        )
        self.names.append(name)
        self.num_tokens += n


class _SingleRank:
    """The few communicator calls `prepare` makes, for a run without MPI."""

    rank, size = 0, 1

    def bcast(self, obj, root=0):
        return obj

    def allgather(self, obj):
        return [obj]


def _on_root(comm, fn):
    """Run `fn` on rank 0 and hand its result to every rank; a user error there fails every rank."""
    result = error = None
    if comm.rank == 0:
        try:
            result = fn()
        except (ValueError, OSError) as e:
            error = str(e)
    result, error = comm.bcast((result, error), root=0)
    if error is not None:
        raise DataError(error)
    return result


def _on_all(comm, fn):
    """Run `fn` on every rank; if any rank hits a user error every rank raises, so none waits forever."""
    try:
        result, error = fn(), None
    except (ValueError, OSError) as e:
        result, error = None, (f"rank {comm.rank}: {e}" if comm.size > 1 else str(e))
    errors = [e for e in comm.allgather(error) if e is not None]
    if errors:
        raise DataError("; ".join(errors))
    return result


def _plan(
    inputs, out: str, overwrite: bool, size: int
) -> tuple[list[str], list[int], list[int], dict]:
    """Rank 0's look at the filesystem: the corpus files, their sizes and owner ranks, the
    files left out, and an empty staging folder in --out. Old shards stay until `_publish`."""
    skipped: dict = {}
    if inputs is None:
        files = {f: os.path.getsize(f) for f in default_corpus_files()}
    else:
        files, skipped = find_text_files(inputs)
    os.makedirs(out, exist_ok=True)
    shards = sorted(
        glob.glob(os.path.join(glob.escape(out), "train-*.h5"))
        + glob.glob(os.path.join(glob.escape(out), "val-*.h5"))
    )
    if shards and not overwrite:
        raise DataError(
            f"{out} already holds {len(shards)} shard(s) (e.g. {shards[0]}); "
            f"pass --overwrite to replace them or choose another --out"
        )
    staging = os.path.join(out, STAGING)
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted run left
    os.mkdir(staging)
    sizes = list(files.values())
    return list(files), sizes, _assign_ranks(sizes, size), skipped


def _publish(staging: str, out: str) -> None:
    """Replace the old shards and tokenizer in `out` by the new ones written to `staging`."""
    # Old shards, a stale tokenizer and leftovers of an interrupted run must not mix with the new data.
    for pattern in ("train-*.h5*", "val-*.h5*", TOKENIZER_FILE + "*"):
        for path in glob.glob(os.path.join(glob.escape(out), pattern)):
            os.remove(path)
    for name in sorted(os.listdir(staging)):
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    os.rmdir(staging)


class _Progress:
    """Files and bytes done, as a line on stderr every `every_s` seconds (None: silent)."""

    def __init__(self, what: str, sizes: dict[str, int], every_s: float | None):
        self.what, self.every_s, self.sizes = what, every_s, sizes
        self.total_bytes = sum(self.sizes.values())
        self.files = self.bytes = 0
        self.start = self.last = time.monotonic()

    def say(self, message: str) -> None:
        if self.every_s is not None:
            print(f"prepare: {message}", file=sys.stderr, flush=True)

    def done(self, path: str) -> None:
        """Count `path` as done; print a line if the last one is `every_s` old."""
        if self.every_s is None:
            return
        self.files += 1
        self.bytes += self.sizes[path]
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            mb = 2**20
            self.say(
                f"{self.what}: {self.files}/{len(self.sizes)} files, {self.bytes / mb:.1f}/"
                f"{self.total_bytes / mb:.1f} MB ({100 * self.bytes / max(1, self.total_bytes):.0f}%), "
                f"{self.bytes / mb / (now - self.start):.1f} MB/s"
            )


def _train_bpe(
    files: list[str], sizes: list[int], vocab_size: int, out: str, progress_s: float | None
) -> None:
    # Every stride-th file keeps the sample spread out.
    stride = max(1, -(-sum(sizes) // BPE_TRAIN_BYTES))
    sample = dict(zip(files[::stride], sizes[::stride], strict=True))
    progress = _Progress("reading text for BPE", sample, progress_s)
    progress.say(
        f"learning BPE merges (vocab {vocab_size}) from {len(sample)} of {len(files)} "
        f"files, {progress.total_bytes / 2**20:.1f} MB"
    )

    def texts():
        for path in sample:
            try:
                yield from _text_pieces(path)
            except _Skipped:
                pass  # reported when tokenizing; the pieces of text before it only add counts
            progress.done(path)

    BPETokenizer.train(texts(), vocab_size).save(os.path.join(out, TOKENIZER_FILE))
    progress.say(f"learned BPE merges in {time.monotonic() - progress.start:.0f} s")


GOLDEN = (5**0.5 - 1) / 2


def _num_val(num_tokens: int, val_fraction: float, index: int) -> int:
    """How many of document `index`'s last tokens go to validation: val_fraction of them,
    rounded down. A document too short for one such token gives one in a share of about
    num_tokens * val_fraction of the documents (the golden-ratio sequence of the document's
    index decides which, the same under any number of ranks), so that a corpus of short
    documents still has a validation split."""
    share = num_tokens * val_fraction
    if share >= 1:
        return int(share)
    return int(share + (index * GOLDEN) % 1)


def _tokenize(
    files: list[tuple[int, str]],
    tok,
    out: str,
    rank: int,
    val_fraction: float,
    shard_tokens: int,
    progress: _Progress,
) -> dict:
    """Encode this rank's files (index in the corpus, path) and write its shards; returns its counts."""
    writers = {
        split: _ShardWriter(out, split, rank, shard_tokens, tok) for split in ("train", "val")
    }
    dtype = token_dtype(tok.vocab_size)
    used = 0
    skipped: dict = {}
    for index, path in files:
        try:  # the whole file first: one found to be binary at its end adds nothing
            parts = [tok.encode(piece).astype(dtype) for piece in _text_pieces(path)]
        except _Skipped as e:
            _note(skipped, str(e), path)
            progress.done(path)
            continue
        progress.done(path)
        used += 1
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype)
        num_train = len(ids) - _num_val(len(ids), val_fraction, index)
        for split, part in (("train", ids[:num_train]), ("val", ids[num_train:])):
            if len(part):
                writers[split].add(np.append(part, tok.eot_id))
    for writer in writers.values():
        writer.close()
    return {
        "files": used,
        "skipped": skipped,
        **{f"{split}_tokens": w.num_tokens for split, w in writers.items()},
        "shards": writers["train"].names + writers["val"].names,
    }


def prepare(
    inputs: list[str] | None,
    out: str,
    *,
    tokenizer: str = "byte",
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    shard_tokens: int = 50_000_000,
    overwrite: bool = False,
    comm=None,
    progress_s: float | None = 5.0,
) -> dict:
    """Tokenize `inputs` (files or folders; None = the standard library) into shards in `out`.

    With an MPI communicator of several ranks the files are shared out and each rank writes
    its own shards. Every rank returns the same summary: files, skipped (a count),
    skipped_why (reason -> [count, first path]), train_tokens, val_tokens, shards (file
    names), tokenizer, vocab_size, eot_id, ranks.

    Nothing in `out` is replaced until the whole corpus is written and has both splits: a
    DataError leaves the old shards as they were.

    Rank 0 reports its progress on stderr every `progress_s` seconds (None: never); the
    ranks' shares hold about the same number of bytes.
    """
    if tokenizer not in ("byte", "bpe"):
        raise ValueError(f"tokenizer must be 'byte' or 'bpe', got '{tokenizer}'")
    if not 0 < val_fraction < 1:  # training needs a validation split
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    if tokenizer == "bpe" and vocab_size < 257:
        raise ValueError(f"BPE vocab_size must be at least 257 (256 bytes + EOT), got {vocab_size}")
    comm = comm if comm is not None else _SingleRank()
    out = os.fspath(out)
    staging = os.path.join(out, STAGING)

    files, sizes, owners, skipped = _on_root(comm, lambda: _plan(inputs, out, overwrite, comm.size))
    try:
        summary = _prepare_into(
            staging,
            files,
            sizes,
            owners,
            comm,
            tokenizer=tokenizer,
            vocab_size=vocab_size,
            val_fraction=val_fraction,
            shard_tokens=shard_tokens,
            progress_s=progress_s,
        )
        summary["skipped_why"] = _merge_skipped([skipped, summary["skipped_why"]])
        summary["skipped"] = sum(n for n, _ in summary["skipped_why"].values())
        # Every rank sees the same totals, so all raise together, before old shards are touched.
        where = inputs or "the standard library"
        if summary["train_tokens"] == 0:
            raise DataError(
                f"no text to train on in {where}: {summary['files']} file(s) read, "
                f"{summary['skipped']} skipped"
                + "".join(
                    f"; {n} {why}, e.g. {e}" for why, (n, e) in summary["skipped_why"].items()
                )
            )
        if summary["val_tokens"] == 0:
            raise DataError(
                f"no validation tokens from the {summary['train_tokens']} tokens of {where} "
                f"with val_fraction {val_fraction}; add text or raise --val-fraction"
            )
        _on_root(comm, lambda: _publish(staging, out))
    except DataError:
        if comm.rank == 0:  # every rank is past writing: errors are raised by all together
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def _prepare_into(
    staging: str,
    files: list[str],
    sizes: list[int],
    owners: list[int],
    comm,
    *,
    tokenizer: str,
    vocab_size: int,
    val_fraction: float,
    shard_tokens: int,
    progress_s: float | None,
) -> dict:
    """Learn the tokenizer (BPE) and write every rank's shards into `staging`; the summary."""
    if tokenizer == "bpe":
        # One tokenizer for all ranks: rank 0 learns it from the whole corpus, the others wait.
        _on_root(comm, lambda: _train_bpe(files, sizes, vocab_size, staging, progress_s))
        tok = _on_all(comm, lambda: BPETokenizer.load(os.path.join(staging, TOKENIZER_FILE)))
    else:
        tok = ByteTokenizer()

    mine = [
        (i, f) for i, (f, owner) in enumerate(zip(files, owners, strict=True)) if owner == comm.rank
    ]
    progress = _Progress(
        "tokenizing" if comm.size == 1 else f"rank 0 of {comm.size} tokenizing its share",
        {f: sizes[i] for i, f in mine},
        progress_s if comm.rank == 0 else None,
    )
    counts = _on_all(
        comm, lambda: _tokenize(mine, tok, staging, comm.rank, val_fraction, shard_tokens, progress)
    )
    per_rank = comm.allgather(counts)
    summary = {
        key: sum(c[key] for c in per_rank) for key in ("files", "train_tokens", "val_tokens")
    }
    summary.update(
        skipped_why=_merge_skipped([c["skipped"] for c in per_rank]),
        shards=sorted(name for c in per_rank for name in c["shards"]),
        tokenizer=tok.name,
        vocab_size=tok.vocab_size,
        eot_id=tok.eot_id,
        ranks=comm.size,
    )
    return summary


def _world_comm():
    """COMM_WORLD when started by an MPI launcher with several ranks; None for plain `python`."""
    if not any(var in os.environ for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD if MPI.COMM_WORLD.size > 1 else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hpcllm.data.prepare",
        description="Tokenize text files into HDF5 token shards.",
    )
    parser.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="text files or folders (walked for .py .txt .md .rst and extension-less "
        "files); default: this Python's standard library",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the shards")
    parser.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte")
    parser.add_argument(
        "--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)"
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="last fraction of each document kept for validation, in (0, 1) (default 0.05)",
    )
    parser.add_argument(
        "--shard-tokens", type=int, default=50_000_000, help="maximum tokens per shard"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    args = parser.parse_args(argv)

    comm = _world_comm()
    rank = 0 if comm is None else comm.rank
    try:
        summary = prepare(
            args.input,
            args.out,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens,
            overwrite=args.overwrite,
            comm=comm,
        )
    except ValueError as e:  # DataError included; raised on every rank alike, so all exit together
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        if comm is not None:
            # A bug on one rank: end the whole job instead of leaving the others in a collective.
            traceback.print_exc()
            sys.stderr.flush()
            comm.Abort(1)
        raise
    if rank == 0:
        num_shards = {
            split: sum(name.startswith(split) for name in summary["shards"])
            for split in ("train", "val")
        }
        for reason, (count, example) in summary["skipped_why"].items():
            print(f"warning: skipped {count} file(s) {reason}, e.g. {example}", file=sys.stderr)
        print(
            f"prepared {summary['files']} files with the {summary['tokenizer']} tokenizer "
            f"(vocab {summary['vocab_size']}) on {summary['ranks']} rank(s) into {args.out}: "
            f"train {summary['train_tokens']:,} tokens in {num_shards['train']} shard(s), "
            f"val {summary['val_tokens']:,} tokens in {num_shards['val']} shard(s)"
        )


if __name__ == "__main__":
    main()
