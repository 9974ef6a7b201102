"""Turn text files into token shards for training.

    python -m hpcllm.data.prepare --out data/stdlib                 # embedded default corpus
    python -m hpcllm.data.prepare --input notes/ book.txt --out data/mine --tokenizer bpe
    mpirun -np 4 python -m hpcllm.data.prepare --out data/stdlib    # ranks share the files

Without --input the corpus is this Python's own standard library (about 12 MB of source),
so a machine with no network still has real text to train on.

Each file is one document. The last `val_fraction` of each document's tokens goes to the
validation split and the rest to training, each part followed by the EOT id, so the split
does not depend on the number of ranks. Under MPI the sorted file list is cut into
contiguous, size-balanced ranges; rank r writes `{split}-{r:04d}-{k:04d}.h5`, so reading
the shards in name order gives the same token stream as a single-rank run.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import sysconfig
import time
import traceback

import numpy as np

from hpcllm.data.shards import DataError, token_dtype, write_shard
from hpcllm.data.tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", "")  # "" = no extension (README, LICENSE, ...)
# Test suites are large, repetitive and full of deliberately odd code; not what we want to model.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
BPE_TRAIN_BYTES = 64 * 2**20  # BPE learns merges from at most this much text (keeps it ~1 minute)


def default_corpus_files() -> list[str]:
    """The `.py` files of the running interpreter's standard library, without tests and site-packages."""
    files = []
    for root, dirs, names in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        files += [os.path.join(root, n) for n in names if n.endswith(".py")]
    return sorted(files)


def find_text_files(inputs: list[str]) -> list[str]:
    """Files named in `inputs`, plus text files found by walking the folders among them, sorted."""
    files = set()
    for given in inputs:
        if os.path.isfile(given):
            files.add(os.path.normpath(given))
        elif os.path.isdir(given):
            for root, dirs, names in os.walk(given):
                dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
                files.update(
                    os.path.normpath(os.path.join(root, n))
                    for n in names
                    if not n.startswith(".") and os.path.splitext(n)[1] in TEXT_SUFFIXES
                )
        else:
            raise DataError(f"input {given} does not exist")
    if not files:
        raise DataError(
            f"no text files ({' '.join(s or 'no extension' for s in TEXT_SUFFIXES)}) "
            f"under {' '.join(inputs)}"
        )
    return sorted(files)


def _read_text(path: str) -> str | None:
    """The file as text, or None if it cannot be read or is not UTF-8 text."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        # NUL bytes are valid UTF-8 but mark binary files.
        return None if b"\0" in data else data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


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


def _plan(inputs, out: str, overwrite: bool, size: int) -> tuple[list[str], list[int]]:
    """Rank 0's look at the filesystem: the corpus files, their owner ranks, and a clean --out."""
    files = default_corpus_files() if inputs is None else find_text_files(inputs)
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
    # Old shards, a stale tokenizer and leftovers of an interrupted run must not mix with the new data.
    for pattern in ("train-*.h5*", "val-*.h5*", TOKENIZER_FILE + "*"):
        for path in glob.glob(os.path.join(glob.escape(out), pattern)):
            os.remove(path)
    sizes = [os.path.getsize(f) for f in files]
    return files, _assign_ranks(sizes, size)


class _Progress:
    """Files and bytes done, as a line on stderr every `every_s` seconds (None: silent)."""

    def __init__(self, what: str, files: list[str], every_s: float | None):
        self.what, self.every_s = what, every_s
        self.sizes = {f: os.path.getsize(f) for f in files} if every_s is not None else {}
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


