"""A rank's training state as checkpoint pieces (hpcllm/checkpoint/pieces.py): one `Stateful`
per part — the model, its optimizer, local SGD's outer state, the gradient reducer's state, the
loader, the step — each deciding what it holds, who writes it and how it loads.

Who writes what: a tensor-parallel shard is written by its tp rank as the boxes of its
`Placement`; a tensor replicated over tp by tp rank 0; the last stage's copy of a tied
embedding by nobody (the first stage writes it); a tensor replicated over dp by dp rank 0.
Under local SGD the dp ranks' models and optimizer states differ between averages, so each dp
rank writes its own (dp rank d > 0 under `dp{d}/` names) and reads its own back where the
checkpoint has them (else dp rank 0's); the outer state is alike on every dp rank. Under
ZeRO-1 the sharded optimizer declares the parameters' and its state's flat ranges itself
(hpcllm/optim/zero.py). Gradient compression's state belongs to one rank of one layout.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from hpcllm.checkpoint.index import placement_of
from hpcllm.checkpoint.pieces import CheckpointError, Piece, Reader, Stateful, placed, whole
from hpcllm.distributed.compression import Compressor
from hpcllm.distributed.tied import is_stage_replica
from hpcllm.distributed.topology import Grid
from hpcllm.optim.local_sgd import LocalSGD
from hpcllm.optim.zero import ShardedOptimizer
from hpcllm.runtime.spmd import print0


def _written_elsewhere(p: nn.Parameter, grid: Grid) -> bool:
    """Whether another rank of this dp rank's replica writes `p`: tp rank 0 a tensor
    replicated over tp, the first stage a tied embedding."""
    return (placement_of(p) is None and grid.rank("tp") != 0) or is_stage_replica(p)


def _global_shape(p: nn.Parameter) -> tuple[int, ...]:
    placement = placement_of(p)
    return placement.shape if placement is not None else tuple(p.shape)


class _Params:
    """What ModelState and OptimizerState share: the parameters by name, and whose copy of
    them this rank writes and reads (`per_dp_rank`: each dp rank its own, local SGD)."""

    def __init__(self, model: nn.Module, grid: Grid, per_dp_rank: bool):
        self.named = list(model.named_parameters())
        self.grid = grid
        self.per_dp_rank = per_dp_rank
        dp_rank = grid.rank("dp")
        self.prefix = f"dp{dp_rank}/" if per_dp_rank and dp_rank else ""

    def replica(self, p: nn.Parameter) -> bool:
        return _written_elsewhere(p, self.grid) or (
            self.grid.rank("dp") != 0 and not self.per_dp_rank
        )

    def source(self, reader: Reader, n: str) -> str:
        """The prefix of the copy of parameter `n` this rank reads: its own, where there."""
        return self.prefix if reader.has(f"{self.prefix}model/{n}") else ""

    def record(self) -> dict:
        return {}


class ModelState(_Params):
    """The parameters of this rank's stage: its tp shards and the tensors it writes whole."""

    def sharded_state(self) -> list[Piece]:
        return [
            piece
            for n, p in self.named
            for piece in placed(
                f"{self.prefix}model/{n}", p, placement_of(p), replica=self.replica(p)
            )
        ]

    def load_sharded(self, reader: Reader) -> Callable[[], None]:
        loaded = []
        for n, p in self.named:
            name = f"{self.source(reader, n)}model/{n}"
            if not reader.has(name):
                raise CheckpointError(f"{reader.where}: the index has no parameter {n}")
            if reader.shape(name) != _global_shape(p):
                raise CheckpointError(
                    f"{reader.where}: parameter {n} has shape {list(reader.shape(name))} in the "
                    f"index, the model's is {list(_global_shape(p))}"
                )
            loaded.append((p, reader.read_placed(name, placement_of(p), tuple(p.shape))))
        return partial(_copy, loaded)


