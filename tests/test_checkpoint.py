"""Checkpoints: the tensor index, who writes and reads which file, damage of every kind, a full
disk, and the tokenizer record.

Damage tests load in this process (one rank, MPI.COMM_SELF) from the checkpoints of one tiny
training run; a few end-to-end runs check what a user sees: the warning, the resumed losses,
exit 2 and one line. Multi-rank tests run in process (tests/mpi_batch.py).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from mpi4py import MPI

from hpcllm import checkpoint
from hpcllm.checkpoint import index as ix
from hpcllm.config import Config, load_toml
from hpcllm.data.tokenizer import ByteTokenizer
from hpcllm.distributed.parallelize import build_stage
from hpcllm.distributed.topology import Grid
from hpcllm.models.gpt import param_groups
from hpcllm.runtime.spmd import StartupError
from hpcllm.training.state import stateful_parts

from helpers import losses, prepare_data, run, train, write_corpus

MODEL_FILE = "model-pp0-dp0-tp0.safetensors"
OPTIM_FILE = "optim-pp0-dp0-tp0.safetensors"

# ----------------------------------------------------------------- the index, as pure functions


def split_pieces(full: torch.Tensor, cuts: list[tuple[ix.Region, slice | tuple | torch.Tensor]]):
    """Files holding the given regions of `full` (or the given tensors): ({file: tensor},
    index entry)."""
    files, pieces = {}, []
    for i, (region, where) in enumerate(cuts):
        name = f"f{i}"
        if isinstance(where, torch.Tensor):
            files[name] = where
        else:
            files[name] = (
                full[where].clone() if isinstance(region, ix.Box) else full.reshape(-1)[where]
            )
        pieces.append(ix.piece(name, "t", region))
    return files, ix.entry(full, pieces)


def zero_in_tp_cuts(full: torch.Tensor) -> list[tuple[ix.Region, torch.Tensor]]:
    """ZeRO-1 under tp, as it writes: two tp ranks' local tensors (rows of two segments each,
    like a fused qkv, and a padding row), each cut into dp ranges that end inside rows and in
    the padding; every range's runs (`placed_runs`) stored as the local elements they hold."""
    cuts = []
    for rows, local_rows, ranges in (
        ([(0, 2), (3, 5)], 5, [(0, 25), (25, 60)]),  # local row 4 is padding
        ([(2, 3), (5, 6)], 2, [(0, 7), (7, 24)]),
    ):
        parts, at = [], 0
        local = torch.zeros(local_rows, *full.shape[1:])
        for first, stop in rows:
            length = (stop - first, *full.shape[1:])
            parts.append((at, at + stop - first, ix.Box((first, 0, 0), length)))
            local[at : at + stop - first] = full[first:stop]
            at += stop - first
        placement = ix.Placement(tuple(full.shape), 0, tuple(parts))
        for start, stop in ranges:
            for a, b, box in ix.placed_runs(placement, local.shape, start, stop):
                cuts.append((box, local.reshape(-1)[a:b].reshape(box.length)))
    return cuts


