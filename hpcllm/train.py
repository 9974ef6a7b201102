"""`python -m hpcllm.train`: the SPMD training entry point (every rank runs this file).

    mpirun -np 4 python -m hpcllm.train                      # default corpus and model
    mpirun -np 8 python -m hpcllm.train --config my.toml --train.max_steps 1000
    python -m hpcllm.train --dry-run --world-size 1024 --parallel.pp 4

The loop reads top to bottom: build the grid, data, model and optimizer; resume
if a checkpoint exists; then for each step run the micro-batches, average the
gradients over dp, clip, step, log, evaluate and checkpoint.
"""

from __future__ import annotations

if __name__ == "__main__":
    # Before torch and MPI load: a rank stuck in an import on a slow shared file system, or
    # a peer that never reaches MPI_Init, must end the job as well (hpcllm/watchdog.py).
    from hpcllm.watchdog import WATCHDOG

    WATCHDOG.start_at_launch()

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from hpcllm import checkpoint, mfu, plan
from hpcllm.comm import TensorComm, detect_cuda_aware
from hpcllm.config import Config, check_device, parse_args, to_toml
from hpcllm.data.loader import Loader, val_batches
from hpcllm.data.shards import ShardSet, open_splits
from hpcllm.generate import load_model, load_run_tokenizer, sample
from hpcllm.model import GPT, ModelConfig
from hpcllm.optim import build_optimizer, lr_scale, set_lr
from hpcllm.parallel import compression
from hpcllm.parallel.data_parallel import DataParallel
from hpcllm.parallel.hierarchical import select_allreduce
from hpcllm.parallel.local_sgd import LocalSGD, check_resume
from hpcllm.parallel.parallelize import build_stage, loss_function
from hpcllm.parallel.pipeline import Schedule, chunk_stages
from hpcllm.parallel.steps import clip_grad_norm, evaluate, mean_over_grid, stage_inputs, train_step
from hpcllm.parallel.tensor_parallel import owned_numel
from hpcllm.rundir import RunDir
from hpcllm.runtime import (
    Diverged,
    StartupError,
    agree,
    node_local,
    print0,
    rank_hosts,
    setup_threads,
    spmd_main,
)
from hpcllm.stop import StopRequest
from hpcllm.topology import Grid, describe
from hpcllm.watchdog import WATCHDOG

DEFAULT_DATA = "data/stdlib-bpe1024"
# A small BPE vocabulary: each token stands for ~2.6 bytes of source, so the default model sees
# ~2.6x more text per step than with bytes, for ~10% more compute (BENCHMARKS.md section 14).
DEFAULT_VOCAB = 1024


def resolve_data(cfg: Config, world) -> tuple[ShardSet, ShardSet]:
    """Open train and val shards, preparing the default corpus on first use."""
    from hpcllm.data.prepare import prepare

    path = cfg.data.path or DEFAULT_DATA
    if not cfg.data.path and not any(Path(path).glob("train-*.h5")):
        print0(f"preparing the default corpus (Python's standard library) in {path} ...")
        agree(
            world,
            lambda: prepare(None, path, tokenizer="bpe", vocab_size=DEFAULT_VOCAB, comm=world),
        )
    cfg.data.path = path
    return agree(world, lambda: open_splits(path))


def check_model_fits_data(cfg: Config, shards) -> None:
    m = cfg.model
    if m.vocab_size == 0:
        m.vocab_size = shards.vocab_size
    elif shards.vocab_size > m.vocab_size:
        raise ValueError(
            f"{shards.paths[0]}: shard vocab_size {shards.vocab_size} is larger than "
            f"model.vocab_size {m.vocab_size}"
        )
    if m.block_size == 0:
        m.block_size = cfg.train.seq_len
    elif cfg.train.seq_len > m.block_size:
        raise ValueError(
            f"train.seq_len ({cfg.train.seq_len}) is longer than the model's context "
            f"model.block_size ({m.block_size})"
        )


