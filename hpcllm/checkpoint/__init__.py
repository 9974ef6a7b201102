"""Checkpoints: sharded, layout-free, verified, and loadable without unpickling anything.

A checkpoint is a folder `<run.dir>/checkpoints/step_000100/` holding

    <file>-pp{p}-dp{d}-tp{t}.safetensors  the pieces the rank at these coordinates wrote,
                                          one file per `Piece.file` ("model", "optim", ...)
    rng.safetensors                       every rank's torch RNG state (gathered by rank 0)
    meta.json                             written last: step, the parts' records, config,
                                          grid, every file's size and CRC-32, tensor index

What is saved is what the parts of a rank's state declare (`pieces.Stateful`): each gives
the pieces of global tensors it holds (global name, global shape, region, replica or not) and
loads itself from a `pieces.Reader` that gives it any region of any tensor. This module knows
only pieces and files: each rank writes its pieces that are not replicas, meta.json's index
(`checkpoint/index.py`) records which file holds which region of each tensor, and a rank of
any other layout reads just the regions its parts ask for. What the parts are, and who
writes what, is in hpcllm/training/state.py.

Saving is atomic: everything goes into `.tmp-step_000100/`, fsync'ed; once every rank's
files are complete, rank 0 writes meta.json with their sizes and checksums and renames the
folder into place. Older checkpoints are deleted only after that. A failed save (a full
disk) removes the temporary folder and ends the run with one line saying that the previous
checkpoint is intact.

Loading verifies sizes and checksums and refuses anything that is not a safetensors file
(no pickle is ever loaded). All ranks agree on which checkpoint they load: if any rank finds
damage, every rank warns and falls back to the previous complete checkpoint, and no part is
changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import zlib
from collections import Counter
from collections.abc import Callable
from functools import partial
from math import prod
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hpcllm.checkpoint import index as index
from hpcllm.checkpoint.pieces import CheckpointError as CheckpointError
from hpcllm.checkpoint.pieces import Piece, Reader, Stateful
from hpcllm.runtime.rundir import replace_file
from hpcllm.runtime.watchdog import WATCHDOG

FORMAT_VERSION = 2
META = "meta.json"
RNG_FILE = "rng.safetensors"
_CHUNK = 1 << 22
# safetensors creates files readable by their owner only; give them the usual umask instead.
_UMASK = os.umask(0)
os.umask(_UMASK)


# ----------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tensor_file(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """Write `tensors` as a safetensors file, fsync'ed; returns its {"size", "crc32"}.

    Slow but progress: the watchdog pauses for this rank's own writes only; the collectives
    of the save stay watched.
    """
    with WATCHDOG.paused():
        try:
            # Writes straight from the tensors' memory, without a serialized copy.
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)
        except SafetensorError as e:  # safetensors reports I/O errors (a full disk) this way
            raise OSError(f"{path}: {e}") from None
        os.chmod(path, 0o666 & ~_UMASK)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        return {"size": path.stat().st_size, "crc32": file_crc32(path)}


def file_crc32(path: Path) -> int:
    """CRC-32 of a file, read in chunks (about 4 GB/s: 25 ms for 100 MB from the page cache)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def verify_file(folder: Path, name: str, record: dict) -> None:
    """Raise CheckpointError if `name` does not have the size and CRC-32 meta.json records."""
    path = folder / name
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{path}: missing or unreadable ({e.strerror})") from None
    if size != record["size"]:
        how = "truncated" if size < record["size"] else "grown"
        raise CheckpointError(f"{path}: {size} bytes, meta.json records {record['size']} ({how})")
    crc = file_crc32(path)
    if crc != record["crc32"]:
        raise CheckpointError(
            f"{path}: checksum mismatch (CRC-32 {crc:#010x}, meta.json records "
            f"{record['crc32']:#010x}): the file is corrupted"
        )