FULL = torch.arange(6 * 4 * 3, dtype=torch.float32).reshape(6, 4, 3)
LAYOUTS = {
    # tensor parallel: cut along dim 1
    "boxes-dim1": [
        (ix.Box((0, 0, 0), (6, 1, 3)), (slice(None), slice(0, 1))),
        (ix.Box((0, 1, 0), (6, 3, 3)), (slice(None), slice(1, 4))),
    ],
    # cut along dim 0
    "boxes-dim0": [
        (ix.Box((0, 0, 0), (2, 4, 3)), slice(0, 2)),
        (ix.Box((2, 0, 0), (4, 4, 3)), slice(2, 6)),
    ],
    # ZeRO-1: flat ranges that do not end on row boundaries
    "flat": [
        (ix.Flat(0, 29), slice(0, 29)),
        (ix.Flat(29, 50), slice(29, 50)),
        (ix.Flat(50, 72), slice(50, 72)),
    ],
    # ZeRO-1 flat ranges of tensor-parallel shards, written as boxes
    "zero-in-tp": zero_in_tp_cuts(FULL),
}
REQUESTS = {
    "whole": (ix.Box((0, 0, 0), (6, 4, 3)), lambda t: t),
    "box": (ix.Box((1, 1, 1), (3, 3, 2)), lambda t: t[1:4, 1:4, 1:3]),
    "flat": (ix.Flat(5, 47), lambda t: t.reshape(-1)[5:47]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("request_kind", list(REQUESTS))
def test_index_assembles_any_region_from_any_pieces(layout, request_kind):
    files, entry = split_pieces(FULL, LAYOUTS[layout])
    region, expect = REQUESTS[request_kind]
    opened = []

    def get(file, key):
        opened.append(file)
        return files[file]

    assert torch.equal(ix.read(entry, region, get), expect(FULL))
    # Only the files that overlap the request are read.
    assert set(opened) == ix.files_of(entry, region)


def test_index_reads_only_overlapping_files_and_refuses_gaps():
    files, entry = split_pieces(FULL, LAYOUTS["boxes-dim0"])
    assert ix.files_of(entry, ix.Box((0, 0, 0), (2, 4, 3))) == {"f0"}
    assert ix.files_of(entry, ix.Flat(30, 40)) == {"f1"}
    gap = {**entry, "pieces": entry["pieces"][:1]}
    with pytest.raises(ValueError, match="cover 24 of the 72 elements"):
        ix.read(gap, ix.whole(FULL.shape), lambda f, k: files[f])
    scalar = torch.tensor(3.5)
    assert (
        ix.read(
            ix.entry(scalar, [ix.piece("s", "t", ix.whole(()))]), ix.whole(()), lambda f, k: scalar
        )
        == 3.5
    )


# ----------------------------------------------------------------- a tiny run and its checkpoints


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("ckpt-data") / "shards")


STEPS = 6


def run_settings(data_dir, run_dir, **more) -> dict:
    return {
        "data.path": data_dir,
        "run.dir": run_dir,
        "train.max_steps": STEPS,
        "checkpoint.every": 2,
        "checkpoint.keep": 3,
        **more,
    }


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """One rank, 6 steps, checkpoints at 2, 4 and 6."""
    run_dir = tmp_path_factory.mktemp("ckpt-ref") / "run"
    result = train(None, run_settings(data_dir, run_dir), timeout=120)
    assert result.returncode == 0, result
    return run_dir


@pytest.fixture
def damaged_run(reference, tmp_path):
    """A copy of the reference run without its step-6 checkpoint: step 4 is the newest."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_000006")
    (run_dir / "metrics.jsonl").unlink()
    return run_dir


def load_here(run_dir: Path):
    """checkpoint.load_newest on this process alone, into a fresh model of the run's config:
    (its result, the model)."""
    cfg = Config()
    load_toml(cfg, str(run_dir / "config.toml"))
    grid = Grid.build(MPI.COMM_SELF)
    model = build_stage(cfg, grid, torch.device("cpu"))
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    try:
        return checkpoint.load_newest(
            str(run_dir), grid=grid, parts=stateful_parts(grid, model, optimizer)
        ), model
    finally:
        grid.free()


def edit_meta(folder: Path, change) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    change(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def record_file(folder: Path, name: str) -> None:
    """Make meta.json record `name`'s current size and checksum (a foreign file that got in)."""
    data = (folder / name).read_bytes()
    edit_meta(
        folder, lambda m: m["files"].update({name: {"size": len(data), "crc32": zlib.crc32(data)}})
    )


class Evil:
    """Unpickling this runs a shell command that leaves a marker file."""

    marker: Path

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def truncate(folder: Path) -> None:
    path = folder / MODEL_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(folder: Path) -> None:
    path = folder / OPTIM_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4] = bytes(
        b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 4]
    )
    path.write_bytes(bytes(data))


