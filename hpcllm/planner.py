"""The layout planner behind `python -m hpcllm.train --dry-run --world-size N`.

For a config and a world size it says, without launching any rank, what each rank will hold
and what each communicator will carry per optimizer step. The figures come from the code
that trains, not from a second model of it:

- Parameters, gradients and optimizer state: this rank is built by `build_rank`, as training
  builds it, on the meta device (shapes, no memory): its stage, `DataParallel` (buckets,
  their padding under ZeRO-1) and optimizer; one optimizer step on meta tensors creates the
  optimizer's real state, measured like a trained rank's (`optimizer_state_bytes`).
- Activations: one micro-batch's forward and backward through the stage under
  `FakeTensorMode` (tensors with shapes, dtypes and a CPU device but no storage, so autocast
  applies as in training), its saved tensors counted by the pipeline's own `ActivationMeter`;
  times the micro-batches the schedule keeps in flight (1f1b: min(pp - stage, m), gpipe: m).
  Interleaved (parallel.virtual_stages > 1), each chunk is measured on its own and the
  schedule's own order of passes (`passes`) gives the most bytes held at once.
- Traffic: the tp all-reduces are counted on that same forward and backward (a planning
  communicator records each message instead of sending it), and Muon's all-gathers on that
  optimizer step (its updates over dp; under tp its momentum slices); the dp buckets' all-reduce (or reduce-scatter +
  all-gather under ZeRO-1) and the pipeline's activations and their gradients follow from
  the buckets and the message shape. "Sent" is what one rank puts on
  the wire with the bandwidth-optimal algorithms: 2(p-1)/p of an all-reduce's payload,
  (p-1)/p of a reduce-scatter's or an all-gather's, all of a point-to-point message.
  Scalars (the loss and gradient-norm reductions) are left out.

Every tp rank of a stage holds equal shards (the vocabulary is padded so they are), and
every dp rank holds the same replica, so one rank per stage describes them all; under
ZeRO-1 the dp ranks' optimizer states differ by a few step counters (4 bytes per owned
segment), and the table shows dp rank 0's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from math import prod
from typing import TYPE_CHECKING, cast

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from hpcllm.config import Config
from hpcllm.distributed.build import Rank, build_rank
from hpcllm.distributed.comm import TensorComm, Work
from hpcllm.distributed.pipeline import (
    ActivationMeter,
    micro_batch_chunk,
    passes,
    rank_chunks,
    split_layers,
)
from hpcllm.distributed.tensor_parallel import padded_vocab
from hpcllm.distributed.topology import AXES, Grid, describe, resolve_dims
from hpcllm.models.gpt import GPT
from hpcllm.optim.zero import optimizer_state_bytes

if TYPE_CHECKING:
    from mpi4py import MPI

META = torch.device("meta")
CPU = torch.device("cpu")
_REDUCED_IN_FP32 = (torch.bfloat16, torch.float16)


class _Done(Work):
    """A finished operation: planning sends nothing."""

    def __init__(self, result: torch.Tensor | None = None):
        self.result = result

    def wait(self) -> None:
        pass

    def test(self) -> bool:
        return True


class _PlanningMPI:
    """The control messages of a planning communicator: every rank's object is taken to be
    this rank's (all tp ranks of a stage hold equal shards)."""

    def __init__(self, size: int):
        self.size = size

    def allgather(self, obj):
        return [obj] * self.size


class PlanningComm(TensorComm):
    """A communicator of `size` ranks seen from rank `rank` that records the payload of
    every collective instead of sending it (the tensors are meta or fake: nothing to send)."""

    def __init__(self, name: str, rank: int, size: int):
        self.name, self.rank, self.size = name, rank, size
        self.comm = cast("MPI.Comm", _PlanningMPI(size))
        self.cuda_aware = False
        self.wait_seconds = 0.0
        self.allreduced = 0  # bytes handed to all-reduces (bf16/fp16 travel as fp32)
        # bytes of the outputs of blocking all-gathers (Muon's updates) and all-to-all inputs
        self.gathered = 0

    def allreduce_(self, tensor, op=None):
        itemsize = 4 if tensor.dtype in _REDUCED_IN_FP32 else tensor.element_size()
        self.allreduced += tensor.numel() * itemsize
        return tensor

    def iallreduce_(self, tensor, op=None):
        return _Done(tensor)

    def split(self, color, name):
        # Only the ends of the pipeline split off together (tied embeddings): two ranks.
        return None if color is None else PlanningComm(name, min(self.rank, 1), 2)

    def ireduce_scatter(self, tensor, out=None, op=None):
        return _Done(out)

    def iallgather_(self, tensor):
        return _Done(tensor)

    def allgather(self, tensor, out=None):
        self.gathered += self.size * tensor.numel() * tensor.element_size()
        return tensor.new_empty((self.size * tensor.shape[0], *tensor.shape[1:]))

    def alltoallv(self, tensor, send_counts, out, recv_counts):
        # Muon under ZeRO-1: (size-1)/size of what a rank hands over leaves it, as in a gather.
        self.gathered += tensor.numel() * tensor.element_size()
        return out