@dataclass
class Trainer:
    """Everything one rank trains with, built by `setup` from the config."""

    cfg: Config
    grid: Grid
    device: torch.device
    dp_comm: TensorComm
    pp_comm: TensorComm
    tp_comm: TensorComm
    model: GPT
    ddp: DataParallel
    schedule: Schedule
    optimizer: torch.optim.Optimizer
    loader: Loader
    val: list
    autocast: object
    reads_data: bool
    # Bytes of text per scored validation token, so val loss converts to bits per byte.
    val_bytes_per_token: float = 1.0
    # Local SGD (parallel.sync_every > 1): models averaged every H steps instead of gradients.
    local_sgd: LocalSGD | None = None
    step: int = 0
    # (step, samples consumed) where the current global batch size took over: (0, 0), or a
    # resume that changed it.
    samples_since: tuple[int, int] = (0, 0)

    def comm_seconds(self) -> float:
        """Time blocked on MPI so far: gradient all-reduce, pipeline receives, loss reductions,
        tensor-parallel all-reduces."""
        return (
            self.ddp.wait_seconds
            + self.pp_comm.wait_seconds
            + self.dp_comm.wait_seconds
            + self.tp_comm.wait_seconds
        )

    def save(self) -> Path:
        tokenizer = None
        if self.grid.world.Get_rank() == 0:
            tokenizer = checkpoint.tokenizer_record(
                load_run_tokenizer(self.cfg.data.path), self.cfg.data.path
            )
        since_step, since_sample = self.samples_since
        max_steps = self.cfg.train.max_steps
        # Watched: a peer that stops during the save must not hang this rank in its barriers.
        with WATCHDOG.watch(f"checkpoint save at step {self.step}"):
            return checkpoint.save(
                self.cfg.run.dir,
                self.step,
                grid=self.grid,
                model=self.model,
                optimizer=self.optimizer,
                keep=self.cfg.checkpoint.keep,
                rank_tensors=self.ddp.compressor.state_dict() if self.ddp.compressor else None,
                extra={
                    "loader": self.loader.state_dict(),
                    # Lets a load check the step against the loader position.
                    "samples": {
                        "global_batch_size": self.loader.global_batch_size,
                        "since_step": since_step,
                        "since_sample": since_sample,
                    },
                    "config": self.cfg.to_dict(),
                    "tokenizer": tokenizer,
                    **(
                        {"local_sgd": self.local_sgd.checkpoint_record(self.step, max_steps)}
                        if self.local_sgd
                        else {}
                    ),
                },
                local_sgd=self.local_sgd,
            )