def unreadable_meta(folder: Path) -> None:
    (folder / "meta.json").write_bytes(b'{"step": 4, \x00\xff')


def pickle_file(folder: Path) -> None:
    """Replace the model file by a pickle that, unpickled, creates UNPICKLED beside `folder`."""
    Evil.marker = folder.parent / "UNPICKLED"
    (folder / MODEL_FILE).write_bytes(pickle.dumps({"model/wte.weight": Evil()}))
    record_file(folder, MODEL_FILE)


def torch_save_file(folder: Path) -> None:
    torch.save({"wte.weight": torch.zeros(3)}, folder / MODEL_FILE)
    record_file(folder, MODEL_FILE)


def rename_folder(folder: Path) -> None:
    folder.rename(folder.with_name("step_000005"))


# name: (damage the step-4 folder, what the warning says besides the file's name)
DAMAGE = {
    "truncated tensor file": (truncate, f"{MODEL_FILE}: "),
    "flipped bytes, same size": (flip_bytes, f"{OPTIM_FILE}: checksum mismatch"),
    "meta.json unreadable": (unreadable_meta, "meta.json: unreadable"),
    "meta.json lacks a key": (
        lambda f: edit_meta(f, lambda m: m.pop("loader")),
        "meta.json: missing key 'loader'",
    ),
    "meta.json lacks a nested key": (
        lambda f: edit_meta(f, lambda m: m["config"]["model"].pop("n_layer")),
        "meta.json: missing key 'config.model.n_layer'",
    ),
    "meta.json wrong type": (
        lambda f: edit_meta(f, lambda m: m.update(step="4")),
        "meta.json: 'step' is str",
    ),
    "meta.json wrong nested type": (
        lambda f: edit_meta(f, lambda m: m["files"][MODEL_FILE].update(size=None)),
        f"meta.json: 'files.{MODEL_FILE}.size' is NoneType",
    ),
    "meta.json not an object": (
        lambda f: (f / "meta.json").write_text("[1, 2]"),
        "meta.json: holds a JSON list",
    ),
    "step disagrees with the folder name": (
        rename_folder,
        "step 4 disagrees with the folder name step_000005",
    ),
    "step disagrees with the loader position": (
        lambda f: edit_meta(f, lambda m: m["loader"].update(consumed_samples=9)),
        "step 4 disagrees with the loader position: 9 samples consumed, 8 expected",
    ),
    "a pickle instead of a tensor file": (
        pickle_file,
        f"{MODEL_FILE}: not a safetensors tensor file (a PyTorch/pickle file",
    ),
    "a torch.save file": (
        torch_save_file,
        f"{MODEL_FILE}: not a safetensors tensor file (a PyTorch/pickle file",
    ),
    # An index is a file from someone else: every lie in it is damage, named.
    "a file name outside the folder": (
        lambda f: edit_meta(f, lambda m: rename_file_in_index(m, MODEL_FILE, "../model.bin")),
        "'files' names '../model.bin', which is not a plain file name",
    ),
    "an absolute file name": (
        lambda f: edit_meta(f, lambda m: rename_file_in_index(m, MODEL_FILE, "/etc/passwd")),
        "'files' names '/etc/passwd', which is not a plain file name",
    ),
    "overlapping pieces": (
        lambda f: edit_meta(f, overlap_two_pieces),
        "overlap",
    ),
    "a piece out of bounds": (
        lambda f: edit_meta(f, lambda m: first_box(m)["offset"].__setitem__(0, 10**6)),
        "lies outside shape",
    ),
    "a declared shape larger than the files": (
        lambda f: edit_meta(f, grow_a_tensor),
        "bytes of tensors in",
    ),
    "a dtype the file does not hold": (  # as many bytes: only the file's header can tell
        lambda f: edit_meta(f, lambda m: m["tensors"]["model/wte.weight"].update(dtype="int32")),
        "the index says torch.int32",
    ),
}