def _grid_at(dims: dict[str, int], coords: dict[str, int]) -> Grid:
    """A Grid that knows its place but has no communicators: all build_rank asks of it."""
    nothing = cast("MPI.Cartcomm", None)
    return Grid(dims=dims, world=nothing, cart=nothing, comms={}, coords=coords)


def planning_rank(
    cfg: Config, dims: dict[str, int], coords: dict[str, int], device: torch.device
) -> tuple[Rank, dict[str, PlanningComm]]:
    """The rank at `coords`, built by `build_rank` on `device` (meta, or CPU under
    FakeTensorMode) with communicators that record what they are given."""
    comms = {a: PlanningComm(a, coords[a], dims[a]) for a in AXES}
    # The dp traffic is planned as the buckets' fp32 all-reduce (or ZeRO-1's reduce-scatter):
    # no node split (that needs real ranks) and no compressor (its wire format is not planned).
    flat = replace(cfg, parallel=replace(cfg.parallel, allreduce="flat", grad_compression="none"))
    return build_rank(flat, _grid_at(dims, coords), device, comms), comms


@dataclass
class RankMemory:
    """Bytes one rank holds outside its activations, and its dp buckets' payload."""

    params: int
    grads: int
    optimizer: int
    bucket_bytes: int  # the (padded) gradient buckets, as reduced over dp
    gathered: int  # the optimizer's all-gathers over dp (Muon's orthogonalised updates)
    tp_gathered: int  # the optimizer's all-gathers over tp (Muon's momentum slices)


def rank_memory(cfg: Config, dims: dict[str, int], coords: dict[str, int]) -> RankMemory:
    """Parameters, gradients (buckets, and under ZeRO-1 the reduced shard) and optimizer state
    of the rank at `coords`, built on the meta device by the training code itself."""
    with META:
        rank, comms = planning_rank(cfg, dims, coords, META)
    model, ddp, optimizer = rank.model, rank.ddp, rank.optimizer
    optimizer.step()  # creates the state (moments, momentum, step counters) on meta tensors
    if ddp.shard:
        params = sum(4 * b.buffer.numel() for b in ddp.buckets)  # parameters live in param_buffer
    else:
        params = sum(p.numel() * p.element_size() for p in model.parameters())
    bucket_bytes = sum(4 * b.buffer.numel() for b in ddp.buckets)
    shards = sum(4 * b.grad_shard.numel() for b in ddp.buckets if b.grad_shard is not None)
    return RankMemory(
        params=params,
        grads=bucket_bytes + shards,
        optimizer=optimizer_state_bytes(optimizer),
        bucket_bytes=bucket_bytes,
        gathered=comms["dp"].gathered,
        tp_gathered=comms["tp"].gathered,
    )


@dataclass
class MicroBatchCost:
    """One micro-batch through one stage: the bytes autograd saves for backward, and the
    payload of the tp all-reduces in its forward and its backward."""

    activations: int
    tp_forward: int
    tp_backward: int


def micro_batch_cost(cfg: Config, dims: dict[str, int], stage: int) -> list[MicroBatchCost]:
    """Forward and backward of one micro-batch through each chunk of `stage` (tp rank 0; one
    chunk unless interleaved) on fake tensors, under the run's autocast dtype, measured by
    the pipeline's ActivationMeter."""
    t = cfg.train
    dtype = torch.bfloat16 if t.dtype == "bfloat16" else torch.float32
    costs = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        rank, comms = planning_rank(cfg, dims, {"pp": stage, "dp": 0, "tp": 0}, CPU)
        model, grid, tp_comm = rank.model, rank.grid, comms["tp"]
        rank.ddp.sync = False  # the gradients accumulate; the dp traffic is planned apart
        last = len(model.chunks) - 1
        for chunk in range(last + 1):
            start, meter = tp_comm.allreduced, ActivationMeter()
            loss = grid.is_last_stage and chunk == last
            shape = (t.micro_batch_size, t.seq_len)
            if grid.is_first_stage and chunk == 0:
                x = torch.zeros(shape, dtype=torch.long)
            else:  # the received activation: an fp32 buffer
                x = torch.zeros((*shape, cfg.model.d_model)).requires_grad_()
            autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
            with meter.hooks(), autocast:
                out = model(x, chunk=chunk)
                if loss:
                    out = rank.schedule.loss_fn(out, torch.zeros(shape, dtype=torch.long))
            forward = tp_comm.allreduced
            torch.autograd.backward(out, None if loss else torch.zeros_like(out))
            costs.append(MicroBatchCost(meter.peak, forward - start, tp_comm.allreduced - forward))
    return costs


