"""`python -m hpcllm.train`: the SPMD training entry point (every rank runs this file).

    mpirun -np 4 python -m hpcllm.train                      # default corpus and model
    mpirun -np 8 python -m hpcllm.train --config my.toml --train.max_steps 1000
    python -m hpcllm.train --dry-run --world-size 1024 --parallel.pp 4

The loop reads top to bottom: build the grid, data, model and optimizer; resume
if a checkpoint exists; then for each step run the micro-batches, average the
gradients over dp, clip, step, log, evaluate and checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from hpcllm import checkpoint
from hpcllm.comm import TensorComm, detect_cuda_aware
from hpcllm.config import Config, check_device, parse_args, to_toml
from hpcllm.data.loader import Loader, val_batches
from hpcllm.data.shards import ShardSet, open_splits
from hpcllm.generate import load_model, load_run_tokenizer, sample
from hpcllm.model import GPT, param_groups
from hpcllm.parallel.data_parallel import DataParallel
from hpcllm.parallel.parallelize import build_stage, loss_function
from hpcllm.parallel.pipeline import PipelineStage, Schedule
from hpcllm.parallel.steps import clip_grad_norm, evaluate, mean_over_grid, stage_inputs, train_step
from hpcllm.parallel.tensor_parallel import owned_numel
from hpcllm.runtime import agree, node_local, print0, rank_hosts, setup_threads, spmd_main
from hpcllm.stop import StopRequest
from hpcllm.topology import Grid, describe, resolve_dims
from hpcllm.watchdog import WATCHDOG

DEFAULT_DATA = "data/stdlib"


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to optim.lr, then cosine decay to optim.min_lr at train.max_steps."""
    o, total = cfg.optim, cfg.train.max_steps
    if step <= o.warmup_steps:
        return o.lr * step / max(1, o.warmup_steps)
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def resolve_data(cfg: Config, world) -> tuple[ShardSet, ShardSet]:
    """Open train and val shards, preparing the default corpus on first use."""
    from hpcllm.data.prepare import prepare

    path = cfg.data.path or DEFAULT_DATA
    if not cfg.data.path and not any(Path(path).glob("train-*.h5")):
        print0(f"preparing the default corpus (Python's standard library) in {path} ...")
        agree(world, lambda: prepare(None, path, comm=world))
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
        # Writes are slow but progress; the other ranks wait for them in a barrier.
        with WATCHDOG.paused():
            return checkpoint.save(
                self.cfg.run.dir,
                self.step,
                grid=self.grid,
                model=self.model,
                optimizer=self.optimizer,
                keep=self.cfg.checkpoint.keep,
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
                },
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
    ddp = DataParallel(model, dp_comm, cfg.parallel.bucket_mb)
    stage = PipelineStage(
        model,
        pp_comm,
        stage=grid.rank("pp"),
        num_stages=grid.size("pp"),
        act_shape=(t.micro_batch_size, t.seq_len, cfg.model.d_model),
        device=device,
    )
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        foreach=device.type == "cuda",
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
        schedule=Schedule(stage, cfg.parallel.schedule, loss_fn=loss_function(cfg, tp_comm)),
        optimizer=optimizer,
        loader=loader,
        val=val,
        autocast=autocast,
        reads_data=reads_data,
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
    print0(
        f"model: {n_params / 1e6:.2f}M parameters | {threads} thread(s) per rank | device {device} | "
        f"global batch {loader.global_batch_size} x {t.seq_len} tokens | schedule {cfg.parallel.schedule}"
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
        check=lambda meta, path: check_same_model(meta["config"]["model"], cfg, path),
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
    moved = "" if same_layout else f", layout {meta['grid']} -> {trainer.grid.dims}"
    print0(
        f"resumed from {path} at step {trainer.step} (sample {trainer.loader.consumed_samples}{moved})"
    )


def check_same_model(saved: dict, cfg: Config, path) -> None:
    keys = ("n_layer", "n_head", "d_model", "vocab_size", "block_size", "tie_embeddings")
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
        dims = agree(
            world,
            lambda: resolve_dims(size, dp=cfg.parallel.dp, pp=cfg.parallel.pp, tp=cfg.parallel.tp),
        )
        print0(describe(dims))
        return 0
    stop = StopRequest(cfg.run.time_limit_s)
    tr = setup(cfg, world)
    t = cfg.train
    WATCHDOG.start(cfg.run.watchdog_s, cfg.run.watchdog_first_step_s)
    world.Barrier()

    metrics = MetricsLog(Path(cfg.run.dir) / "metrics.jsonl") if world.Get_rank() == 0 else None
    window = StepWindow(tokens_per_step=tr.loader.global_batch_size * t.seq_len)
    saved_at = tr.step
    stopped = None
    while tr.step < t.max_steps:
        tr.step += 1
        WATCHDOG.step = tr.step
        start, comm_before = time.perf_counter(), tr.comm_seconds()
        lr = lr_at(tr.step, cfg)
        for group in tr.optimizer.param_groups:
            group["lr"] = lr
        with WATCHDOG.watch(f"training step {tr.step}"):
            micro_batches = stage_inputs(
                tr.loader.next_step(read=tr.reads_data), tr.grid, tr.device
            )
            _inject_fault(tr.step, world.Get_rank())
            loss_sum = train_step(tr.schedule, tr.ddp, micro_batches, tr.autocast)
            grad_norm = clip_grad_norm(tr.model, cfg.optim.grad_clip, [tr.pp_comm], tr.tp_comm)
            tr.optimizer.step()
            # The mean loss over the whole global batch, known to every rank, so the
            # finiteness check is the same decision everywhere.
            loss = mean_over_grid(
                loss_sum,
                len(micro_batches) if tr.grid.is_last_stage else 0,
                [tr.pp_comm, tr.dp_comm],
            )
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss} at step {tr.step}; lower optim.lr or check the data"
            )
        WATCHDOG.step_done(tr.step)
        window.add(time.perf_counter() - start, tr.comm_seconds() - comm_before)

        last = tr.step == t.max_steps
        if tr.step % t.log_every == 0 or window.is_first or last:
            record = {
                "step": tr.step,
                "loss": loss,
                "lr": lr,
                **window.flush(),
                "grad_norm": grad_norm,
            }
            eta = (t.max_steps - tr.step) * record["ms_per_step"] / 1000
            print0(
                f"step {tr.step}/{t.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                f"{record['tokens_per_s']:,.0f} tok/s | {record['ms_per_step']:.0f} ms/step | "
                f"comm wait {100 * record['comm_wait_frac']:.1f}% | ETA {eta:.0f}s"
            )
            if metrics:
                metrics.write(record)
        if (t.eval_every and tr.step % t.eval_every == 0) or last:
            with WATCHDOG.watch("validation"):
                val_loss = evaluate(tr.schedule, tr.val, [tr.pp_comm, tr.dp_comm], tr.autocast)
            print0(f"step {tr.step} | val loss {val_loss:.4f}")
            if metrics:
                metrics.write({"step": tr.step, "val_loss": val_loss})
        stopped = stop.agreed(world)
        if (cfg.checkpoint.every and tr.step % cfg.checkpoint.every == 0) or last or stopped:
            print0(f"saved {tr.save()}")
            saved_at = tr.step
        if stopped:
            print0(
                f"stopping at step {tr.step}: {stopped}; all ranks saved and exit 0. "
                "Run the same command again to resume."
            )
            break

    if tr.step > saved_at:  # e.g. max_steps lowered below a resumed run's progress
        tr.save()
    if world.Get_rank() == 0:
        state = "stopped" if stopped else "complete"
        write_status(
            cfg.run.dir,
            {"state": state, "step": tr.step, "max_steps": t.max_steps, "reason": stopped},
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
    world.Barrier()
    return 0


class StepWindow:
    """Step times since the last log line, for tokens/s, ms/step and the communication share."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.is_first = True
        self.steps, self.seconds, self.comm = 0, 0.0, 0.0

    def add(self, seconds: float, comm_seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds
        self.comm += comm_seconds

    def flush(self) -> dict:
        stats = {
            "tokens_per_s": self.tokens_per_step * self.steps / self.seconds,
            "ms_per_step": 1000 * self.seconds / self.steps,
            "comm_wait_frac": self.comm / self.seconds,
        }
        self.is_first = False
        self.steps, self.seconds, self.comm = 0, 0.0, 0.0
        return stats


class MetricsLog:
    """metrics.jsonl: appended, one JSON object per line, flushed so a crash loses nothing logged."""

    def __init__(self, path: Path):
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


def write_status(run_dir: str, status: dict) -> None:
    """<run.dir>/status.json: whether the run is complete or stopped early (for requeue scripts)."""
    path = Path(run_dir) / "status.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status) + "\n")
    os.replace(tmp, path)


def _inject_fault(step: int, rank: int) -> None:
    """Test hooks: HPCLLM_FAIL_AT_STEP=s makes rank HPCLLM_FAIL_RANK (default 0) raise at
    step s; HPCLLM_HANG_AT_STEP=s makes rank HPCLLM_HANG_RANK block forever there."""
    env = os.environ
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