class TensorFiles:
    """Lazily opened safetensors files of one checkpoint; never unpickles."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._open: dict[str, object] = {}

    def get(self, file: str, key: str):
        """A lazy slice of tensor `key` in `file` (index it to read)."""
        try:
            if file not in self._open:
                self._open[file] = open_tensor_file(self.folder / file)
            return self._open[file].get_slice(key)  # type: ignore[attr-defined]  # safe_open handle
        except SafetensorError as e:
            raise CheckpointError(
                f"{self.folder / file}: {_describe_foreign(self.folder / file, e)}"
            ) from None

    def read(self, name: str, entry: dict, region: index.Region | None = None) -> torch.Tensor:
        """Tensor `name` (or `region` of it) assembled from the files the index names."""
        try:
            return index.read(entry, region or index.whole(entry["shape"]), self.get)
        except CheckpointError:
            raise
        except (SafetensorError, ValueError) as e:  # the index and the files' headers disagree
            raise CheckpointError(f"{self.folder}: tensor {name}: {e}") from None


def open_tensor_file(path: Path):
    """safe_open() a safetensors file (the one place checkpoint tensor files are opened)."""
    return safe_open(path, framework="pt", device="cpu")


def _describe_foreign(path: Path, error: Exception) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK") or head.startswith(b"\x80"):
        kind = "a PyTorch/pickle file"
    else:
        kind = "damaged or foreign"
    return (
        f"not a safetensors tensor file ({kind}: {error}); hpcllm never unpickles checkpoint files"
    )


# ----------------------------------------------------------------- saving


def write_pieces(tmp: Path, tag: str, pieces: list[Piece]) -> tuple[dict, dict]:
    """Write this rank's pieces (replicas left to their writers), one safetensors file per
    `piece.file`, `<file>-<tag>.safetensors`. A tensor with one piece here is stored under
    its global name, one with several (the boxes of a tensor-parallel shard, of a flat range
    of one) as name#0, name#1, ...
    Returns ({file: {"size", "crc32"}}, {tensor name: index entry}) for meta.json.
    """
    mine = [p for p in pieces if not p.replica]
    count = Counter(p.name for p in mine)
    stored: dict[str, dict[str, torch.Tensor]] = {}
    entries: dict[str, dict] = {}
    for p in mine:
        name = f"{p.file}-{tag}.safetensors"
        entry = entries.setdefault(p.name, index.entry(p.tensor, [], p.shape))
        key = p.name if count[p.name] == 1 else f"{p.name}#{len(entry['pieces'])}"
        stored.setdefault(name, {})[key] = p.tensor
        entry["pieces"].append(index.piece(name, key, p.region))
    files = {name: write_tensor_file(tmp / name, tensors) for name, tensors in stored.items()}
    return files, entries


def save(
    run_dir: str,
    step: int,
    *,
    grid,
    parts: list[Stateful],
    extra: dict | None = None,
    keep: int = 2,
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder.

    Each rank writes the pieces its `parts` hold (`Stateful.sharded_state`, replicas left to
    their writers); meta.json gets rank 0's parts' records and `extra` (config, tokenizer). A
    failed write on any rank (a full disk) ends the run on every rank with exit 2 and one line
    naming the folder.
    """
    world = grid.world
    rank = world.Get_rank()
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-{final.name}"
    error = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            error = f"rank 0: {e}"
    error = world.bcast(error)

    files: dict[str, dict] = {}
    entries: dict[str, dict] = {}
    if error is None:
        tag = f"pp{grid.rank('pp')}-dp{grid.rank('dp')}-tp{grid.rank('tp')}"
        try:
            files, entries = write_pieces(tmp, tag, [p for s in parts for p in s.sharded_state()])
        except OSError as e:
            error = f"rank {rank}: {e}"
    rng = torch.get_rng_state().numpy().tobytes()
    # Sizes, checksums, index entries and RNG state: small control data, pickled.
    gathered = world.gather((files, entries, rng, error), root=0)

    if rank == 0:
        errors = [g[3] for g in gathered if g[3] is not None]
        if not errors:
            records = {k: v for part in parts for k, v in part.record().items()}
            try:
                _commit(tmp, final, step, grid, gathered, {**records, **(extra or {})}, keep)
            except OSError as e:
                errors.append(f"rank 0: {e}")
        if errors:
            shutil.rmtree(tmp, ignore_errors=True)
            error = _save_failed_message(final, errors)
    error = world.bcast(error if rank == 0 else None)
    if error is not None:
        from hpcllm.runtime.spmd import StartupError

        # The same message on every rank: spmd_main prints it once and every rank exits 2.
        raise StartupError([(r, error) for r in range(world.Get_size())])
    return final