@dataclass
class StagePlan:
    """What every rank of one pipeline stage holds and sends per optimizer step, in bytes."""

    stage: int
    blocks: list[range]  # one range per chunk (several when interleaved)
    memory: RankMemory
    micro: MicroBatchCost  # one micro-batch through all the stage's chunks
    activations: int  # the most bytes of activations held at once in a step
    sent: dict[str, int]  # communicator -> bytes this rank sends per step
    payload: dict[str, int]  # communicator -> bytes this rank hands to MPI per step

    @property
    def in_flight(self) -> float:
        """Micro-batches' worth of activations held at the peak (a fraction when
        interleaved: some micro-batches are held through only some chunks)."""
        return self.activations / self.micro.activations if self.micro.activations else 0.0

    @property
    def total(self) -> int:
        m = self.memory
        return m.params + m.grads + m.optimizer + self.activations


@dataclass
class Plan:
    cfg: Config
    dims: dict[str, int]
    stages: list[StagePlan] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        """Parameters of the whole model (a tied head counted once), built on meta."""
        with META:
            return sum(p.numel() for p in GPT(self.cfg.model).parameters())

    def format(self) -> str:
        return format_plan(self)


def peak_activations(schedule: str, stage: int, pp: int, m: int, chunk_bytes: list[int]) -> int:
    """The most activation bytes a stage holds at once, following the schedule's own passes:
    a forward of chunk v adds chunk_bytes[v] until its backward. Without interleaving that is
    gpipe's m micro-batches, 1f1b's min(pp - stage, m) (its warmup plus one in steady state)."""
    V = len(chunk_bytes)
    held = peak = 0
    for is_forward, k in passes(schedule, m, pp, stage, V):
        _, v = micro_batch_chunk(k, pp, V, backward=not is_forward)
        held += chunk_bytes[v] if is_forward else -chunk_bytes[v]
        peak = max(peak, held)
    return peak


def make_plan(cfg: Config, world_size: int) -> Plan:
    """The plan of `cfg` on `world_size` ranks. Raises LayoutError (a ValueError) for a layout
    that does not fit the world; model.vocab_size and model.block_size must be set."""
    p, t, mc = cfg.parallel, cfg.train, cfg.model
    dims = resolve_dims(world_size, dp=p.dp, pp=p.pp, tp=p.tp)
    pp, V = dims["pp"], p.virtual_stages
    layers = split_layers(mc.n_layer, pp, p.stage_layers, V)
    m = t.grad_accum_steps
    message = 4 * t.micro_batch_size * t.seq_len * mc.d_model  # fp32 activations between stages
    plan = Plan(cfg, dims)
    for s in range(pp):
        memory = rank_memory(cfg, dims, {"pp": s, "dp": 0, "tp": 0})
        chunks = micro_batch_cost(cfg, dims, s)
        micro = MicroBatchCost(
            *(
                sum(getattr(c, f) for c in chunks)
                for f in ("activations", "tp_forward", "tp_backward")
            )
        )
        # Each chunk (virtual stage v * pp + s) sends forward to the next virtual stage and
        # backward to the previous one; the first and last virtual stages send one way only.
        virtual = [v * pp + s for v in range(V)]
        pp_payload = m * message * sum((k < pp * V - 1) + (k > 0) for k in virtual)
        tp_reduced = m * (micro.tp_forward + micro.tp_backward)
        tp_payload = tp_reduced + memory.tp_gathered
        # Under ZeRO-1 the buckets are reduce-scattered, then the parameters all-gathered.
        buckets = memory.bucket_bytes * (2 if p.zero else 1)
        dp_payload = buckets + memory.gathered
        dp, tp = dims["dp"], dims["tp"]
        plan.stages.append(
            StagePlan(
                stage=s,
                blocks=rank_chunks(layers, pp, s),
                memory=memory,
                micro=micro,
                activations=peak_activations(p.schedule, s, pp, m, [c.activations for c in chunks]),
                payload={"dp": dp_payload, "pp": pp_payload, "tp": tp_payload},
                sent={
                    "dp": buckets * 2 * (dp - 1) // (2 * dp if p.zero else dp)
                    + memory.gathered * (dp - 1) // dp,
                    "pp": pp_payload,
                    "tp": tp_reduced * 2 * (tp - 1) // tp + memory.tp_gathered * (tp - 1) // tp,
                },
            )
        )
    return plan


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return [
        "  "
        + "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [headers, *rows]
    ]