@torch.no_grad()
def _copy(pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    for target, value in pairs:
        target.copy_(value)


class OptimizerState(_Params):
    """A torch optimizer's per-parameter state (AdamW's moments and step, Muon's momentum),
    by parameter name; state shaped as its parameter is sharded as it is, the rest is whole."""

    def __init__(self, model: nn.Module, optimizer, grid: Grid, per_dp_rank: bool):
        super().__init__(model, grid, per_dp_rank)
        self.optimizer = optimizer

    def sharded_state(self) -> list[Piece]:
        pieces = []
        for n, p in self.named:
            for k, v in self.optimizer.state.get(p, {}).items():
                v = torch.as_tensor(v)
                name = f"{self.prefix}optim/{n}/{k}"
                if v.shape == p.shape:
                    pieces += placed(
                        name, v, placement_of(p), replica=self.replica(p), file="optim"
                    )
                else:  # AdamW's 0-dim step: tp rank 0 writes it
                    replica = self.replica(p) or self.grid.rank("tp") != 0
                    pieces.append(whole(name, v, replica=replica, file="optim"))
        return pieces

    def load_sharded(self, reader: Reader) -> Callable[[], None]:
        states = []
        for n, p in self.named:
            prefix = f"{self.source(reader, n)}optim/{n}/"
            state = {}
            for name in reader.names(prefix):
                if reader.shape(name) == _global_shape(p):
                    state[name[len(prefix) :]] = reader.read_placed(
                        name, placement_of(p), tuple(p.shape)
                    )
                else:
                    state[name[len(prefix) :]] = reader.read(name)
            if state:
                states.append((p, state))
        return partial(self._apply, states)

    def _apply(self, states: list[tuple[nn.Parameter, dict[str, torch.Tensor]]]) -> None:
        for p, state in states:
            # AdamW keeps its 0-dim `step` on the CPU; the moments live with the parameter.
            self.optimizer.state[p] = {
                k: v.to(p.device) if v.dim() else v for k, v in state.items()
            }


class ShardedOptimizerState:
    """A ZeRO-1 optimizer: its flat ranges of the parameters and of their state."""

    def __init__(self, optimizer: ShardedOptimizer, grid: Grid):
        self.optimizer = optimizer
        self.tp_rank = grid.rank("tp")

    def sharded_state(self) -> list[Piece]:
        return self.optimizer.owned_pieces(self.tp_rank)

    def record(self) -> dict:
        return {}

    def load_sharded(self, reader: Reader) -> Callable[[], None]:
        return self.optimizer.load_sharded(reader)


class OuterState:
    """Local SGD's outer state (anchor, momentum), alike on every dp rank; and meta.json's
    record of whether the dp ranks' models agree at this step."""

    def __init__(self, local_sgd: LocalSGD, grid: Grid, step: Callable[[], int], max_steps: int):
        self.local_sgd = local_sgd
        self.grid = grid
        self.step = step
        self.max_steps = max_steps
        self.params = dict(local_sgd.named)

    def sharded_state(self) -> list[Piece]:
        pieces = []
        dp_replica = self.grid.rank("dp") != 0
        for n, state in self.local_sgd.state_by_name().items():
            p = self.params[n]
            replica = dp_replica or _written_elsewhere(p, self.grid)
            for k, v in state.items():
                pieces += placed(
                    f"outer/{n}/{k}", v, placement_of(p), replica=replica, file="outer"
                )
        return pieces

    def record(self) -> dict:
        return {"local_sgd": self.local_sgd.checkpoint_record(self.step(), self.max_steps)}

    def load_sharded(self, reader: Reader) -> Callable[[], None]:
        """A checkpoint without outer state (no local SGD, or its momentum off) starts it
        from the parameters (`LocalSGD.load_state_by_name`), so the model loads first."""
        state: dict[str, dict[str, torch.Tensor]] = {}
        for n, p in self.params.items():
            prefix = f"outer/{n}/"
            for name in reader.names(prefix):
                state.setdefault(n, {})[name[len(prefix) :]] = reader.read_placed(
                    name, placement_of(p), tuple(p.shape)
                )
        return partial(self.local_sgd.load_state_by_name, state)


class ReducerState:
    """Gradient compression's per-rank state (PowerSGD's error feedback and Q's), stored as
    `rank/<world rank>/<name>`. It belongs to one dp rank of one layout: in another layout,
    or from a checkpoint without it (another grad_compression, powersgd_rank), it starts
    afresh (zero error, seeded Q) with a warning. The warmup counts training steps, so a
    resumed run does not repeat it."""

    def __init__(self, compressor: Compressor, grid: Grid):
        self.compressor = compressor
        self.grid = grid
        self.prefix = f"rank/{grid.world.Get_rank()}/"

    def sharded_state(self) -> list[Piece]:
        return [
            whole(self.prefix + k, t, file="rank") for k, t in self.compressor.state_dict().items()
        ]

    def record(self) -> dict:
        return {}

    def load_sharded(self, reader: Reader) -> Callable[[], None]:
        saved = reader.meta["grid"]
        same_layout = saved == self.grid.dims
        state = {
            name[len(self.prefix) :]: reader.read(name)
            for name in (reader.names(self.prefix) if same_layout else [])
        }
        why = None
        if not same_layout:
            why = f"the layout changed ({saved} -> {self.grid.dims})"
        elif not state:
            why = "the checkpoint holds none"
        return partial(self._apply, reader.meta["step"], state, why, reader.folder)

    def _apply(self, step: int, state: dict, why: str | None, folder) -> None:
        self.compressor.steps = step  # on every rank: the warmup is decided alike
        if not self.compressor.state_dict():
            return
        if why is None:
            why = self.compressor.load_state_dict(state)
        if why is not None:
            print0(
                f"warning: resuming from {folder}, the gradient compression state (error "
                f"feedback, warm-start Q) starts afresh: {why}"
            )


def stateful_parts(
    grid: Grid,
    model: nn.Module,
    optimizer,
    *,
    local_sgd: LocalSGD | None = None,
    compressor: Compressor | None = None,
    step: Callable[[], int] = lambda: 0,
    max_steps: int = 0,
) -> list[Stateful]:
    """The checkpointed parts of a rank's model, optimizer and their wrappers, in the order
    they load (the model before what falls back to its parameters). `step` and `max_steps`
    say, under local SGD, whether the dp ranks' models agree when a checkpoint is taken."""
    parts: list[Stateful]
    if isinstance(optimizer, ShardedOptimizer):
        parts = [ShardedOptimizerState(optimizer, grid)]
    else:
        per_dp_rank = local_sgd is not None
        parts = [
            ModelState(model, grid, per_dp_rank),
            OptimizerState(model, optimizer, grid, per_dp_rank),
        ]
    if local_sgd is not None:
        parts.append(OuterState(local_sgd, grid, step, max_steps))
    if compressor is not None:
        parts.append(ReducerState(compressor, grid))
    return parts