def rename_file_in_index(meta: dict, old: str, new: str) -> None:
    meta["files"][new] = meta["files"].pop(old)
    for entry in meta["tensors"].values():
        for p in entry["pieces"]:
            if p["file"] == old:
                p["file"] = new


def first_box(meta: dict) -> dict:
    return next(
        p for e in meta["tensors"].values() if e["shape"] for p in e["pieces"] if "offset" in p
    )


def overlap_two_pieces(meta: dict) -> None:
    """A matrix's one piece split in two that both hold its first half of the rows: the
    element count adds up, but the second half would never be read (a gap, filled with
    whatever memory held)."""
    entry = next(
        e for e in meta["tensors"].values() if len(e["shape"]) == 2 and e["shape"][0] % 2 == 0
    )
    half = [entry["shape"][0] // 2, entry["shape"][1]]
    piece = entry["pieces"][0]
    entry["pieces"] = [{**piece, "offset": [0, 0], "length": half} for _ in range(2)]


def grow_a_tensor(meta: dict) -> None:
    """A 65 GB tensor declared, its one piece enlarged to match: no allocation may follow."""
    entry = meta["tensors"]["model/wte.weight"]
    entry["shape"] = [2**17, 2**17]
    entry["pieces"] = [{**entry["pieces"][0], "offset": [0, 0], "length": [2**17, 2**17]}]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_with_a_warning(damage, damaged_run, capsys):
    ckpts = damaged_run / "checkpoints"
    spoil, says = DAMAGE[damage]
    spoil(ckpts / "step_000004")
    (found, model) = load_here(damaged_run)
    out = capsys.readouterr().out
    assert found is not None and found[0] == ckpts / "step_000002", out
    assert found[1]["step"] == 2
    warning = next(line for line in out.splitlines() if line.startswith("warning: checkpoint"))
    assert says in warning and "trying the previous checkpoint" in warning, out
    assert "weights_only" not in out
    # The fallback really restored step 2's weights.
    weights = checkpoint.read_model(ckpts / "step_000002", found[1])
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[name]), name
    assert not (damaged_run / "checkpoints" / "UNPICKLED").exists()


def test_no_usable_checkpoint_stops_everyone_naming_each_reason(damaged_run, capsys):
    ckpts = damaged_run / "checkpoints"
    truncate(ckpts / "step_000004")
    unreadable_meta(ckpts / "step_000002")
    with pytest.raises(StartupError) as e:
        load_here(damaged_run)
    text = str(e.value)
    assert f"no usable checkpoint in {ckpts}" in text
    assert f"step_000004/{MODEL_FILE}: " in text and "step_000002/meta.json: unreadable" in text


def test_a_run_with_a_damaged_newest_checkpoint_resumes_from_the_previous(
    reference, damaged_run, data_dir
):
    ckpts = damaged_run / "checkpoints"
    truncate(ckpts / "step_000004")
    result = train(None, run_settings(data_dir, damaged_run), timeout=120)
    assert result.returncode == 0, result
    assert (
        f"warning: checkpoint {ckpts / 'step_000004'} is damaged: {ckpts / 'step_000004' / MODEL_FILE}"
        in result.stdout
    )
    assert f"resumed from {ckpts / 'step_000002'} at step 2" in result.stdout, result
    ref, got = losses(reference), losses(damaged_run)
    assert sorted(got) == [3, 4, 5, 6]
    assert all(got[s] == ref[s] for s in got), (got, ref)
    # The damaged folder was replaced by a good step-4 checkpoint.
    checkpoint.read_meta(ckpts / "step_000004")