def setup(cfg: Config, world) -> Trainer:
    """Build the grid, device, data, model and optimizer; resume from the newest checkpoint."""
    grid = agree(
        world, lambda: Grid.build(world, dp=cfg.parallel.dp, pp=cfg.parallel.pp, tp=cfg.parallel.tp)
    )
    cfg.parallel.dp = grid.size("dp")
    local_rank, local_size = node_local(world)
    threads = setup_threads(cfg.train.threads, local_size)
    agree(world, lambda: check_device(cfg))
    if cfg.train.device == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    cuda_aware = cfg.train.device == "cuda" and detect_cuda_aware(cfg.parallel.cuda_aware)
    dp_comm = TensorComm(grid.comm("dp"), cuda_aware, name="dp")
    pp_comm = TensorComm(grid.comm("pp"), cuda_aware, name="pp")
    tp_comm = TensorComm(grid.comm("tp"), cuda_aware, name="tp")
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if cfg.train.dtype == "bfloat16"
        else nullcontext()
    )

    # Data. Only the first stage needs inputs and only the last needs targets.
    train_shards, val_shards = resolve_data(cfg, world)
    agree(world, lambda: check_model_fits_data(cfg, train_shards))
    t = cfg.train
    loader = agree(
        world,
        lambda: Loader(
            train_shards,
            seq_len=t.seq_len,
            micro_batch_size=t.micro_batch_size,
            grad_accum_steps=t.grad_accum_steps,
            dp_rank=grid.rank("dp"),
            dp_size=grid.size("dp"),
            seed=t.seed,
            prefetch=True,
        ),
    )
    reads_data = grid.is_first_stage or grid.is_last_stage
    val_read = agree(
        world,
        lambda: (
            val_batches(
                val_shards,
                seq_len=t.seq_len,
                batch_size=t.micro_batch_size,
                num_batches=t.eval_batches,
                dp_rank=grid.rank("dp"),
                dp_size=grid.size("dp"),
            )
            if reads_data
            else None
        ),
    )
    val = stage_inputs(val_read, grid, device) if reads_data else [(None, None)] * t.eval_batches

    # Model (this rank's stage of it), gradient averaging, schedule, optimizer.
    # Dropout differs per (pp, dp) rank but not between tp ranks, which hold replicated
    # activations (inside a tp region a per-rank generator is forked from this one). The
    # weights use init_seed.
    torch.manual_seed(t.seed + world.Get_rank() // grid.size("tp"))
    model = agree(world, lambda: build_stage(cfg, grid, device, tp_comm))
    # parallel.allreduce: auto probes one bucket's worth (or the whole model, if smaller).
    hierarchical, how = select_allreduce(
        cfg.parallel.allreduce,
        grid,
        dp_comm,
        min(int(cfg.parallel.bucket_mb * 2**18), sum(p.numel() for p in model.parameters())),
        compression=cfg.parallel.grad_compression,
    )
    print0(f"gradient all-reduce over dp: {how}")
    ddp = DataParallel(
        model,
        dp_comm,
        cfg.parallel.bucket_mb,
        shard=cfg.parallel.zero == 1,
        hierarchical=hierarchical,
        overlap=cfg.parallel.overlap,
        comm_thread=cfg.parallel.comm_thread,
        log=print0,
    )
    ddp.compressor = compression.build(
        cfg.parallel.grad_compression,
        dp_comm,
        ddp.buckets,
        model,
        rank=cfg.parallel.powersgd_rank,
        warmup=cfg.parallel.powersgd_warmup,
        seed=t.seed,
        hierarchical=hierarchical,
    )
    stages = chunk_stages(
        model,
        pp_comm,
        virtual_stages=cfg.parallel.virtual_stages,
        act_shape=(t.micro_batch_size, t.seq_len, cfg.model.d_model),
        device=device,
    )
    # ZeRO-1 (parallel.zero 1) runs the same AdamW over this dp rank's shard only.
    optimizer = build_optimizer(
        model,
        cfg.optim,
        dp_comm,
        device,
        sharded=ddp if cfg.parallel.zero == 1 else None,
        tp_comm=tp_comm,
    )
    trainer = Trainer(
        cfg=cfg,
        grid=grid,
        device=device,
        dp_comm=dp_comm,
        pp_comm=pp_comm,
        tp_comm=tp_comm,
        model=model,
        ddp=ddp,
        schedule=Schedule(stages, cfg.parallel.schedule, loss_fn=loss_function(cfg, tp_comm)),
        optimizer=optimizer,
        loader=loader,
        val=val,
        autocast=autocast,
        reads_data=reads_data,
        val_bytes_per_token=val_bytes_per_token(cfg, val, [pp_comm, dp_comm]),
        local_sgd=LocalSGD.build(model, dp_comm, cfg.parallel),
    )
    if cfg.checkpoint.resume:
        resume(trainer, world)

    n_params = world.allreduce(
        sum(owned_numel(p, grid.rank("tp")) for p in model.parameters())
        if grid.rank("dp") == 0
        else 0
    )
    hosts = rank_hosts(world)
    if world.Get_rank() == 0:
        Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run.dir) / "config.toml").write_text(to_toml(cfg))
        print(f"{describe(grid.dims)}\n{hosts}\nconfig:\n{to_toml(cfg)}", flush=True)
    schedule = cfg.parallel.schedule
    if cfg.parallel.virtual_stages > 1:
        schedule += f" interleaved ({cfg.parallel.virtual_stages} chunks per pp rank)"
    print0(
        f"model: {n_params / 1e6:.2f}M parameters | {threads} thread(s) per rank | device {device} | "
        f"global batch {loader.global_batch_size} x {t.seq_len} tokens | schedule {schedule}"
    )
    return trainer


def resume(trainer: Trainer, world) -> None:
    """Continue from the newest undamaged checkpoint in run.dir, if there is one."""
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
    trainer.step = meta["step"]
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


def val_bytes_per_token(cfg: Config, val: list, comms: list[TensorComm]) -> float:
    """Bytes of text that the validation targets stand for, per target, over every rank's
    batches (only the last stage holds targets)."""
    lengths = torch.from_numpy(load_run_tokenizer(cfg.data.path).token_bytes())
    targets = [y for _, y in val if y is not None]
    num_bytes = sum((lengths[y.cpu()].sum() for y in targets), torch.tensor(0))
    return mean_over_grid(num_bytes.double(), sum(y.numel() for y in targets), comms)


