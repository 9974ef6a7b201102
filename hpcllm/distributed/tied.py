"""Tied embeddings across pipeline stages (`model.tie_embeddings` with `parallel.pp > 1`).

The token embedding and the LM head share one matrix. With pp > 1 the first stage looks
tokens up in it and the last stage projects onto it, so each holds a copy (named `wte.weight`
on both: model.GPT) that starts from the same values. As in Megatron's embedding group, the
first and last stage of each (dp, tp) coordinate sum the copies' gradients after the dp
reduction, so both copies receive the gradient of the tied weight and take the same update:
they stay equal, bit for bit, without ever being sent.

The last stage's copy is a replica (`is_stage_replica`): whole-model sums (the gradient norm,
parameter counts) and checkpoints count the first stage's copy only, so a checkpoint holds
the weight once and resumes in any layout.

Under ZeRO-1 the dp ranks hold reduced shards of each bucket only; the shared weight has a
bucket of its own on both stages (DataParallel), so dp rank r's shard covers the same
elements on the first and the last stage and the shards are summed instead.
"""

from __future__ import annotations

import torch
from torch import nn

from hpcllm.distributed.comm import TensorComm


def is_stage_replica(param: torch.Tensor) -> bool:
    """Whether `param` is the last stage's copy of a weight the first stage owns."""
    return getattr(param, "stage_replica", False)


def shared_weight(model: nn.Module) -> nn.Parameter | None:
    """This stage's copy of the weight tied between the first and the last stage, or None
    (untied, or a stage holding neither end, or both ends: then it is one tensor)."""
    first, last = getattr(model, "first", True), getattr(model, "last", True)
    cfg = getattr(model, "cfg", None)
    if cfg is None or not cfg.tie_embeddings or first == last:
        return None
    return model.get_parameter("wte.weight")


def mark_replica(model: nn.Module) -> None:
    """Mark the last stage's copy of the shared weight (after any module swap)."""
    weight = shared_weight(model)
    if weight is not None and not model.first:
        weight.stage_replica = True  # type: ignore[attr-defined]  # read by is_stage_replica


class TiedGradients:
    """Sums the shared weight's gradient between the first and the last stage: the group of
    pp ranks 0 and pp - 1 of this rank's (dp, tp) coordinate."""

    def __init__(self, weight: nn.Parameter, comm: TensorComm):
        self.weight = weight
        self.comm = comm

    @classmethod
    def build(cls, model: nn.Module, pp_comm: TensorComm) -> TiedGradients | None:
        """Collective over `pp_comm`: the embedding group, or None where there is nothing to
        sum (untied, pp = 1, or a middle stage)."""
        if pp_comm.size == 1 or not getattr(model.cfg, "tie_embeddings", False):
            return None
        ends = pp_comm.rank in (0, pp_comm.size - 1)
        group = pp_comm.split(0 if ends else None, name="embedding")
        if group is None:
            return None
        weight = shared_weight(model)
        assert weight is not None
        return cls(weight, group)

    @torch.no_grad()
    def reduce(self, grad_shard: torch.Tensor | None = None) -> None:
        """Sum the gradient over the two stages: the whole `.grad`, or under ZeRO-1 this dp
        rank's reduced shard of the weight's bucket (`grad_shard`)."""
        grad = self.weight.grad if grad_shard is None else grad_shard
        assert grad is not None
        self.comm.allreduce_(grad)
