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
from pathlib import Path

import torch

from hpcllm import checkpoint
from hpcllm.comm import TensorComm, detect_cuda_aware
from hpcllm.config import Config, parse_args, to_toml
from hpcllm.data.loader import Loader, val_batches
from hpcllm.data.shards import open_shards
from hpcllm.generate import load_model, load_run_tokenizer, sample
from hpcllm.model import GPT, GPTConfig, param_groups
from hpcllm.parallel.data_parallel import DataParallel
from hpcllm.parallel.pipeline import PipelineStage, Schedule, split_layers
from hpcllm.runtime import agree, node_local, print0, setup_threads, spmd_main
from hpcllm.topology import Grid, describe, resolve_dims

DEFAULT_DATA = "data/stdlib"


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to optim.lr, then cosine decay to optim.min_lr at train.max_steps."""
    o, total = cfg.optim, cfg.train.max_steps
    if step <= o.warmup_steps:
        return o.lr * step / max(1, o.warmup_steps)
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def clip_grad_norm(model: torch.nn.Module, max_norm: float, model_comms: list[TensorComm]) -> float:
    """Clip by the norm of the whole model's gradient.

    After the dp all-reduce every replica holds the same gradients, so the squared
    norms are summed only across the ranks that hold different parts of the
    model (pipeline stages, later tensor shards).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum().reshape(1)
    for c in model_comms:
        if c.size > 1:
            c.allreduce_(sq)
    norm = sq.sqrt().item()
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(scale)
    return norm


def train_step(schedule: Schedule, ddp: DataParallel, micro_batches, autocast) -> torch.Tensor:
    """Forward and backward of one step's micro-batches through this rank's pipeline stage,
    then the dp gradient average. Returns the summed loss (non-zero on the last stage only)."""
    ddp.zero_grad()

    def before_backward(i: int) -> None:
        # Gradients are reduced only during the last backward of the step; the
        # earlier micro-batches just accumulate into the same buckets.
        ddp.sync = i == len(micro_batches) - 1

    loss_sum = schedule.run(micro_batches, autocast, before_backward)
    ddp.finish()
    return loss_sum


def mean_over_grid(value: torch.Tensor, count: float, comms: list[TensorComm]) -> float:
    """Sum (value, count) over the given communicators and return value / count."""
    pair = torch.stack([value.detach().double().reshape(()), torch.tensor(float(count), dtype=torch.float64)])
    for c in comms:
        if c.size > 1:
            c.allreduce_(pair)
    return (pair[0] / pair[1]).item()


def evaluate(schedule: Schedule, batches, comms: list[TensorComm], autocast) -> float:
    schedule.stage.module.eval()
    loss_sum = schedule.forward_only(batches, autocast)
    schedule.stage.module.train()
    # Only the last stage has losses; the others add zero to both sums.
    return mean_over_grid(loss_sum, len(batches) if schedule.stage.is_last else 0, comms)


def resolve_data(cfg: Config, world) -> tuple[object, object]:
    """Open train and val shards, preparing the default corpus on first use."""
    from hpcllm.data.prepare import prepare

    path = cfg.data.path or DEFAULT_DATA
    if not cfg.data.path and not any(Path(path).glob("train-*.h5")):
        print0(f"preparing the default corpus (Python's standard library) in {path} ...")
        agree(world, lambda: prepare(None, path, comm=world))
    cfg.data.path = path
    return agree(world, lambda: (open_shards(path, "train"), open_shards(path, "val")))


def check_model_fits_data(cfg: Config, shards) -> None:
    m = cfg.model
    if m.vocab_size == 0:
        m.vocab_size = shards.vocab_size
    elif shards.vocab_size > m.vocab_size:
        raise ValueError(f"{shards.paths[0]}: shard vocab_size {shards.vocab_size} is larger than "
                         f"model.vocab_size {m.vocab_size}")
    if m.block_size == 0:
        m.block_size = cfg.train.seq_len
    elif cfg.train.seq_len > m.block_size:
        raise ValueError(f"train.seq_len ({cfg.train.seq_len}) is longer than the model's context "
                         f"model.block_size ({m.block_size})")


