"""The optimizer a run trains with (`optim.name`) and its learning-rate schedule.

    adamw  torch AdamW: decay on matrices, none on biases and norms.
    muon   Muon (hpcllm.optim.muon) on the blocks' hidden matrices at optim.muon_lr, AdamW at
           optim.lr on the embeddings, the head and the vectors; its orthogonalisation is
           spread over the data-parallel ranks (under ZeRO-1, with each matrix's momentum).

Every param group keeps its peak rate as `initial_lr`; the schedule scales them all alike.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hpcllm.config import OptimConfig
from hpcllm.distributed.comm import TensorComm
from hpcllm.distributed.data_parallel import DataParallel
from hpcllm.models.gpt import param_groups
from hpcllm.optim import muon
from hpcllm.optim.zero import ShardedAdamW, ShardedMuon

OPTIMIZERS = ("adamw", "muon")


def build_optimizer(
    model: nn.Module,
    o: OptimConfig,
    dp_comm: TensorComm,
    device: torch.device,
    sharded: DataParallel | None = None,
    tp_comm: TensorComm | None = None,
    local_steps: bool = False,
) -> torch.optim.Optimizer:
    """This rank's optimizer over its stage's parameters; with `sharded` (a DataParallel
    built with shard=True, ZeRO-1), its state for this dp rank's shard of them only (under
    Muon: AdamW's for the shard, the momentum of the hidden matrices this rank orthogonalises).

    `local_steps` (local SGD, parallel.sync_every > 1): each dp rank steps on its own
    gradients, so Muon orthogonalises every matrix itself instead of sharing the work over
    dp (which assumes the same gradients on every dp rank)."""
    if o.name == "muon":
        groups = muon.param_groups(
            model.named_parameters(), lr=o.lr, muon_lr=o.muon_lr, weight_decay=o.weight_decay
        )
        settings: dict[str, Any] = {
            "momentum": o.muon_momentum,
            "betas": (o.beta1, o.beta2),
            "eps": o.eps,
            # bf16 iterations are the fast path on GPUs (the iteration tolerates them);
            # on CPUs fp32 is as fast and keeps runs comparable across layouts bit for bit.
            "ns_dtype": torch.bfloat16 if device.type == "cuda" else torch.float32,
            "tp_comm": tp_comm,
        }
        if sharded is not None:
            return ShardedMuon(model, sharded, groups, **settings)
        return muon.Muon(groups, comm=None if local_steps else dp_comm, **settings)
    assert o.name == "adamw", o.name  # config.validate refuses other names
    groups = param_groups(model, o.weight_decay)
    for g in groups:
        g["initial_lr"] = o.lr
    betas, foreach = (o.beta1, o.beta2), device.type == "cuda"
    if sharded is not None:
        return ShardedAdamW(
            model, sharded, groups, lr=o.lr, betas=betas, eps=o.eps, foreach=foreach
        )
    return torch.optim.AdamW(groups, lr=o.lr, betas=betas, eps=o.eps, foreach=foreach)


def lr_scale(step: int, o: OptimConfig, max_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to min_lr / lr at max_steps."""
    if step <= o.warmup_steps:
        return step / max(1, o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / max(1, max_steps - o.warmup_steps))
    floor = o.min_lr / o.lr
    return floor + 0.5 * (1 - floor) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, scale: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * scale
