"""The step functions the training loop, its tests and the benchmarks share.

One training step of this rank (`train_step`: the schedule's forwards and backwards through
its pipeline stage, then the dp gradient average), clipping by the whole model's norm,
validation, and the reductions that turn per-stage sums into one number every rank knows.
They take what `hpcllm.train` builds (schedule, DataParallel, communicators), so tests and
benchmarks drive exactly the training loop's step without importing the entry point.
"""

from __future__ import annotations

import torch

from hpcllm.data.loader import MicroBatch
from hpcllm.distributed.comm import TensorComm
from hpcllm.distributed.data_parallel import DataParallel
from hpcllm.distributed.pipeline import Schedule
from hpcllm.distributed.tensor_parallel import counted_once
from hpcllm.distributed.topology import Grid


def clip_grad_norm(
    model: torch.nn.Module,
    max_norm: float,
    model_comms: list[TensorComm],
    tp_comm: TensorComm | None = None,
    ddp: DataParallel | None = None,
) -> float:
    """Clip by the norm of the whole model's gradient.

    After the dp all-reduce every replica holds the same gradients, so the squared
    norms are summed only across the ranks that hold different parts of the model:
    pipeline stages (`model_comms`) and tensor-parallel shards (`tp_comm`). Each parameter
    counts exactly once: its shards on every tp rank, a parameter replicated over tp (a
    layer norm, a row-parallel bias) on tp rank 0 only. Under ZeRO-1 (`ddp.shard`) each dp
    rank holds the average of its own shard only: those shards are what is measured and
    clipped, and their squared norms are summed over dp too, each element once. The two
    combine: under tp with ZeRO-1 a shard is a flat range of the tp rank's local parameters,
    and a range of a parameter replicated over tp counts on tp rank 0 only. Norms are
    taken in fp64, so the total does not depend on how the gradient is cut.
    """
    tp_rank = 0 if tp_comm is None else tp_comm.rank
    comms = [*model_comms, *([tp_comm] if tp_comm is not None else [])]
    if ddp is not None and ddp.shard:
        grads, pieces = ddp.grad_shards(), ddp.grad_pieces()
        comms.append(ddp.comm)
    else:
        pieces = [(p, p.grad) for p in model.parameters() if p.grad is not None]
        grads = [g for _, g in pieces]
    counted = [g for p, g in pieces if counted_once(p, tp_rank)]
    # Multi-tensor ops: a few kernels for the whole model where a loop over parameters made
    # three per parameter (~900 launches a step for a 24-layer GPT, a cost on a GPU).
    if counted:
        norms = torch._foreach_norm(counted, 2, dtype=torch.float64)
        sq = torch.stack(norms).square().sum().reshape(1)
    else:
        sq = torch.zeros(1, dtype=torch.float64, device=grads[0].device if grads else "cpu")
    for c in comms:
        if c.size > 1:
            c.allreduce_(sq)
    norm = sq.sqrt().item()
    if max_norm > 0 and norm > max_norm and grads:
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
    return norm


def train_step(
    schedule: Schedule, ddp: DataParallel, micro_batches, autocast, average_grads: bool = True
) -> torch.Tensor:
    """Forward and backward of one step's micro-batches through this rank's pipeline stage,
    then the dp gradient average (skipped with `average_grads=False`: local SGD, where each
    dp rank steps on its own gradients). Returns the summed loss (non-zero on the last stage
    only)."""
    ddp.zero_grad()

    def before_backward(i: int) -> None:
        # Gradients are reduced only during the last backward of the step; the
        # earlier micro-batches just accumulate into the same buckets.
        ddp.sync = average_grads and i == len(micro_batches) - 1

    # Each loss is divided by the dp size as well, so the dp sum of the gradients is already
    # their average and finish() skips a pass over them (exact for a power-of-two dp size).
    # Under local SGD (average_grads False) nothing is summed: each rank keeps its own mean.
    loss_sum = schedule.run(
        micro_batches, autocast, before_backward, ddp.comm.size if average_grads else 1
    )
    if average_grads:
        ddp.finish(average=False)
    ddp.reduce_tied()  # pp x tied embeddings: both stages get the shared weight's gradient
    return loss_sum


def mean_over_grid(value: torch.Tensor, count: float, comms: list[TensorComm]) -> float:
    """Sum (value, count) over the given communicators and return value / count."""
    # On the host: two numbers are cheaper to send from there than to stage from a GPU.
    pair = torch.stack(
        [value.detach().double().reshape(()).cpu(), torch.tensor(float(count), dtype=torch.float64)]
    )
    for c in comms:
        if c.size > 1:
            c.allreduce_(pair)
    return (pair[0] / pair[1]).item()


def evaluate(schedule: Schedule, batches, comms: list[TensorComm], autocast) -> float:
    """Mean validation loss over `batches` and the ranks of `comms`, forward only, in eval mode."""
    schedule.stage.module.eval()  # every chunk's stage runs the same module
    loss_sum = schedule.forward_only(batches, autocast)
    schedule.stage.module.train()
    # Only the last stage has losses; the others add zero to both sums.
    return mean_over_grid(loss_sum, len(batches) if schedule.is_last else 0, comms)


def stage_inputs(batches, grid: Grid, device) -> list[MicroBatch]:
    """Keep the inputs on the first stage and the targets on the last, on the device."""

    def keep(t, needed: bool):
        return t.to(device) if needed and t is not None else None

    return [(keep(x, grid.is_first_stage), keep(y, grid.is_last_stage)) for x, y in batches]
