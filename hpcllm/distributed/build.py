"""`build_rank`: the one place that assembles what one rank trains with.

From the config, the rank's place in the grid, its device and its communicators: this
rank's model stage (tensor-parallel shards, pipeline chunks), `DataParallel` with the
reducer the config asks for (flat or hierarchical all-reduce, a compressor, ZeRO-1's
reduce-scatter), the pipeline `Schedule` with its (vocab-parallel) loss, the optimizer
(AdamW, ZeRO-1's sharded AdamW, or Muon over the dp and tp communicators) and local SGD.

Training (`hpcllm.train`), the layout planner (`hpcllm.planner`, on meta or fake tensors with
communicators that record instead of sending), the benchmarks and the layout tests all call
it, so what they measure is what trains. Data, resume and logging are the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch

from hpcllm.config import Config
from hpcllm.distributed import compression
from hpcllm.distributed.comm import TensorComm
from hpcllm.distributed.data_parallel import DataParallel
from hpcllm.distributed.hierarchical import select_allreduce
from hpcllm.distributed.parallelize import build_stage, loss_function
from hpcllm.distributed.pipeline import Schedule, chunk_stages
from hpcllm.distributed.tied import TiedGradients
from hpcllm.distributed.topology import Grid
from hpcllm.models.gpt import GPT
from hpcllm.optim import build_optimizer
from hpcllm.optim.local_sgd import LocalSGD

T = TypeVar("T")


def _run(fn: Callable[[], T]) -> T:
    return fn()


@dataclass
class Rank:
    """What one rank trains with."""

    cfg: Config
    grid: Grid
    comms: Mapping[str, TensorComm]  # axis -> this rank's communicator along it
    model: GPT  # this rank's stage (its chunks, when interleaved)
    ddp: DataParallel
    schedule: Schedule
    optimizer: torch.optim.Optimizer
    local_sgd: LocalSGD | None  # parallel.sync_every > 1


def build_rank(
    cfg: Config,
    grid: Grid,
    device: torch.device,
    comms: Mapping[str, TensorComm],
    *,
    agree: Callable[[Callable[[], GPT]], GPT] = _run,
    log: Callable[[str], None] | None = None,
) -> Rank:
    """This rank of `cfg`'s layout on `grid` and `device`, communicating through `comms`
    (one TensorComm per axis: "dp", "pp", "tp"; any subclass, e.g. one that counts bytes).

    `agree` runs the stage's build (the step that can fail on a user's config, e.g.
    parallel.stage_layers): training passes `runtime.agree` over the world, so that a rank
    that fails there does not leave the others in a collective. `log` receives the line
    saying which dp all-reduce was chosen (parallel.allreduce)."""
    p, t = cfg.parallel, cfg.train
    dp_comm, pp_comm, tp_comm = comms["dp"], comms["pp"], comms["tp"]
    model = agree(lambda: build_stage(cfg, grid, device, tp_comm))
    shard = p.zero == 1
    # parallel.allreduce auto probes one bucket's worth (or the whole model, if smaller).
    probe = min(int(p.bucket_mb * 2**18), sum(q.numel() for q in model.parameters()))
    hierarchical, how = select_allreduce(
        p.allreduce, grid, dp_comm, probe, compression=p.grad_compression
    )
    if log is not None:
        log(f"gradient all-reduce over dp: {how}")
    ddp = DataParallel(
        model,
        dp_comm,
        p.bucket_mb,
        shard=shard,
        hierarchical=hierarchical,
        overlap=p.overlap,
        comm_thread=p.comm_thread,
        log=log,
    )
    ddp.compressor = compression.build(
        p.grad_compression,
        dp_comm,
        ddp.buckets,
        model,
        rank=p.powersgd_rank,
        warmup=p.powersgd_warmup,
        seed=t.seed,
        hierarchical=hierarchical,
    )
    stages = chunk_stages(
        model,
        pp_comm,
        virtual_stages=p.virtual_stages,
        act_shape=(t.micro_batch_size, t.seq_len, cfg.model.d_model),
        device=device,
    )
    ddp.tied = TiedGradients.build(model, pp_comm)
    schedule = Schedule(stages, p.schedule, loss_fn=loss_function(cfg, tp_comm))
    # ZeRO-1 (parallel.zero 1) runs the same AdamW over this dp rank's shard only; under
    # local SGD each dp rank steps on its own gradients (Muon then spreads no work over dp).
    optimizer = build_optimizer(
        model,
        cfg.optim,
        dp_comm,
        device,
        sharded=ddp if shard else None,
        tp_comm=tp_comm,
        local_steps=p.sync_every > 1,
    )
    local_sgd = LocalSGD.build(model, dp_comm, p)
    return Rank(cfg, grid, comms, model, ddp, schedule, optimizer, local_sgd)