def format_plan(plan: Plan) -> str:
    """The dry run's report: the grid, memory per rank, traffic per communicator."""
    cfg, dims = plan.cfg, plan.dims
    p, t, mc = cfg.parallel, cfg.train, cfg.model
    world = prod(dims.values())
    vocab = f"vocab {mc.vocab_size}"
    if dims["tp"] > 1 and padded_vocab(mc.vocab_size, dims["tp"]) != mc.vocab_size:
        vocab += f" (padded to {padded_vocab(mc.vocab_size, dims['tp'])})"
    lines = [
        describe(dims),
        f"model: {plan.num_params / 1e6:.2f}M parameters, {mc.arch}, {mc.n_layer} blocks, "
        f"d_model {mc.d_model}, {mc.n_head} heads, {vocab}",
        f"step: {t.grad_accum_steps} micro-batch(es) of {t.micro_batch_size} x {t.seq_len} tokens "
        f"per dp rank, global batch {t.micro_batch_size * t.grad_accum_steps * dims['dp']} "
        f"sequences; schedule {p.schedule}"
        + (f" interleaved ({p.virtual_stages} chunks per pp rank)" if p.virtual_stages > 1 else "")
        + f"; {t.dtype}; {cfg.optim.name}, zero {p.zero}",
        "",
        "memory per rank (every tp and dp rank of a stage alike"
        + ("; optimizer: dp rank 0's)" if p.zero else ")"),
    ]
    headers = ["stage", "blocks", "params", "grads", "optimizer", "act/micro", "in flight"]
    headers += ["activations", "total"]
    rows = []
    for s in plan.stages:
        blocks = ",".join(
            f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start) for r in s.blocks
        )
        m = s.memory
        sizes = [m.params, m.grads, m.optimizer, s.micro.activations]
        rows.append([str(s.stage), blocks, *map(_size, sizes), f"{s.in_flight:.3g}"])
        rows[-1] += [_size(s.activations), _size(s.total)]
    lines += _table(headers, rows)
    lines += ["", "traffic per rank per optimizer step (sent on the wire; payload handed to MPI)"]
    how = {
        "dp": "reduce-scatter + all-gather of the buckets, (p-1)/p each"
        if p.zero
        else "all-reduce of the gradient buckets, 2(p-1)/p",
        "pp": "activations forward and their gradients backward, per micro-batch",
        "tp": "all-reduces of each block's attention and MLP, forward and backward, 2(p-1)/p"
        + (
            "; Muon's all-gather of its momentum slices, (p-1)/p"
            if cfg.optim.name == "muon"
            else ""
        ),
    }
    headers = ["stage", *(f"{a} (size {dims[a]})" for a in AXES)]
    rows = [
        [str(s.stage), *(f"{_size(s.sent[a])} ({_size(s.payload[a])})" for a in AXES)]
        for s in plan.stages
    ]
    lines += _table(headers, rows)
    lines += [f"  {a}: {how[a]}" for a in AXES if dims[a] > 1]
    busiest = max(plan.stages, key=lambda s: s.total)
    lines += [
        "",
        f"largest rank: {_size(busiest.total)} (stage {busiest.stage}); "
        f"all {world} ranks: {_size(sum(s.total for s in plan.stages) * world // dims['pp'])}",
    ]
    return "\n".join(lines)


def dry_run(cfg: Config, world_size: int, default_data: str) -> str:
    """The dry run's report for `cfg` on `world_size` ranks. The vocabulary is model.vocab_size,
    or else read from the train shards' headers (data.path, or `default_data`); no tokens
    are read."""
    from hpcllm.data.shards import open_shards

    p = cfg.parallel
    resolve_dims(world_size, dp=p.dp, pp=p.pp, tp=p.tp)  # a layout error before any data error
    if cfg.model.vocab_size == 0:
        path = cfg.data.path or default_data
        try:
            with open_shards(path, "train") as shards:
                cfg.model.vocab_size = shards.vocab_size
        except ValueError as e:
            raise ValueError(f"{e}; or plan without data by setting model.vocab_size") from None
    cfg.model.block_size = cfg.model.block_size or cfg.train.seq_len
    return make_plan(cfg, world_size).format()