def test_a_resume_with_another_global_batch_keeps_later_checkpoints_valid(damaged_run, data_dir):
    """The step is checked against the loader position from where the batch size changed."""
    ckpts = damaged_run / "checkpoints"
    shutil.rmtree(ckpts / "step_000004")
    bigger = {"train.micro_batch_size": 4, "checkpoint.keep": 1}
    result = train(None, run_settings(data_dir, damaged_run, **bigger, **{"train.max_steps": 4}))
    assert result.returncode == 0 and "at step 2 (sample 4)" in result.stdout, result
    meta = checkpoint.read_meta(ckpts / "step_000004")
    assert meta["loader"]["consumed_samples"] == 4 + 2 * 4
    assert meta["samples"] == {"global_batch_size": 4, "since_step": 2, "since_sample": 4}
    result = train(None, run_settings(data_dir, damaged_run, **bigger))
    assert result.returncode == 0 and "warning" not in result.stdout, result
    assert f"resumed from {ckpts / 'step_000004'} at step 4 (sample 12)" in result.stdout, result


def test_a_run_with_no_usable_checkpoint_exits_2_with_the_reasons(damaged_run, data_dir):
    ckpts = damaged_run / "checkpoints"
    for folder in ("step_000002", "step_000004"):
        pickle_file(ckpts / folder)
    result = train(None, run_settings(data_dir, damaged_run), timeout=120)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr + result.stdout
    assert f"no usable checkpoint in {ckpts}" in result.stderr, result
    assert f"step_000002/{MODEL_FILE}: not a safetensors tensor file" in result.stderr, result
    assert not (damaged_run / "checkpoints" / "UNPICKLED").exists()


# ----------------------------------------------------------------- several ranks, in process


def tiny_stage(grid: Grid):
    """A 2-block GPT stage of `grid`'s layout after one AdamW step, and its run config."""
    cfg = Config()
    cfg.model.arch = "gpt2"
    cfg.model.n_layer, cfg.model.n_head, cfg.model.d_model = 2, 2, 16
    cfg.model.vocab_size, cfg.model.block_size, cfg.train.seq_len = 257, 8, 8
    cfg.parallel.pp = grid.size("pp")
    model = build_stage(cfg, grid, torch.device("cpu"))
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-2)
    optimizer.step()
    return cfg, model, optimizer


def run_extra(cfg: Config, step: int) -> dict:
    """What hpcllm.train puts into meta.json besides the tensors (one sample per step)."""
    return {
        "loader": {"consumed_samples": step, "seed": 0},
        "samples": {"global_batch_size": 1, "since_step": 0, "since_sample": 0},
        "config": cfg.to_dict(),
        "tokenizer": checkpoint.tokenizer_record(ByteTokenizer(), ""),
    }


def save_tiny(run_dir: Path, step: int, grid: Grid, stage, keep: int = 2) -> Path:
    cfg, model, optimizer = stage
    return checkpoint.save(
        str(run_dir),
        step,
        grid=grid,
        parts=stateful_parts(grid, model, optimizer),
        extra=run_extra(cfg, step),
        keep=keep,
    )


def shared_dir(comm, tmp_path) -> Path:
    return Path(comm.bcast(str(tmp_path) if comm.rank == 0 else None))


