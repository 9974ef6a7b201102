"""Checkpoints: atomic, layout-independent, and loadable without unpickling code.

A checkpoint is a folder `<run.dir>/checkpoints/step_000100/` holding

    model-pp{k}.pt   parameters of pipeline stage k, under the full model's names
    optim-pp{k}.pt   AdamW state of those parameters, keyed by the same names
    rng.pt           every rank's torch RNG state
    meta.json        step, loader position, config, grid layout (written last)

It is written into `.tmp-step_000100/` and renamed into place only when every
rank has finished, then `latest` is replaced atomically. A kill during a save
leaves the previous checkpoint untouched; the half-written `.tmp-*` folder is
reported and ignored. Loading uses `torch.load(weights_only=True)`, which only
rebuilds tensors and plain containers.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import torch
import torch.nn as nn

from hpcllm.watchdog import WATCHDOG

FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensor_file(obj, path: Path) -> None:
    # Slow but progress: the watchdog pauses for this rank's own writes only; the barriers
    # of the save stay watched.
    with WATCHDOG.paused(), open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's per-parameter state keyed by parameter name, not by position."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {names[id(p)]: optimizer.state[p] for p in params if p in optimizer.state}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    by_name = dict(model.named_parameters())
    for name, param_state in state.items():
        if name in by_name:
            p = by_name[name]
            optimizer.state[p] = {
                k: v.to(p.device) if torch.is_tensor(v) and v.dim() else v
                for k, v in param_state.items()
            }


def save(
    run_dir: str, step: int, *, grid, model: nn.Module, optimizer, extra: dict, keep: int = 2
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    world = grid.world
    root = Path(run_dir) / "checkpoints"
    name = f"step_{step:06d}"
    tmp = root / f".tmp-{name}"
    if world.Get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    world.Barrier()

    # One writer per pipeline stage: dp replicas hold identical weights.
    stage = grid.rank("pp")
    if grid.rank("dp") == 0 and grid.rank("tp") == 0:
        _save_tensor_file(model.state_dict(), tmp / f"model-pp{stage}.pt")
        _save_tensor_file(optimizer_state_by_name(model, optimizer), tmp / f"optim-pp{stage}.pt")
    rng = torch.get_rng_state()
    rng_states = world.gather(rng.numpy().tobytes(), root=0)  # a few KiB per rank: control data
    world.Barrier()  # every stage's files are on disk

    if world.Get_rank() == 0:
        _save_tensor_file(
            {
                str(r): torch.frombuffer(bytearray(s), dtype=torch.uint8)
                for r, s in enumerate(rng_states)
            },
            tmp / "rng.pt",
        )
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "grid": grid.dims,
            "world_size": world.Get_size(),
            "host": socket.gethostname(),
            **extra,
        }
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(name + "\n")
        os.replace(latest_tmp, root / "latest")
        _fsync_dir(root)
        for old in sorted(complete_checkpoints(root))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    world.Barrier()
    return root / name


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders whose meta.json exists (meta is written last)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / "meta.json").is_file())


def find_latest(run_dir: str) -> tuple[Path | None, list[Path]]:
    """The newest complete checkpoint, and any half-written ones to warn about."""
    root = Path(run_dir) / "checkpoints"
    partial = sorted(root.glob(".tmp-step_*")) if root.is_dir() else []
    complete = complete_checkpoints(root)
    return (complete[-1] if complete else None), partial


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {path}: unreadable meta.json ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path}: format_version {meta.get('format_version')} "
            f"is not {FORMAT_VERSION}"
        )
    return meta


def _load_stage_files(path: Path, prefix: str, device) -> dict:
    merged = {}
    for f in sorted(path.glob(f"{prefix}-pp*.pt")):
        merged.update(torch.load(f, map_location=device, weights_only=True))
    return merged


def load(path: Path, *, model: nn.Module, optimizer, world_rank: int, same_layout: bool) -> dict:
    """Restore model, optimizer and (same layout only) RNG state; returns meta.json."""
    meta = read_meta(path)
    device = next(model.parameters()).device
    # Every stage file is read and each rank keeps the names it owns, so any
    # pipeline layout can load any other's checkpoint.
    weights = _load_stage_files(path, "model", device)
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    if missing:
        raise ValueError(
            f"checkpoint {path} lacks parameters {missing[:3]}... for this model: "
            "was it written for a different model.n_layer?"
        )
    for key, value in own.items():
        if weights[key].shape != value.shape:
            raise ValueError(
                f"checkpoint {path}: parameter {key} has shape {tuple(weights[key].shape)}, "
                f"the model expects {tuple(value.shape)} (model config differs)"
            )
    model.load_state_dict({k: weights[k] for k in own})
    load_optimizer_state(model, optimizer, _load_stage_files(path, "optim", device))
    if same_layout:
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng[str(world_rank)])
    return meta