def _commit(
    tmp: Path, final: Path, step: int, grid, gathered: list, extra: dict, keep: int
) -> None:
    """Rank 0, once every rank's files are on disk: RNG file, meta.json, rename, cleanup."""
    files: dict[str, dict] = {}
    entries: dict[str, dict] = {}
    for rank_files, rank_entries, _, _ in gathered:
        files.update(rank_files)
        for key, entry in rank_entries.items():
            # A tensor split between writers (the pieces of several ranks) arrives
            # as pieces from each of them.
            if key in entries:
                entries[key]["pieces"] += entry["pieces"]
            else:
                entries[key] = entry
    for key, entry in entries.items():
        # One writer per element: the pieces tile the tensor (overlapping ones would add up
        # to more, and a reader could get either writer's copy).
        held = sum(
            p["flat"][1] - p["flat"][0] if "flat" in p else prod(p["length"])
            for p in entry["pieces"]
        )
        assert held == prod(entry["shape"]), (key, held, entry["shape"])
    rng = {
        f"rng/{r}": torch.frombuffer(bytearray(g[2]), dtype=torch.uint8)
        for r, g in enumerate(gathered)
    }
    files[RNG_FILE] = write_tensor_file(tmp / RNG_FILE, rng)
    for key, t in rng.items():
        entries[key] = index.entry(t, [index.piece(RNG_FILE, key, index.whole(t.shape))])
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "grid": grid.dims,
        "world_size": grid.world.Get_size(),
        "host": socket.gethostname(),
        **extra,
        "files": files,
        "tensors": entries,
    }
    with open(tmp / META, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    root = final.parent
    shutil.rmtree(final, ignore_errors=True)  # a re-save of a step (e.g. after a damaged one)
    os.rename(tmp, final)
    replace_file(root / "latest", final.name + "\n")
    _fsync_dir(root)
    # Only now, with the new checkpoint complete, do older ones go.
    for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _save_failed_message(final: Path, errors: list[str]) -> str:
    previous = [p for p in complete_checkpoints(final.parent) if p != final]
    kept = (
        f"the previous checkpoint {previous[-1]} is intact"
        if previous
        else "there is no earlier checkpoint"
    )
    more = f" (and {len(errors) - 1} more rank(s))" if len(errors) > 1 else ""
    full = (
        " Free some space and rerun to resume."
        if any(t in errors[0] for t in ("[Errno 28]", "No space left"))
        else ""
    )
    return f"could not save checkpoint {final}: {errors[0]}{more}; {kept}.{full}"


# ----------------------------------------------------------------- finding and validating


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders whose meta.json exists (meta is written last), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / META).is_file())


def set_aside(folder: Path, label: str) -> Path:
    """Move checkpoint `folder` out of the resume path as `<label>-step_NNNNNN` (kept for
    inspection, never deleted by checkpoint.keep), and point `latest` at what is left."""
    aside = folder.with_name(f"{label}-{folder.name}")
    n = 1
    while aside.exists():  # set aside at the same step before: keep both
        n += 1
        aside = folder.with_name(f"{label}-{folder.name}.{n}")
    folder.rename(aside)
    root = folder.parent
    remaining = complete_checkpoints(root)
    if remaining:
        replace_file(root / "latest", remaining[-1].name + "\n")
    else:
        (root / "latest").unlink(missing_ok=True)
    _fsync_dir(root)
    return aside


def find_latest(run_dir: str) -> tuple[Path | None, list[Path]]:
    """The newest complete checkpoint, and any half-written ones to warn about."""
    root = Path(run_dir) / "checkpoints"
    partial = sorted(root.glob(".tmp-step_*")) if root.is_dir() else []
    complete = complete_checkpoints(root)
    return (complete[-1] if complete else None), partial


# meta.json's keys and their types; a dict value names the keys of a nested object.
_INT, _STR, _DICT, _LIST = int, str, dict, list
_SCHEMA: dict = {
    "format_version": _INT,
    "step": _INT,
    "world_size": _INT,
    "grid": {"pp": _INT, "dp": _INT, "tp": _INT},
    "loader": {"consumed_samples": _INT, "seed": _INT},
    "samples": {"global_batch_size": _INT, "since_step": _INT, "since_sample": _INT},
    "config": {
        "model": {
            "n_layer": _INT,
            "n_head": _INT,
            "d_model": _INT,
            "vocab_size": _INT,
            "block_size": _INT,
            "tie_embeddings": bool,
        },
        "data": {"path": _STR},
    },
    "tokenizer": {"name": _STR, "vocab_size": _INT, "sha256": (str, type(None))},
    "files": _DICT,
    "tensors": _DICT,
}


def _check_types(value, schema, where: str, path: Path) -> None:
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: '{where}' is {_kind(value)}, expected an object")
        for key, sub in schema.items():
            if key not in value:
                raise CheckpointError(f"{path}: missing key '{where + '.' if where else ''}{key}'")
            _check_types(value[key], sub, f"{where + '.' if where else ''}{key}", path)
        return
    # JSON's true/false load as bool, which Python also counts as an int.
    ok = isinstance(value, schema) and (schema is bool or not isinstance(value, bool))
    if not ok:
        names = " or ".join(
            t.__name__ for t in (schema if isinstance(schema, tuple) else (schema,))
        )
        raise CheckpointError(f"{path}: '{where}' is {_kind(value)}, expected {names}")