@pytest.mark.mpi(ranks=2, timeout=120)
def test_each_rank_writes_and_reads_only_what_it_owns(comm, tmp_path, monkeypatch):
    root = shared_dir(comm, tmp_path)
    opened: list[str] = []
    checksummed: list[str] = []
    open_file, crc = checkpoint.open_tensor_file, checkpoint.file_crc32
    monkeypatch.setattr(
        checkpoint, "open_tensor_file", lambda p: opened.append(p.name) or open_file(p)
    )
    monkeypatch.setattr(checkpoint, "file_crc32", lambda p: checksummed.append(p.name) or crc(p))

    # pp=2: each rank is one stage and writes and reads that stage's shards only.
    grid = Grid.build(comm, pp=2)
    cfg, model, optimizer = tiny_stage(grid)
    folder = save_tiny(root / "pp2", 1, grid, (cfg, model, optimizer))
    assert sorted(p.name for p in folder.iterdir()) == [
        "meta.json",
        "model-pp0-dp0-tp0.safetensors",
        "model-pp1-dp0-tp0.safetensors",
        "optim-pp0-dp0-tp0.safetensors",
        "optim-pp1-dp0-tp0.safetensors",
        "rng.safetensors",
    ]
    _, fresh, fresh_opt = tiny_stage(grid)
    opened.clear(), checksummed.clear()
    found = checkpoint.load_newest(
        str(root / "pp2"), grid=grid, parts=stateful_parts(grid, fresh, fresh_opt)
    )
    assert found is not None and found[0] == folder
    mine = {f"model-pp{comm.rank}-dp0-tp0.safetensors", f"optim-pp{comm.rank}-dp0-tp0.safetensors"}
    assert set(opened) == mine | {"rng.safetensors"}, opened
    assert set(checksummed) - {"rng.safetensors"} == mine, checksummed
    assert all(checksummed.count(n) == 1 for n in checksummed)
    # Every file was verified by exactly one rank.
    everyone = comm.allgather(checksummed)
    assert sorted(n for names in everyone for n in names) == sorted(
        checkpoint.read_meta(folder)["files"]
    )
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), name
        assert torch.equal(optimizer.state[p]["exp_avg"], fresh_opt.state[q]["exp_avg"]), name
    grid.free()

    # dp=2: one writer (dp rank 0); both replicas read the same shards.
    grid = Grid.build(comm, dp=2)
    cfg, model, optimizer = tiny_stage(grid)
    folder = save_tiny(root / "dp2", 1, grid, (cfg, model, optimizer))
    assert sorted(p.name for p in folder.glob("*-pp*")) == [
        "model-pp0-dp0-tp0.safetensors",
        "optim-pp0-dp0-tp0.safetensors",
    ]
    grid.free()


@pytest.mark.mpi(ranks=2, timeout=120)
def test_damage_one_rank_sees_makes_every_rank_fall_back(comm, tmp_path, capsys):
    root = shared_dir(comm, tmp_path)
    grid = Grid.build(comm, pp=2)
    folder = save_tiny(root, 1, grid, tiny_stage(grid))
    folder = save_tiny(root, 2, grid, tiny_stage(grid))
    if comm.rank == 0:  # only rank 1 (stage 1) reads this file
        truncate_to = folder / "model-pp1-dp0-tp0.safetensors"
        truncate_to.write_bytes(truncate_to.read_bytes()[:100])
    comm.Barrier()
    _, fresh, fresh_opt = tiny_stage(grid)
    found = checkpoint.load_newest(
        str(root), grid=grid, parts=stateful_parts(grid, fresh, fresh_opt)
    )
    assert found is not None and found[0].name == "step_000001"
    out = capsys.readouterr().out
    if comm.rank == 0:
        assert (
            f"warning: checkpoint {folder} is damaged: {folder}/model-pp1-dp0-tp0.safetensors: 100 bytes"
            in out
        ), out
    grid.free()


@pytest.mark.mpi(ranks=2, timeout=120)
def test_full_disk_on_one_rank_keeps_the_previous_checkpoint(comm, tmp_path, monkeypatch):
    root = shared_dir(comm, tmp_path)
    grid = Grid.build(comm, pp=2)
    stage = tiny_stage(grid)
    save_tiny(root, 1, grid, stage, keep=1)
    write = checkpoint.write_tensor_file

    def full_disk(path, tensors):
        if comm.rank == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write(path, tensors)

    monkeypatch.setattr(checkpoint, "write_tensor_file", full_disk)
    with pytest.raises(StartupError) as e:
        save_tiny(root, 2, grid, stage, keep=1)
    ckpts = root / "checkpoints"
    text = str(e.value)
    assert "\n" not in text
    assert text.startswith(
        f"could not save checkpoint {ckpts / 'step_000002'}: rank 1: [Errno 28]"
    ), text
    assert f"the previous checkpoint {ckpts / 'step_000001'} is intact" in text, text
    comm.Barrier()
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000001"]
    checkpoint.read_meta(ckpts / "step_000001")
    grid.free()