def diverged(tr: Trainer, run: RunDir | None, loss: float, grad_norm: float) -> None:
    """Stop a run whose step produced a non-finite loss or gradient norm, without applying
    or saving that step.

    The state the failing step started from gave the non-finite values, so a checkpoint of
    exactly that state (saved at the previous step) is no resume point: it is set aside as
    `diverged-step_NNNNNN` (kept for inspection), and the newest checkpoint before it is
    where the rerun with a lower learning rate starts.
    """
    message = (
        f"step {tr.step} diverged: loss {loss}, gradient norm {grad_norm}; the step was not "
        "applied and not saved."
    )
    if run:
        poisoned = run.path / "checkpoints" / f"step_{tr.step - 1:06d}"
        if poisoned.is_dir():
            aside = checkpoint.set_aside(poisoned, "diverged")
            message += (
                f" The checkpoint of step {tr.step - 1} is the state that diverged: set aside "
                f"as {aside}."
            )
        latest, _ = checkpoint.find_latest(str(run.path))
        message += (
            f" Rerun with a lower optim.lr (now {tr.cfg.optim.lr:g}) to resume from "
            f"{latest or 'scratch (no earlier checkpoint)'}, or check the data."
        )
        run.write_status({"state": "diverged", "step": tr.step, "reason": "non-finite loss"})
    raise Diverged(message)


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