def _kind(value) -> str:
    return f"{type(value).__name__} {json.dumps(value)[:40]}"


def read_meta(folder: Path) -> dict:
    """meta.json of checkpoint `folder`, checked for keys, types and consistency.

    Raises CheckpointError naming meta.json and what is wrong with it.
    """
    path = folder / META
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(meta).__name__}, not an object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {meta.get('format_version')!r} is not {FORMAT_VERSION} "
            "(a checkpoint of another hpcllm version, or not an hpcllm checkpoint)"
        )
    _check_types(meta, _SCHEMA, "", path)
    _check_index(meta, path)
    step = meta["step"]
    if not re.fullmatch(r"step_\d+", folder.name) or int(folder.name[5:]) != step:
        raise CheckpointError(f"{path}: step {step} disagrees with the folder name {folder.name}")
    s = meta["samples"]
    expected = s["since_sample"] + (step - s["since_step"]) * s["global_batch_size"]
    consumed = meta["loader"]["consumed_samples"]
    if consumed != expected or step < s["since_step"]:
        raise CheckpointError(
            f"{path}: step {step} disagrees with the loader position: {consumed} samples "
            f"consumed, {expected} expected ({s['since_sample']} at step {s['since_step']}, "
            f"then {s['global_batch_size']} per step)"
        )
    return meta