# ----------------------------------------------------------------- a really full disk


def test_full_disk_ends_the_run_with_one_line(data_dir, tmp_path):
    """The checkpoints folder on a tmpfs that holds one checkpoint but not two."""
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=800k", "tmpfs", str(ckpts)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); the in-process test covers ENOSPC"
        )
    try:
        settings = run_settings(data_dir, run_dir, **{"train.max_steps": 4, "checkpoint.keep": 1})
        result = train(2, settings, timeout=120)
        assert result.returncode == 2, result
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "Traceback" not in result.stderr, result
        assert f"could not save checkpoint {ckpts / 'step_000004'}" in errors[0], result
        assert "No space left on device" in errors[0], result
        assert f"the previous checkpoint {ckpts / 'step_000002'} is intact" in errors[0], result
        assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000002"]
        meta = checkpoint.read_meta(ckpts / "step_000002")
        for name, record in meta["files"].items():
            checkpoint.verify_file(ckpts / "step_000002", name, record)
    finally:
        subprocess.run(["umount", str(ckpts)], check=True)


# ----------------------------------------------------------------- tokenizer record


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    from hpcllm.data.prepare import prepare

    root = tmp_path_factory.mktemp("ckpt-bpe")
    corpus = write_corpus(root / "corpus", num_docs=2, words_per_doc=500)
    prepare([str(corpus)], str(root / "shards"), tokenizer="bpe", vocab_size=300, val_fraction=0.1)
    return root / "shards"


def generate(*args: str):
    return run([sys.executable, "-m", "hpcllm.generate", "--tokens", "5", *args], timeout=60)


def test_generate_refuses_another_tokenizer(reference, bpe_dir, data_dir):
    ckpt = reference / "checkpoints" / "step_000006"
    result = generate("--checkpoint", str(ckpt), "--data", str(bpe_dir))
    assert result.returncode == 2, result
    assert f"checkpoint {ckpt} was trained with another tokenizer" in result.stderr, result
    assert f"name 'byte' in the checkpoint, 'bpe' in {bpe_dir}" in result.stderr, result
    assert result.stdout == ""
    assert generate("--checkpoint", str(ckpt), "--data", str(data_dir)).returncode == 0


def test_tokenizer_record_names_the_bpe_file_hash(bpe_dir, tmp_path):
    from hpcllm.generate import load_run_tokenizer

    tokenizer = load_run_tokenizer(str(bpe_dir))
    record = checkpoint.tokenizer_record(tokenizer, str(bpe_dir))
    assert record["name"] == "bpe" and record["vocab_size"] == tokenizer.vocab_size
    assert len(record["sha256"]) == 64
    checkpoint.check_tokenizer(record, tokenizer, str(bpe_dir), tmp_path)
    # Same name and size, another merge table.
    with pytest.raises(ValueError, match=r"sha256 '0+' in the checkpoint"):
        checkpoint.check_tokenizer(
            {**record, "sha256": "0" * 64}, tokenizer, str(bpe_dir), tmp_path
        )


def test_generate_reports_a_damaged_or_foreign_checkpoint(reference, tmp_path):
    ckpt = tmp_path / "step_000006"
    shutil.copytree(reference / "checkpoints" / "step_000006", ckpt)
    pickle_file(ckpt)
    result = generate("--checkpoint", str(ckpt))
    assert result.returncode == 2, result
    assert f"{ckpt / MODEL_FILE}: not a safetensors tensor file" in result.stderr, result
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr
    assert not (tmp_path / "UNPICKLED").exists()
