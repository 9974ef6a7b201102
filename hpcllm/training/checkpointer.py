"""The trainer's checkpoints: saved every checkpoint.every steps, at the end and on a stop;
resumed from the newest undamaged one in run.dir, with a warning for what cannot continue
exactly (an interrupted save, another global batch or data.path, compression state of
another layout). What is saved is the parts' pieces and records (training/state.py)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from hpcllm import checkpoint
from hpcllm.checkpoint.pieces import Piece, Reader, Stateful
from hpcllm.config import Config
from hpcllm.distributed.topology import Grid
from hpcllm.generate import load_run_tokenizer
from hpcllm.models.gpt import ModelConfig
from hpcllm.optim.local_sgd import check_resume
from hpcllm.runtime.spmd import print0
from hpcllm.runtime.watchdog import WATCHDOG
from hpcllm.training.state import stateful_parts

if TYPE_CHECKING:
    from hpcllm.training.trainer import Trainer


class Checkpointer:
    """Saves and restores everything a trainer's step depends on: the parts of
    `training/state.py` (model, optimizer, local SGD, gradient compression), the loader's
    position and the step."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.every = trainer.cfg.checkpoint.every
        self.saved_at = trainer.step  # the step of the newest checkpoint, saved or resumed
        self.parts: list[Stateful] = [
            *stateful_parts(
                trainer.grid,
                trainer.model,
                trainer.optimizer,
                local_sgd=trainer.local_sgd,
                compressor=trainer.ddp.compressor,
                step=lambda: trainer.step,
                max_steps=trainer.cfg.train.max_steps,
            ),
            LoaderState(trainer),
            Progress(trainer),
        ]

    def should_save(self, step: int, last: bool, stopped: str | None) -> bool:
        return bool(self.every and step % self.every == 0) or last or bool(stopped)

    def save(self) -> Path:
        tr = self.trainer
        tokenizer = None
        if tr.grid.world.Get_rank() == 0:
            tokenizer = checkpoint.tokenizer_record(
                load_run_tokenizer(tr.cfg.data.path), tr.cfg.data.path
            )
        # Watched: a peer that stops during the save must not hang this rank in its barriers.
        with WATCHDOG.watch(f"checkpoint save at step {tr.step}"):
            path = checkpoint.save(
                tr.cfg.run.dir,
                tr.step,
                grid=tr.grid,
                parts=self.parts,
                keep=tr.cfg.checkpoint.keep,
                extra={"config": tr.cfg.to_dict(), "tokenizer": tokenizer},
            )
        self.saved_at = tr.step
        return path

    def resume(self, world) -> None:
        """Continue from the newest undamaged checkpoint in run.dir, if there is one."""
        trainer = self.trainer
        cfg = trainer.cfg
        latest, interrupted = checkpoint.find_latest(cfg.run.dir)
        for p in interrupted:
            print0(
                f"warning: ignoring incomplete checkpoint {p} (its save was interrupted); "
                f"resuming from {latest or 'scratch'}"
            )
        found = checkpoint.load_newest(
            cfg.run.dir,
            grid=trainer.grid,
            parts=self.parts,
            check=lambda meta, path: check_resumable(meta, cfg, trainer.grid, path),
        )
        if found is None:
            return
        path, meta = found
        self.saved_at = meta["step"]
        warn_if_not_exact_continuation(meta["config"], trainer, path)
        moved = (
            ""
            if meta["grid"] == trainer.grid.dims
            else f", layout {meta['grid']} -> {trainer.grid.dims}"
        )
        print0(
            f"resumed from {path} at step {trainer.step} (sample {trainer.loader.consumed_samples}{moved})"
        )


