"""The trainer's checkpoints: saved every checkpoint.every steps, at the end and on a stop;
resumed from the newest undamaged one in run.dir, with a warning for what cannot continue
exactly (an interrupted save, another global batch or data.path, compression state of
another layout)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hpcllm import checkpoint
from hpcllm.config import Config
from hpcllm.distributed.topology import Grid
from hpcllm.generate import load_run_tokenizer
from hpcllm.models.gpt import ModelConfig
from hpcllm.optim.local_sgd import check_resume
from hpcllm.runtime.spmd import print0
from hpcllm.runtime.watchdog import WATCHDOG

if TYPE_CHECKING:
    from hpcllm.training.trainer import Trainer


class Checkpointer:
    """Saves and restores everything a trainer's step depends on: the model, the optimizer,
    the loader's position, the step, gradient compression and local SGD state."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.every = trainer.cfg.checkpoint.every
        self.saved_at = trainer.step  # the step of the newest checkpoint, saved or resumed

    def should_save(self, step: int, last: bool, stopped: str | None) -> bool:
        return bool(self.every and step % self.every == 0) or last or bool(stopped)

    def save(self) -> Path:
        tr = self.trainer
        tokenizer = None
        if tr.grid.world.Get_rank() == 0:
            tokenizer = checkpoint.tokenizer_record(
                load_run_tokenizer(tr.cfg.data.path), tr.cfg.data.path
            )
        since_step, since_sample = tr.samples_since
        max_steps = tr.cfg.train.max_steps
        # Watched: a peer that stops during the save must not hang this rank in its barriers.
        with WATCHDOG.watch(f"checkpoint save at step {tr.step}"):
            path = checkpoint.save(
                tr.cfg.run.dir,
                tr.step,
                grid=tr.grid,
                model=tr.model,
                optimizer=tr.optimizer,
                keep=tr.cfg.checkpoint.keep,
                rank_tensors=tr.ddp.compressor.state_dict() if tr.ddp.compressor else None,
                extra={
                    "loader": tr.loader.state_dict(),
                    # Lets a load check the step against the loader position.
                    "samples": {
                        "global_batch_size": tr.loader.global_batch_size,
                        "since_step": since_step,
                        "since_sample": since_sample,
                    },
                    "config": tr.cfg.to_dict(),
                    "tokenizer": tokenizer,
                    **(
                        {"local_sgd": tr.local_sgd.checkpoint_record(tr.step, max_steps)}
                        if tr.local_sgd
                        else {}
                    ),
                },
                local_sgd=tr.local_sgd,
            )
        self.saved_at = tr.step
        return path

    def resume(self, world) -> None:
        """Continue from the newest undamaged checkpoint in run.dir, if there is one."""
        trainer = self.trainer
        cfg = trainer.cfg
        latest, partial = checkpoint.find_latest(cfg.run.dir)
        for p in partial:
            print0(
                f"warning: ignoring incomplete checkpoint {p} (its save was interrupted); "
                f"resuming from {latest or 'scratch'}"
            )
        found = checkpoint.load_newest(
            cfg.run.dir,
            grid=trainer.grid,
            model=trainer.model,
            optimizer=trainer.optimizer,
            check=lambda meta, path: check_resumable(meta, cfg, trainer.grid, path),
            local_sgd=trainer.local_sgd,
        )
        if found is None:
            return
        path, meta = found
        trainer.loader.load_state_dict(meta["loader"])
        trainer.step = self.saved_at = meta["step"]
        saved = meta["samples"]
        if saved["global_batch_size"] == trainer.loader.global_batch_size:
            trainer.samples_since = (saved["since_step"], saved["since_sample"])
        else:
            trainer.samples_since = (meta["step"], meta["loader"]["consumed_samples"])
        same_layout = meta["grid"] == trainer.grid.dims
        warn_if_not_exact_continuation(meta["config"], trainer, path)
        resume_compression(trainer, meta, path)
        moved = "" if same_layout else f", layout {meta['grid']} -> {trainer.grid.dims}"
        print0(
            f"resumed from {path} at step {trainer.step} (sample {trainer.loader.consumed_samples}{moved})"
        )


def resume_compression(trainer: Trainer, meta: dict, path) -> None:
    """Restore gradient compression's per-rank state (PowerSGD's error feedback and Q's).
    It belongs to one dp rank of one layout: in another layout, or from a checkpoint without
    it (another grad_compression, powersgd_rank), it starts afresh (zero error, seeded Q) with
    a warning. The warmup counts training steps, so a resumed run does not repeat it."""
    compressor = trainer.ddp.compressor
    if compressor is None:
        return
    compressor.steps = trainer.step  # on every rank: the warmup is decided alike
    if not compressor.state_dict():
        return
    state = meta["rank_tensors"]
    why: str | None
    if meta["grid"] != trainer.grid.dims:
        why = f"the layout changed ({meta['grid']} -> {trainer.grid.dims})"
    elif not state:
        why = "the checkpoint holds none"
    else:
        why = compressor.load_state_dict(state)
    if why is not None:
        print0(
            f"warning: resuming from {path}, the gradient compression state (error feedback, "
            f"warm-start Q) starts afresh: {why}"
        )


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
    """Refuse a checkpoint of another model, or one between local SGD's model averages that
    this layout cannot continue."""
    check_same_model(meta["config"]["model"], cfg, path)
    check_resume(meta, cfg.parallel.sync_every, grid.size("dp"), path)


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