def build_stage(cfg: Config, grid: Grid, device) -> GPT:
    """This rank's pipeline stage of the GPT (the whole model when pp = 1)."""
    m = cfg.model
    gpt = GPTConfig(vocab_size=m.vocab_size, block_size=m.block_size, n_layer=m.n_layer, n_head=m.n_head,
                    d_model=m.d_model, dropout=m.dropout, tie_embeddings=m.tie_embeddings,
                    init_seed=cfg.train.seed)
    layers = split_layers(m.n_layer, grid.size("pp"), cfg.parallel.stage_layers)[grid.rank("pp")]
    return GPT(gpt, layers=layers, first=grid.is_first_stage, last=grid.is_last_stage).to(device)


def main(argv: list[str] | None = None) -> int:
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    cfg, options = agree(world, lambda: parse_args(sys.argv[1:] if argv is None else argv))
    if options["dry_run"]:
        size = options["world_size"] or world.Get_size()
        dims = agree(world, lambda: resolve_dims(size, dp=cfg.parallel.dp, pp=cfg.parallel.pp, tp=cfg.parallel.tp))
        print0(describe(dims))
        return 0

    # -- the rank grid, threads and device ----------------------------------------
    grid = agree(world, lambda: Grid.build(world, dp=cfg.parallel.dp, pp=cfg.parallel.pp, tp=cfg.parallel.tp))
    cfg.parallel.dp = grid.size("dp")
    local_rank, local_size = node_local(world)
    threads = setup_threads(cfg.train.threads, local_size)
    if cfg.train.device == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    cuda_aware = cfg.train.device == "cuda" and detect_cuda_aware(cfg.parallel.cuda_aware)
    dp_comm = TensorComm(grid.comm("dp"), cuda_aware)
    pp_comm = TensorComm(grid.comm("pp"), cuda_aware)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.dtype == "bfloat16"
                else nullcontext())

    # -- data -------------------------------------------------------------------------
    train_shards, val_shards = resolve_data(cfg, world)
    agree(world, lambda: check_model_fits_data(cfg, train_shards))
    t = cfg.train
    loader = agree(world, lambda: Loader(train_shards, seq_len=t.seq_len, micro_batch_size=t.micro_batch_size,
                                         grad_accum_steps=t.grad_accum_steps, dp_rank=grid.rank("dp"),
                                         dp_size=grid.size("dp"), seed=t.seed))
    # Only the first stage needs inputs and only the last needs targets; middle stages read nothing.
    reads_data = grid.is_first_stage or grid.is_last_stage
    val = agree(world, lambda: val_batches(val_shards, seq_len=t.seq_len, batch_size=t.micro_batch_size,
                                           num_batches=t.eval_batches, dp_rank=grid.rank("dp"),
                                           dp_size=grid.size("dp")) if reads_data else None)
    val = stage_inputs(val, grid, device) if reads_data else [(None, None)] * t.eval_batches

    # -- model and optimizer ------------------------------------------------------------
    torch.manual_seed(t.seed + world.Get_rank())  # dropout differs per rank; weights use init_seed
    model = agree(world, lambda: build_stage(cfg, grid, device))
    ddp = DataParallel(model, dp_comm, cfg.parallel.bucket_mb)
    stage = PipelineStage(model, pp_comm, stage=grid.rank("pp"), num_stages=grid.size("pp"),
                          act_shape=(t.micro_batch_size, t.seq_len, cfg.model.d_model), device=device)
    schedule = Schedule(stage, cfg.parallel.schedule)

    def comm_seconds() -> float:
        """Time blocked on MPI so far: gradient all-reduce, pipeline receives, loss reductions."""
        return ddp.wait_seconds + pp_comm.wait_seconds + dp_comm.wait_seconds
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                  foreach=device.type == "cuda")

    # -- resume -----------------------------------------------------------------------------
    run_dir = Path(cfg.run.dir)
    step = 0
    if cfg.checkpoint.resume:
        latest, partial = checkpoint.find_latest(cfg.run.dir)
        for p in partial:
            print0(f"warning: ignoring incomplete checkpoint {p} (a save was interrupted)")
        if latest is not None:
            meta = agree(world, lambda: checkpoint.read_meta(latest))
            same_layout = meta["grid"] == grid.dims
            agree(world, lambda: checkpoint.load(latest, model=model, optimizer=optimizer,
                                                 world_rank=world.Get_rank(), same_layout=same_layout))
            loader.load_state_dict(meta["loader"])
            step = meta["step"]
            moved = "" if same_layout else f", layout {meta['grid']} -> {grid.dims}"
            print0(f"resumed from {latest} at step {step} (sample {loader.consumed_samples}{moved})")

    n_params = sum(p.numel() for p in model.parameters())
    if world.Get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(cfg))
        print(f"{describe(grid.dims)}\nconfig:\n{to_toml(cfg)}", flush=True)
    print0(f"model: {n_params / 1e6:.2f}M parameters | {threads} thread(s) per rank | device {device} | "
           f"global batch {loader.global_batch_size} x {t.seq_len} tokens")
    world.Barrier()

    # -- the loop ---------------------------------------------------------------------------
    metrics = open(run_dir / "metrics.jsonl", "a") if world.Get_rank() == 0 else None
    tokens_per_step = loader.global_batch_size * t.seq_len
    window_steps, window_time, window_wait = 0, 0.0, 0.0
    first_step = step
    while step < t.max_steps:
        step += 1
        step_start = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = stage_inputs(loader.next_step(read=reads_data), grid, device)
        _inject_fault(step, world.Get_rank())
        wait_before = comm_seconds()
        loss_sum = train_step(schedule, ddp, micro_batches, autocast)
        grad_norm = clip_grad_norm(model, o.grad_clip, [pp_comm])
        optimizer.step()
        # The logged loss is the mean over the whole global batch; every rank learns it,
        # so the finiteness check below is the same decision everywhere.
        loss = mean_over_grid(loss_sum, len(micro_batches) if grid.is_last_stage else 0, [pp_comm, dp_comm])
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}; lower optim.lr or check the data")
        window_steps += 1
        window_time += time.perf_counter() - step_start
        window_wait += comm_seconds() - wait_before

        last = step == t.max_steps
        if step % t.log_every == 0 or step == first_step + 1 or last:
            ms = 1000 * window_time / window_steps
            record = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_step * window_steps / window_time,
                      "ms_per_step": ms, "comm_wait_frac": window_wait / window_time, "grad_norm": grad_norm}
            print0(f"step {step}/{t.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                   f"{record['tokens_per_s']:,.0f} tok/s | {ms:.0f} ms/step | "
                   f"comm wait {100 * record['comm_wait_frac']:.1f}% | ETA {(t.max_steps - step) * ms / 1000:.0f}s")
            if metrics:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            window_steps, window_time, window_wait = 0, 0.0, 0.0

        if (t.eval_every and step % t.eval_every == 0) or last:
            val_loss = evaluate(schedule, val, [pp_comm, dp_comm], autocast)
            print0(f"step {step} | val loss {val_loss:.4f}")
            if metrics:
                metrics.write(json.dumps({"step": step, "val_loss": val_loss}) + "\n")
                metrics.flush()
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or last:
            path = checkpoint.save(cfg.run.dir, step, grid=grid, model=model, optimizer=optimizer,
                                   keep=cfg.checkpoint.keep,
                                   extra={"loader": loader.state_dict(), "config": cfg.to_dict()})
            print0(f"saved {path}")

    if metrics:
        metrics.close()
    if world.Get_rank() == 0 and cfg.run.sample_tokens > 0:
        # The final checkpoint holds every stage, so rank 0 can sample whatever the layout.
        final, _ = checkpoint.find_latest(cfg.run.dir)
        full_model, _ = load_model(final, device)
        text = sample(full_model, load_run_tokenizer(cfg.data.path), cfg.run.prompt, cfg.run.sample_tokens)
        print(f"sample:\n{text}", flush=True)
    return 0


def stage_inputs(batches, grid: Grid, device) -> list[tuple]:
    """Keep the inputs on the first stage and the targets on the last, on the device."""
    return [(x.to(device) if grid.is_first_stage else None, y.to(device) if grid.is_last_stage else None)
            for x, y in batches] if grid.is_first_stage or grid.is_last_stage else list(batches)


def _inject_fault(step: int, rank: int) -> None:
    """Test hook: HPCLLM_FAIL_AT_STEP=s HPCLLM_FAIL_RANK=r makes rank r raise at step s."""
    at = os.environ.get("HPCLLM_FAIL_AT_STEP")
    if at and int(at) == step and int(os.environ.get("HPCLLM_FAIL_RANK", "0")) == rank:
        raise RuntimeError(f"injected failure at step {step} (HPCLLM_FAIL_AT_STEP)")


if __name__ == "__main__":
    os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
    spmd_main(main)