def main(argv: list[str] | None = None) -> int:
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    cfg, options = agree(world, lambda: parse_args(sys.argv[1:] if argv is None else argv))
    if options["dry_run"]:
        size = options["world_size"] or world.Get_size()
        print0(agree(world, lambda: plan.dry_run(cfg, size, DEFAULT_DATA)))
        return 0
    stop = StopRequest(cfg.run.time_limit_s)
    run = agree(world, lambda: RunDir(cfg.run.dir) if world.Get_rank() == 0 else None)
    WATCHDOG.start(
        cfg.run.watchdog_s, cfg.run.watchdog_first_step_s, Path(cfg.run.dir) / "heartbeat"
    )
    try:
        tr = setup(cfg, world)
    except StartupError:
        WATCHDOG.stop()
        if run:
            run.discard()  # a run refused before training leaves nothing behind
        raise
    t = cfg.train
    with WATCHDOG.watch("barrier after start-up"):
        world.Barrier()

    metrics = run.metrics(tr.step) if run else None
    window = StepWindow(
        tokens_per_step=tr.loader.global_batch_size * t.seq_len,
        flops_per_token=model_flops_per_token(tr, world),
        peak_tflops=agreed_peak_tflops(tr, world),
        num_ranks=world.Get_size(),
    )
    # A step's time runs from the end of the previous one, so the previous step's logging and
    # stop-flag all-reduce count; validation and checkpoints restart the clock.
    mark = time.perf_counter()
    saved_at = tr.step
    stopped = None
    while tr.step < t.max_steps:
        tr.step += 1
        WATCHDOG.step = tr.step
        started, comm_before, loader_before = (
            time.perf_counter(),
            tr.comm_seconds(),
            tr.loader.wait_seconds,
        )
        scale = lr_scale(tr.step, cfg.optim, t.max_steps)
        set_lr(tr.optimizer, scale)
        lr = cfg.optim.lr * scale
        with WATCHDOG.watch(f"training step {tr.step}", peers=False):
            micro_batches = stage_inputs(
                tr.loader.next_step(read=tr.reads_data), tr.grid, tr.device
            )
            _inject_fault(tr.step, world.Get_rank(), tr.model)
            wire_before = tr.ddp.wire_bytes
            # Under local SGD each dp rank steps on its own gradient, clipped by its own norm.
            loss_sum = train_step(
                tr.schedule, tr.ddp, micro_batches, tr.autocast, average_grads=not tr.local_sgd
            )
            wire_bytes = tr.ddp.wire_bytes - wire_before  # this rank's, for gradients
            grad_norm = clip_grad_norm(
                tr.model, cfg.optim.grad_clip, [tr.pp_comm], tr.tp_comm, tr.ddp
            )
            if tr.local_sgd:
                grad_norm = tr.local_sgd.agreed_norm(grad_norm)
            computed, comm_computed = time.perf_counter(), tr.comm_seconds()
            # The mean loss over the whole global batch and the whole model's gradient norm
            # are known to every rank, so the finiteness check is the same decision everywhere.
            loss = mean_over_grid(
                loss_sum,
                len(micro_batches) if tr.grid.is_last_stage else 0,
                [tr.pp_comm, tr.dp_comm],
            )
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                diverged(tr, run, loss, grad_norm)  # raises, before the update is applied
            optimizer_start = time.perf_counter()
            tr.optimizer.step()
            optimizer_s = time.perf_counter() - optimizer_start
            if tr.local_sgd:  # every sync_every steps: average the models, the outer step
                tr.local_sgd.after_step(tr.step, t.max_steps)
        WATCHDOG.step_done(tr.step)
        now, comm_now = time.perf_counter(), tr.comm_seconds()
        window.add(
            now - mark,
            comm_now - comm_before,
            tr.loader.wait_seconds - loader_before,
            # The previous step's tail and this one's, less the optimizer's update and the
            # wait for a slower rank in the loss all-reduce (counted as communication).
            (started - mark) + (now - computed) - optimizer_s - (comm_now - comm_computed),
        )
        mark = now

        last = tr.step == t.max_steps
        tokens = tr.loader.consumed_samples * t.seq_len  # seen so far, whatever the batch history
        if tr.step % t.log_every == 0 or window.is_first or last:
            record = {
                "step": tr.step,
                "loss": loss,
                "tokens": tokens,
                "lr": lr,
                **window.flush(),
                "grad_norm": grad_norm,
                "grad_wire_bytes": wire_bytes,
                **(tr.local_sgd.metrics() if tr.local_sgd else {}),
            }
            eta = (t.max_steps - tr.step) * record["ms_per_step"] / 1000
            print0(
                f"step {tr.step}/{t.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                f"{record['tokens_per_s']:,.0f} tok/s | {_percent(record['mfu'])} MFU | "
                f"{record['ms_per_step']:.0f} ms/step | comm wait {100 * record['comm_wait_frac']:.1f}% | "
                f"loader {100 * record['loader_frac']:.1f}% | ETA {eta:.0f}s"
            )
            if metrics:
                metrics.write(record)
        if (t.eval_every and tr.step % t.eval_every == 0) or last:
            with WATCHDOG.watch("validation", peers=False):
                val_loss = evaluate(tr.schedule, tr.val, [tr.pp_comm, tr.dp_comm], tr.autocast)
            # nats per token -> bits per byte: comparable across tokenizers
            val_bpb = val_loss / math.log(2) / tr.val_bytes_per_token
            print0(f"step {tr.step} | val loss {val_loss:.4f} | {val_bpb:.4f} bits/byte")
            if run and metrics:
                metrics.write(
                    {"step": tr.step, "val_loss": val_loss, "val_bpb": val_bpb, "tokens": tokens}
                )
                run.draw_loss()
        stopped = stop.agreed(world)
        if (cfg.checkpoint.every and tr.step % cfg.checkpoint.every == 0) or last or stopped:
            print0(f"saved {tr.save()}")
            saved_at = tr.step
        if stopped or tr.step == saved_at or (t.eval_every and tr.step % t.eval_every == 0):
            mark = time.perf_counter()
        if stopped:
            print0(
                f"stopping at step {tr.step}: {stopped}; all ranks saved and exit 0. "
                "Run the same command again to resume."
            )
            break

    tr.loader.close()
    if tr.step > saved_at:  # e.g. max_steps lowered below a resumed run's progress
        tr.save()
    if run:
        state = "stopped" if stopped else "complete"
        run.write_status(
            {"state": state, "step": tr.step, "max_steps": t.max_steps, "reason": stopped}
        )
        if state == "complete" and cfg.run.sample_tokens > 0:
            # The final checkpoint holds every stage: rank 0 merges the shards into one model.
            final, _ = checkpoint.find_latest(cfg.run.dir)
            assert final is not None  # saved just above
            full_model, meta = load_model(final, tr.device)
            tokenizer = load_run_tokenizer(cfg.data.path)
            checkpoint.check_tokenizer(meta["tokenizer"], tokenizer, cfg.data.path, final)
            text = sample(full_model, tokenizer, cfg.run.prompt, cfg.run.sample_tokens)
            print(f"sample:\n{text}", flush=True)
    with WATCHDOG.watch("barrier at the end"):
        world.Barrier()
    WATCHDOG.stop()
    return 0