def _check_index(meta: dict, path: Path) -> None:
    """The index is a file from someone else: every name it gives must be a file of this
    folder, and every tensor exactly tiled by pieces that its files can hold, before anything
    is read or allocated."""
    for name, record in meta["files"].items():
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            raise CheckpointError(
                f"{path}: 'files' names {name!r}, which is not a plain file name in the "
                "checkpoint's own folder"
            )
        _check_types(record, {"size": _INT, "crc32": _INT}, f"files.{name}", path)
    held = dict.fromkeys(meta["files"], 0)  # bytes of tensor data each file must hold
    for name, entry in meta["tensors"].items():
        where = f"tensors.{name}"
        _check_types(entry, {"shape": _LIST, "dtype": _STR, "pieces": _LIST}, where, path)
        dtype = getattr(torch, entry["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{path}: '{where}.dtype' {entry['dtype']!r} is not a dtype")
        for p in entry["pieces"]:
            region = (
                {"flat": _LIST}
                if isinstance(p, dict) and "flat" in p
                else {"offset": _LIST, "length": _LIST}
            )
            _check_types(p, {"file": _STR, "key": _STR, **region}, f"{where}.pieces", path)
            if p["file"] not in meta["files"]:
                raise CheckpointError(
                    f"{path}: '{where}' names {p['file']}, which 'files' does not record"
                )
        try:
            volumes = index.check_tiling(entry["shape"], entry["pieces"])
        except ValueError as e:
            raise CheckpointError(f"{path}: '{where}': {e}") from None
        for p, volume in zip(entry["pieces"], volumes, strict=True):
            held[p["file"]] += volume * dtype.itemsize
    for name, nbytes in held.items():
        if nbytes > meta["files"][name]["size"]:
            file = path.parent / name
            if file.is_file() and not file.is_symlink():  # say what the file is, if it can
                try:
                    open_tensor_file(file)
                except SafetensorError as e:
                    raise CheckpointError(f"{file}: {_describe_foreign(file, e)}") from None
            raise CheckpointError(
                f"{path}: the index puts {nbytes:,} bytes of tensors in {name}, a file of "
                f"{meta['files'][name]['size']:,} bytes: not the tensor file it describes"
            )


# ----------------------------------------------------------------- loading


def load_newest(run_dir: str, *, grid, parts: list[Stateful], check=None):
    """Collective: restore the newest undamaged checkpoint into `parts`; returns (folder, meta)
    or None.

    Each part reads the regions it needs (`Stateful.load_sharded`), and each rank its RNG state
    when the layout is the one that wrote the checkpoint. If any rank finds damage, every rank
    warns (naming the file and the damage) and tries the previous checkpoint, and no part is
    changed; when none is left, every rank raises StartupError (exit 2). `check(meta, folder)`
    may raise ValueError for a checkpoint the user cannot resume from (another model): that
    ends the run too.
    """
    from hpcllm.runtime.spmd import StartupError, agree, print0

    world = grid.world
    root = Path(run_dir) / "checkpoints"
    # Rank 0 decides what exists, so every rank walks the same list.
    candidates = world.bcast(complete_checkpoints(root) if world.Get_rank() == 0 else None)
    rejected = []
    for folder in reversed(candidates):
        meta, damage = None, None
        if world.Get_rank() == 0:
            try:
                meta = read_meta(folder)
            except CheckpointError as e:
                damage = str(e)
        meta, damage = world.bcast((meta, damage))
        apply = None
        if damage is None:
            if check is not None:
                agree(world, partial(check, meta, folder))
            apply, mine = _read_own(folder, meta, grid, parts)
            found = [d for d in world.allgather(mine) if d is not None]
            damage = "; ".join(dict.fromkeys(found)) if found else None
        if damage is None:
            assert apply is not None  # no damage: every rank read its pieces
            for restore in apply:
                restore()
            return folder, meta
        rejected.append(damage)
        print0(f"warning: checkpoint {folder} is damaged: {damage}; trying the previous checkpoint")
    if rejected:
        message = (
            f"no usable checkpoint in {root}: every one is damaged ({'; '.join(rejected)}). "
            "Move the damaged folders away to start from scratch, or set checkpoint.resume false"
        )
        raise StartupError([(r, message) for r in range(world.Get_size())])
    return None


def _read_own(
    folder: Path, meta: dict, grid, parts: list[Stateful]
) -> tuple[list[Callable[[], None]] | None, str | None]:
    """What restores this rank's parts (and RNG state) from `folder`, and the damage it found.

    Verifying checksums is shared out: each file is checked by one of the ranks that read
    it (any rank for a file nobody reads), so no rank reads a file only to checksum it. A
    rank whose reads failed also checks the files it read, to name the damage.
    """
    world = grid.world
    files = TensorFiles(folder)
    touched: set[str] = set()

    def read(name: str, entry: dict, region: index.Region | None) -> torch.Tensor:
        region = region or index.whole(entry["shape"])
        touched.update(index.files_of(entry, region))
        return files.read(name, entry, region)

    reader = Reader(folder, meta, read)
    apply: list[Callable[[], None]] = []
    damage: str | None = None
    try:
        if meta["grid"] == grid.dims:
            rng = reader.read(f"rng/{world.Get_rank()}")
            apply.append(partial(torch.set_rng_state, rng))
        apply += [part.load_sharded(reader) for part in parts]
    except CheckpointError as e:
        damage = str(e)
    readers = world.allgather(sorted(touched))
    checks = [
        name
        for i, name in enumerate(sorted(meta["files"]))
        if (
            ranks := [r for r, f in enumerate(readers) if name in f]
            or list(range(world.Get_size()))
        )[i % len(ranks)]
        == world.Get_rank()
    ]
    if damage is not None:
        checks = sorted(touched & set(meta["files"]))
    for name in checks:
        try:
            verify_file(folder, name, meta["files"][name])
        except CheckpointError as e:
            return None, str(e)
    return (None, damage) if damage is not None else (apply, None)


def read_model(folder: Path, meta: dict) -> dict[str, torch.Tensor]:
    """Every stage's parameters merged into one state dict (for generation and export).

    Verifies the checksums of the files it reads; raises CheckpointError on damage.
    """
    entries = {k[len("model/") :]: e for k, e in meta["tensors"].items() if k.startswith("model/")}
    for name in sorted({p["file"] for e in entries.values() for p in e["pieces"]}):
        verify_file(folder, name, meta["files"][name])
    files = TensorFiles(folder)
    return {name: files.read(f"model/{name}", e) for name, e in entries.items()}


# ----------------------------------------------------------------- tokenizer record


def tokenizer_record(tokenizer, data_path: str) -> dict:
    """What meta.json records of the tokenizer: name, vocab size, sha256 of its BPE file."""
    from hpcllm.data.tokenizer import TOKENIZER_FILE

    bpe = Path(data_path) / TOKENIZER_FILE
    sha = hashlib.sha256(bpe.read_bytes()).hexdigest() if tokenizer.name == "bpe" else None
    return {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "sha256": sha}


def check_tokenizer(recorded: dict, tokenizer, data_path: str, folder: Path) -> None:
    """Refuse a tokenizer that is not the one the checkpoint was trained with."""
    now = tokenizer_record(tokenizer, data_path)
    diffs = [
        f"{k} {recorded[k]!r} in the checkpoint, {now[k]!r} in {data_path}"
        for k in now
        if recorded[k] != now[k]
    ]
    if diffs:
        raise ValueError(
            f"checkpoint {folder} was trained with another tokenizer: {'; '.join(diffs)}. "
            "Use the shard folder the run was trained on (generate and export: --data; "
            "training: --data.path), or another run.dir"
        )
