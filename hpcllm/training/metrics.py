"""All of a training step's timing, and what is logged of it: the log line on rank 0 and the
records of metrics.jsonl (every train.log_every steps, the first step and the last; and each
validation)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hpcllm.runtime.rundir import RunDir
from hpcllm.runtime.spmd import node_local, print0
from hpcllm.training import mfu

if TYPE_CHECKING:
    from hpcllm.training.trainer import Trainer


@dataclass
class StepStats:
    """What a training step reports: the same values on every rank."""

    loss: float  # the mean over the global batch
    lr: float
    grad_norm: float  # of the whole model, before clipping
    grad_wire_bytes: int  # this rank's, for gradients


class Metrics:
    """Times each step and logs it.

    A step's time runs from the end of the previous one, so the previous step's logging and
    stop-flag all-reduce count; validation and checkpoints restart the clock. Within a step,
    `computed` marks the end of forward, backward and clipping and `optimizer` times the
    update, so the window can tell per-step fixed costs from compute.
    """

    def __init__(self, trainer: Trainer, run: RunDir | None):
        world = trainer.grid.world
        self.trainer = trainer
        self.run = run
        self.file = run.metrics(trainer.step) if run else None
        t = trainer.cfg.train
        self.window = StepWindow(
            tokens_per_step=trainer.loader.global_batch_size * t.seq_len,
            flops_per_token=model_flops_per_token(trainer, world),
            peak_tflops=agreed_peak_tflops(trainer, world),
            num_ranks=world.Get_size(),
        )
        self.started = self.computed_at = self.optimizer_s = 0.0
        self.comm_before = self.comm_computed = self.loader_before = 0.0
        self.restart_clock()

    def comm_seconds(self) -> float:
        """Time blocked on MPI so far: gradient all-reduce, pipeline receives, loss reductions,
        tensor-parallel all-reduces."""
        tr = self.trainer
        return (
            tr.ddp.wait_seconds
            + tr.pp_comm.wait_seconds
            + tr.dp_comm.wait_seconds
            + tr.tp_comm.wait_seconds
        )

    def restart_clock(self) -> None:
        self.mark = time.perf_counter()

    def step_started(self) -> None:
        self.started = time.perf_counter()
        self.comm_before, self.loader_before = self.comm_seconds(), self.trainer.loader.wait_seconds

    def computed(self) -> None:
        """Forward, backward and clipping are done."""
        self.computed_at, self.comm_computed = time.perf_counter(), self.comm_seconds()

    @contextmanager
    def optimizer(self) -> Iterator[None]:
        start, comm_start = time.perf_counter(), self.comm_seconds()
        yield
        # Its own work only: what it waited on (ZeRO-1's and Muon's all-gathers) is
        # communication, counted there once.
        self.optimizer_s = time.perf_counter() - start - (self.comm_seconds() - comm_start)

    def step_done(self, step: int, stats: StepStats, last: bool) -> None:
        """Add the step to the window; log it every train.log_every steps, first and last."""
        now, comm_now = time.perf_counter(), self.comm_seconds()
        self.window.add(
            now - self.mark,
            comm_now - self.comm_before,
            self.trainer.loader.wait_seconds - self.loader_before,
            # The previous step's tail and this one's, less the optimizer's own work and the
            # communication since the backward (the optimizer's collectives, the wait for a
            # slower rank in the loss all-reduce: counted as communication).
            (self.started - self.mark)
            + (now - self.computed_at)
            - self.optimizer_s
            - (comm_now - self.comm_computed),
        )
        self.mark = now
        if step % self.trainer.cfg.train.log_every == 0 or self.window.is_first or last:
            self.log(step, stats)

    def tokens(self) -> int:
        """Tokens seen so far, whatever the batch history."""
        return self.trainer.loader.consumed_samples * self.trainer.cfg.train.seq_len

    def log(self, step: int, stats: StepStats) -> None:
        local_sgd, max_steps = self.trainer.local_sgd, self.trainer.cfg.train.max_steps
        record = {
            "step": step,
            "loss": stats.loss,
            "tokens": self.tokens(),
            "lr": stats.lr,
            **self.window.flush(),
            "grad_norm": stats.grad_norm,
            "grad_wire_bytes": stats.grad_wire_bytes,
            **(local_sgd.metrics() if local_sgd else {}),
        }
        eta = (max_steps - step) * record["ms_per_step"] / 1000
        print0(
            f"step {step}/{max_steps} | loss {stats.loss:.4f} | lr {stats.lr:.2e} | "
            f"{record['tokens_per_s']:,.0f} tok/s | {_percent(record['mfu'])} MFU | "
            f"{record['ms_per_step']:.0f} ms/step | comm wait {100 * record['comm_wait_frac']:.1f}% | "
            f"loader {100 * record['loader_frac']:.1f}% | ETA {eta:.0f}s"
        )
        if self.file:
            self.file.write(record)

    def log_validation(self, step: int, val_loss: float, val_bpb: float) -> None:
        print0(f"step {step} | val loss {val_loss:.4f} | {val_bpb:.4f} bits/byte")
        if self.run and self.file:
            self.file.write(
                {"step": step, "val_loss": val_loss, "val_bpb": val_bpb, "tokens": self.tokens()}
            )
            self.run.draw_loss()


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