class LoaderState:
    """The loader's position: meta.json's `loader` record, no tensors."""

    def __init__(self, trainer: Trainer):
        self.loader = trainer.loader

    def sharded_state(self) -> list[Piece]:
        return []

    def record(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_sharded(self, reader: Reader) -> Callable[[], None]:
        return partial(self.loader.load_state_dict, reader.meta["loader"])


class Progress:
    """The step (meta.json's `step`, written by the checkpointer) and where the current
    global batch size took over (`samples`), which lets a load check the step against the
    loader position."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def sharded_state(self) -> list[Piece]:
        return []

    def record(self) -> dict:
        tr = self.trainer
        since_step, since_sample = tr.samples_since
        return {
            "samples": {
                "global_batch_size": tr.loader.global_batch_size,
                "since_step": since_step,
                "since_sample": since_sample,
            }
        }

    def load_sharded(self, reader: Reader) -> Callable[[], None]:
        return partial(self._apply, reader.meta)

    def _apply(self, meta: dict) -> None:
        tr = self.trainer
        tr.step = meta["step"]
        saved = meta["samples"]
        if saved["global_batch_size"] == tr.loader.global_batch_size:
            tr.samples_since = (saved["since_step"], saved["since_sample"])
        else:
            tr.samples_since = (meta["step"], meta["loader"]["consumed_samples"])


def warn_if_not_exact_continuation(saved: dict, trainer: Trainer, path) -> None:
    """Resuming with another global batch or data.path trains on, but not on the samples the
    uninterrupted run would have seen: say so."""
    t = saved["train"]
    batch = t["micro_batch_size"] * t["grad_accum_steps"] * saved["parallel"]["dp"]
    changes = []
    if batch != trainer.loader.global_batch_size:
        changes.append(
            f"the global batch (micro_batch_size x grad_accum_steps x dp) is "
            f"{trainer.loader.global_batch_size} sequences, {batch} in the checkpoint"
        )
    if Path(saved["data"]["path"]).resolve() != Path(trainer.cfg.data.path).resolve():
        changes.append(
            f"data.path is {trainer.cfg.data.path}, {saved['data']['path']} in the checkpoint"
        )
    for change in changes:
        print0(
            f"warning: resuming from {path}, but {change}: this is not the exact continuation "
            "of the interrupted run (other samples, another loss curve)"
        )


def check_resumable(meta: dict, cfg: Config, grid: Grid, path) -> None:
    """Refuse a checkpoint of another model, of another tokenizer (data re-prepared since),
    or one between local SGD's model averages that this layout cannot continue."""
    check_same_model(meta["config"]["model"], cfg, path)
    if meta.get("tokenizer"):
        tokenizer = load_run_tokenizer(cfg.data.path)
        checkpoint.check_tokenizer(meta["tokenizer"], tokenizer, cfg.data.path, path)
    check_resume(meta, cfg.parallel.sync_every, grid.size("dp"), path)


def refuse_other_checkpoints(run_dir: str) -> None:
    """checkpoint.resume false in a folder that holds checkpoints: the new run's saves would
    be deleted as the oldest beside the old run's later steps, and `latest` would name them."""
    latest, _ = checkpoint.find_latest(run_dir)
    if latest is not None:
        raise ValueError(
            f"checkpoint.resume is false, but run.dir {run_dir} holds checkpoints of another "
            f"run (the newest: {latest}); give this run another --run.dir, or move "
            f"{Path(run_dir) / 'checkpoints'} away first"
        )


def check_same_model(saved: dict, cfg: Config, path) -> None:
    keys = (
        *("n_layer", "n_head", "d_model", "vocab_size", "block_size", "tie_embeddings"),
        *("arch", "n_kv_head", "qk_norm", "ffn_hidden", "rope_theta"),
    )
    # Checkpoints from before model.arch hold gpt2 and lack the newer keys: their defaults.
    saved = {k: saved.get(k, getattr(ModelConfig(), k)) for k in keys}
    diffs = [
        f"model.{k} = {saved[k]} in the checkpoint, {getattr(cfg.model, k)} now"
        for k in keys
        if saved[k] != getattr(cfg.model, k)
    ]
    if diffs:
        raise ValueError(
            f"checkpoint {path} is for a different model: {'; '.join(diffs)}. "
            "Use another run.dir, or the checkpoint's model settings"
        )
