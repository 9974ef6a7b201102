"""The Trainer: one rank's part of the job, built by `setup` from the config, and the loop
that trains it (`Trainer.train`, one `Trainer.train_step` per optimizer step).

The components decide their own cadence: the checkpointer when to save (checkpointer.py), the
validator when to evaluate (validator.py), the metrics when to log, and all step timing
(metrics.py); stopping.py decides, alike on every rank, when training ends early.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from hpcllm import checkpoint
from hpcllm.config import Config, check_device, check_memory, to_toml
from hpcllm.data.loader import Loader, val_batches
from hpcllm.data.shards import ShardSet, open_splits
from hpcllm.distributed import steps
from hpcllm.distributed.build import build_rank
from hpcllm.distributed.comm import TensorComm, detect_cuda_aware
from hpcllm.distributed.data_parallel import DataParallel
from hpcllm.distributed.pipeline import Schedule
from hpcllm.distributed.steps import clip_grad_norm, mean_over_grid, stage_inputs
from hpcllm.distributed.tensor_parallel import owned_numel
from hpcllm.distributed.topology import Grid, describe
from hpcllm.generate import load_model, load_run_tokenizer, sample
from hpcllm.models.gpt import GPT
from hpcllm.optim import lr_scale, set_lr
from hpcllm.optim.local_sgd import LocalSGD
from hpcllm.runtime.rundir import RunDir, replace_file
from hpcllm.runtime.spmd import agree, node_local, print0, rank_hosts, setup_threads
from hpcllm.runtime.stop import StopRequest
from hpcllm.runtime.watchdog import WATCHDOG
from hpcllm.training.checkpointer import Checkpointer, refuse_other_checkpoints
from hpcllm.training.metrics import Metrics, StepStats
from hpcllm.training.stopping import Stopping
from hpcllm.training.validator import Validator, val_bytes_per_token

DEFAULT_DATA = "data/stdlib-bpe1024"
# A small BPE vocabulary: each token stands for ~2.6 bytes of source, so the default model sees
# ~2.6x more text per step than with bytes, for ~10% more compute (benchmarks/14-quality.md).
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
    # Absolute, as recorded in config.toml and checkpoints: generate and export find the data
    # from any folder.
    cfg.data.path = str(Path(path).resolve())
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

    # Built from the fields above; metrics and stopping by `train`, which gets the run folder.
    checkpointer: Checkpointer = field(init=False)
    validator: Validator = field(init=False)
    metrics: Metrics = field(init=False)
    stopping: Stopping = field(init=False)

    def __post_init__(self) -> None:
        self.checkpointer = Checkpointer(self)
        self.validator = Validator(
            self.cfg.train.eval_every,
            self.schedule,
            self.val,
            [self.pp_comm, self.dp_comm],
            self.autocast,
            self.val_bytes_per_token,
        )

    def train(self, run: RunDir | None, stop: StopRequest) -> None:
        """Train to train.max_steps, or to the step where a stop is requested (every rank
        saves); `run` is the run folder on rank 0, None on the others."""
        world, max_steps = self.grid.world, self.cfg.train.max_steps
        with WATCHDOG.watch("barrier after start-up"):
            world.Barrier()
        self.metrics = Metrics(self, run)
        self.stopping = Stopping(stop, world, run, self.cfg.optim.lr)
        stopped = None
        while self.step < max_steps and not stopped:
            self.step += 1
            WATCHDOG.step = self.step
            self.metrics.step_started()
            with WATCHDOG.watch(f"training step {self.step}", peers=False):
                batch = self.loader.next_step(read=self.reads_data)
                stats = self.train_step(stage_inputs(batch, self.grid, self.device))
            WATCHDOG.step_done(self.step)
            last = self.step == max_steps
            self.metrics.step_done(self.step, stats, last)
            validate = self.validator.should_validate(self.step, last)
            if validate:
                self.metrics.log_validation(self.step, *self.validator.evaluate())
            stopped = self.stopping.requested()
            save = self.checkpointer.should_save(self.step, last, stopped)
            if save:
                print0(f"saved {self.checkpointer.save()}")
            if validate or save:
                self.metrics.restart_clock()  # neither counts as step time
            if stopped:
                self.stopping.announce(self.step, stopped)
        self.finish(run, stopped)

    def train_step(self, micro_batches: list) -> StepStats:
        """One optimizer step on this rank's micro-batches of the global batch."""
        cfg, step = self.cfg, self.step
        scale = lr_scale(step, cfg.optim, cfg.train.max_steps)
        set_lr(self.optimizer, scale)
        wire_before = self.ddp.wire_bytes
        # Under local SGD each dp rank steps on its own gradient, clipped by its own norm.
        loss_sum = steps.train_step(
            self.schedule, self.ddp, micro_batches, self.autocast, average_grads=not self.local_sgd
        )
        wire_bytes = self.ddp.wire_bytes - wire_before  # this rank's, for gradients
        grad_norm = clip_grad_norm(
            self.model, cfg.optim.grad_clip, [self.pp_comm], self.tp_comm, self.ddp
        )
        if self.local_sgd:
            grad_norm = self.local_sgd.agreed_norm(grad_norm)
        self.metrics.computed()
        # The mean loss over the whole global batch and the whole model's gradient norm are
        # known to every rank, so the finiteness check is the same decision everywhere.
        loss = mean_over_grid(
            loss_sum,
            len(micro_batches) if self.grid.is_last_stage else 0,
            [self.pp_comm, self.dp_comm],
        )
        self.stopping.check_finite(step, loss, grad_norm)  # raises, before the update
        with self.metrics.optimizer():
            self.optimizer.step()
        if self.local_sgd:  # every sync_every steps: average the models, the outer step
            self.local_sgd.after_step(step, cfg.train.max_steps)
        return StepStats(loss, cfg.optim.lr * scale, grad_norm, wire_bytes)

    def finish(self, run: RunDir | None, stopped: str | None) -> None:
        """After the last step: the final checkpoint, status.json and, after a complete run, a
        sample from the final model."""
        cfg = self.cfg
        self.loader.close()
        # Unsaved steps: e.g. max_steps lowered below a resumed run's progress.
        if self.step > self.checkpointer.saved_at:
            self.checkpointer.save()
        if run:
            state = "stopped" if stopped else "complete"
            run.write_status(
                {
                    "state": state,
                    "step": self.step,
                    "max_steps": cfg.train.max_steps,
                    "reason": stopped,
                }
            )
            if state == "complete" and cfg.run.sample_tokens > 0:
                # The final checkpoint holds every stage: rank 0 merges the shards into one model.
                final, _ = checkpoint.find_latest(cfg.run.dir)
                assert final is not None  # saved just above
                full_model, meta = load_model(final, self.device)
                tokenizer = load_run_tokenizer(cfg.data.path)
                checkpoint.check_tokenizer(meta["tokenizer"], tokenizer, cfg.data.path, final)
                text = sample(full_model, tokenizer, cfg.run.prompt, cfg.run.sample_tokens)
                print(f"sample:\n{text}", flush=True)
        with WATCHDOG.watch("barrier at the end"):
            self.grid.world.Barrier()


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
    agree(world, lambda: check_memory(cfg, grid.dims, local_size))
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
    comms = {"dp": dp_comm, "pp": pp_comm, "tp": tp_comm}
    rank = build_rank(cfg, grid, device, comms, agree=partial(agree, world), log=print0)
    model = rank.model
    trainer = Trainer(
        cfg=cfg,
        grid=grid,
        device=device,
        dp_comm=dp_comm,
        pp_comm=pp_comm,
        tp_comm=tp_comm,
        model=model,
        ddp=rank.ddp,
        schedule=rank.schedule,
        optimizer=rank.optimizer,
        loader=loader,
        val=val,
        autocast=autocast,
        reads_data=reads_data,
        val_bytes_per_token=val_bytes_per_token(cfg, val, [pp_comm, dp_comm]),
        local_sgd=rank.local_sgd,
    )
    if cfg.checkpoint.resume:
        trainer.checkpointer.resume(world)
    else:
        agree(world, lambda: refuse_other_checkpoints(cfg.run.dir))

    n_params = world.allreduce(
        sum(owned_numel(p, grid.rank("tp")) for p in model.parameters())
        if grid.rank("dp") == 0
        else 0
    )
    hosts = rank_hosts(world)
    if world.Get_rank() == 0:
        Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
        replace_file(Path(cfg.run.dir) / "config.toml", to_toml(cfg))
        print(f"{describe(grid.dims)}\n{hosts}\nconfig:\n{to_toml(cfg)}", flush=True)
    schedule = cfg.parallel.schedule
    if cfg.parallel.virtual_stages > 1:
        schedule += f" interleaved ({cfg.parallel.virtual_stages} chunks per pp rank)"
    print0(
        f"model: {n_params / 1e6:.2f}M parameters | {threads} thread(s) per rank | device {device} | "
        f"global batch {loader.global_batch_size} x {t.seq_len} tokens | schedule {schedule}"
    )
    return trainer