def model_flops_per_token(tr: Trainer, world) -> float:
    """Training FLOPs per token of the whole model (every stage's and shard's weights)."""
    weights = world.allreduce(mfu.matmul_weights(tr.model) if tr.grid.rank("dp") == 0 else 0)
    m = tr.cfg.model
    return mfu.flops_per_token(weights, m.n_layer, m.d_model, tr.cfg.train.seq_len)


def agreed_peak_tflops(tr: Trainer, world) -> float | None:
    """Per-rank peak TFLOP/s, the mean over the ranks so that every rank logs the same MFU;
    None if a rank's device is unknown (a GPU not in the table and no train.peak_tflops)."""
    t = tr.cfg.train
    dtype = torch.bfloat16 if t.dtype == "bfloat16" else torch.float32
    _, ranks_on_node = node_local(world)
    peaks = world.allgather(
        mfu.peak_tflops(tr.device, dtype, torch.get_num_threads(), t.peak_tflops, ranks_on_node)
    )
    return None if None in peaks else sum(peaks) / len(peaks)


def _percent(fraction: float | None) -> str:
    return "?" if fraction is None else f"{100 * fraction:.1f}%"


class StepWindow:
    """Step times since the last log line: tokens/s, MFU, ms/step, and the shares of a step
    spent blocked on communication, waiting for the loader, and on per-step fixed costs (all
    but the loader, forward, backward and optimizer: the loss all-reduce, checks, logging,
    the stop flag)."""

    def __init__(
        self,
        tokens_per_step: int,
        flops_per_token: float = 0.0,
        peak_tflops: float | None = None,
        num_ranks: int = 1,
    ):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.num_ranks = num_ranks
        self.is_first = True
        self._reset()

    def _reset(self) -> None:
        self.steps, self.seconds, self.comm, self.loader, self.fixed = 0, 0.0, 0.0, 0.0, 0.0

    def add(self, seconds: float, comm_seconds: float, loader_seconds=0.0, fixed_seconds=0.0):
        self.steps += 1
        self.seconds += seconds
        self.comm += comm_seconds
        self.loader += loader_seconds
        self.fixed += fixed_seconds

    def flush(self) -> dict:
        tokens_per_s = self.tokens_per_step * self.steps / self.seconds
        stats = {
            "tokens_per_s": tokens_per_s,
            "mfu": None
            if self.peak_tflops is None
            else mfu.mfu(tokens_per_s, self.flops_per_token, self.num_ranks, self.peak_tflops),
            "ms_per_step": 1000 * self.seconds / self.steps,
            "comm_wait_frac": self.comm / self.seconds,
            "loader_frac": self.loader / self.seconds,
            "fixed_frac": self.fixed / self.seconds,
        }
        self.is_first = False
        self._reset()
        return stats


def _inject_fault(step: int, rank: int, model: torch.nn.Module) -> None:
    """Test hooks: HPCLLM_FAIL_AT_STEP=s makes rank HPCLLM_FAIL_RANK (default 0) raise at
    step s; HPCLLM_HANG_AT_STEP=s makes rank HPCLLM_HANG_RANK block forever there;
    HPCLLM_NAN_AT_STEP=s fills rank 0's first parameter with NaN at step s (a divergence)."""
    env = os.environ
    if env.get("HPCLLM_NAN_AT_STEP") == str(step) and rank == 0:
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
    if env.get("HPCLLM_FAIL_AT_STEP") == str(step) and env.get("HPCLLM_FAIL_RANK", "0") == str(
        rank
    ):
        raise RuntimeError(f"injected failure at step {step} (HPCLLM_FAIL_AT_STEP)")
    if env.get("HPCLLM_HANG_AT_STEP") == str(step) and env.get("HPCLLM_HANG_RANK", "0") == str(
        rank
    ):
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    spmd_main(main)