def _train_bpe(files: list[str], vocab_size: int, out: str, progress_s: float | None) -> None:
    total = sum(os.path.getsize(f) for f in files)
    stride = max(
        1, -(-total // BPE_TRAIN_BYTES)
    )  # every stride-th file keeps the sample spread out
    sample = files[::stride]
    progress = _Progress("reading text for BPE", sample, progress_s)
    progress.say(
        f"learning BPE merges (vocab {vocab_size}) from {len(sample)} of {len(files)} "
        f"files, {progress.total_bytes / 2**20:.1f} MB"
    )

    def texts():
        for path in sample:
            text = _read_text(path)
            progress.done(path)
            if text:
                yield text

    BPETokenizer.train(texts(), vocab_size).save(os.path.join(out, TOKENIZER_FILE))
    progress.say(f"learned BPE merges in {time.monotonic() - progress.start:.0f} s")


def _tokenize(
    files: list[str],
    tok,
    out: str,
    rank: int,
    val_fraction: float,
    shard_tokens: int,
    progress: _Progress,
) -> dict:
    """Encode this rank's files and write its shards; returns its counts."""
    writers = {
        split: _ShardWriter(out, split, rank, shard_tokens, tok) for split in ("train", "val")
    }
    used = skipped = 0
    for path in files:
        text = _read_text(path)
        progress.done(path)
        if text is None:
            skipped += 1
            continue
        used += 1
        ids = tok.encode(text)
        num_train = len(ids) - int(len(ids) * val_fraction)
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
    its own shards. Every rank returns the same summary: files, skipped, train_tokens,
    val_tokens, shards (file names), tokenizer, vocab_size, eot_id, ranks.

    Rank 0 reports its progress on stderr every `progress_s` seconds (None: never); the
    ranks' shares hold about the same number of bytes.
    """
    if tokenizer not in ("byte", "bpe"):
        raise ValueError(f"tokenizer must be 'byte' or 'bpe', got '{tokenizer}'")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    # Checked here, not when BPE training would fail: by then --overwrite has removed the old shards.
    if tokenizer == "bpe" and vocab_size < 257:
        raise ValueError(f"BPE vocab_size must be at least 257 (256 bytes + EOT), got {vocab_size}")
    comm = comm if comm is not None else _SingleRank()
    out = os.fspath(out)

    files, owners = _on_root(comm, lambda: _plan(inputs, out, overwrite, comm.size))
    if tokenizer == "bpe":
        # One tokenizer for all ranks: rank 0 learns it from the whole corpus, the others wait.
        _on_root(comm, lambda: _train_bpe(files, vocab_size, out, progress_s))
        tok = _on_all(comm, lambda: BPETokenizer.load(os.path.join(out, TOKENIZER_FILE)))
    else:
        tok = ByteTokenizer()

    mine = [f for f, owner in zip(files, owners, strict=True) if owner == comm.rank]
    progress = _Progress(
        "tokenizing" if comm.size == 1 else f"rank 0 of {comm.size} tokenizing its share",
        mine,
        progress_s if comm.rank == 0 else None,
    )
    counts = _on_all(
        comm, lambda: _tokenize(mine, tok, out, comm.rank, val_fraction, shard_tokens, progress)
    )
    per_rank = comm.allgather(counts)
    totals = ("files", "skipped", "train_tokens", "val_tokens")
    summary = {key: sum(c[key] for c in per_rank) for key in totals}
    if summary["train_tokens"] == 0:  # every rank sees the same totals, so all raise together
        raise DataError(
            f"no text to train on in {inputs or 'the standard library'}: {summary['files']} "
            f"file(s) read, {summary['skipped']} skipped as unreadable or not UTF-8"
        )
    summary.update(
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
        help="last fraction of each document kept for validation (default 0.05)",
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
        if summary["skipped"]:
            print(
                f"warning: skipped {summary['skipped']} file(s) that are unreadable or not UTF-8 text",
                file=sys.stderr,
            )
        print(
            f"prepared {summary['files']} files with the {summary['tokenizer']} tokenizer "
            f"(vocab {summary['vocab_size']}) on {summary['ranks']} rank(s) into {args.out}: "
            f"train {summary['train_tokens']:,} tokens in {num_shards['train']} shard(s), "
            f"val {summary['val_tokens']:,} tokens in {num_shards['val']} shard(s)"
        )


if __name__ == "__main__":
    main()
