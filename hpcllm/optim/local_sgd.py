"""Partial synchronisation: local SGD and DiLoCo's outer step (`parallel.sync_every H > 1`).

With H > 1 the dp ranks skip the gradient all-reduce: each takes optimizer steps on its own
gradients (its own AdamW moments too, as DiLoCo keeps them) and every H steps the models are
averaged over the dp communicator, in fp32, in one flat all-reduce. The averaged model drives
an outer step (DiLoCo, Douillard et al. 2023) from the parameters at the previous average, the
anchor:

    delta  = anchor - mean_over_dp(params)        # the outer "gradient"
    m      = mu * m + delta                       # outer momentum (mu = outer_momentum)
    anchor = anchor - outer_lr * (delta + mu * m) # Nesterov; anchor - outer_lr * delta if mu = 0
    params = anchor                               # on every dp rank

outer_lr 1 and momentum 0 is plain model averaging: the anchor becomes the mean itself. The
anchor and momentum are identical on every dp rank (each stage and tp shard keeps its own
part), so a checkpoint stores them once, like the parameters; between averages each dp rank's
parameters and moments differ and every dp rank writes its own (hpcllm/training/state.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hpcllm.config import ParallelConfig
from hpcllm.distributed.comm import TensorComm


class LocalSGD:
    """The outer loop over this rank's stage: `after_step` averages the models (and takes the
    outer step) every `sync_every` optimizer steps and at the last step."""

    def __init__(
        self,
        model: nn.Module,
        comm: TensorComm,
        sync_every: int,
        outer_lr: float = 1.0,
        outer_momentum: float = 0.0,
    ):
        self.comm = comm
        self.sync_every = sync_every
        self.outer_lr = outer_lr
        self.outer_momentum = outer_momentum
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in self.named]
        self.buffer = torch.cat([p.detach().reshape(-1).float() for p in params])
        self.anchor = self.buffer.clone()
        self.momentum = torch.zeros_like(self.anchor) if outer_momentum > 0 else None
        # Bytes one rank sends in a bandwidth-optimal (ring) all-reduce of the buffer:
        # 2 (n - 1) / n of it, the same measure as for the gradient all-reduce it replaces.
        n = comm.size
        self.bytes_per_sync = 2 * (n - 1) * self.buffer.numel() * 4 // n
        self.synced = False
        self._window_bytes, self._window_steps = 0, 0

    @classmethod
    def build(cls, model: nn.Module, comm: TensorComm, p: ParallelConfig) -> LocalSGD | None:
        """The outer loop that `parallel.sync_every`, `outer_lr` and `outer_momentum` ask
        for; None for sync_every 1 (gradients averaged every step)."""
        if p.sync_every == 1:
            return None
        return cls(model, comm, p.sync_every, p.outer_lr, p.outer_momentum)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """`flat` cut into tensors shaped as the parameters, in their order."""
        views, offset = [], 0
        for _, p in self.named:
            views.append(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return views

    def syncs_at(self, step: int, max_steps: int) -> bool:
        """Whether the models are averaged after optimizer step `step`: every sync_every
        steps, and at the last so that the run ends with one model."""
        return step % self.sync_every == 0 or step == max_steps

    def agreed_norm(self, local_norm: float) -> float:
        """The root mean square over dp of the ranks' own gradient norms (each clipped its
        own), so that every rank logs and checks for divergence the same number."""
        if self.comm.size == 1:
            return local_norm
        sq = torch.tensor([local_norm**2], dtype=torch.float64)
        self.comm.allreduce_(sq)
        return math.sqrt(sq.item() / self.comm.size)

    def after_step(self, step: int, max_steps: int) -> None:
        """Call after every optimizer step: averages the models when `step` is a sync step."""
        self.synced = self.syncs_at(step, max_steps)
        self._window_steps += 1
        if self.synced:
            self.average()
            self._window_bytes += self.bytes_per_sync

    @torch.no_grad()
    def average(self) -> None:
        """All-reduce the parameters over dp and take the outer step; every dp rank ends with
        the new anchor as its parameters."""
        views = self._views(self.buffer)
        for view, (_, p) in zip(views, self.named, strict=True):
            view.copy_(p)
        if self.comm.size > 1:
            self.comm.allreduce_(self.buffer)
            self.buffer.div_(self.comm.size)
        if self.outer_lr == 1.0 and self.momentum is None:
            self.anchor.copy_(self.buffer)  # plain averaging, exactly the mean
        else:
            step = self.anchor - self.buffer  # delta, the outer gradient
            if self.momentum is not None:
                self.momentum.mul_(self.outer_momentum).add_(step)
                step.add_(self.momentum, alpha=self.outer_momentum)  # Nesterov
            self.anchor.sub_(step, alpha=self.outer_lr)
        for view, (_, p) in zip(self._views(self.anchor), self.named, strict=True):
            p.copy_(view)

    def metrics(self) -> dict:
        """For the metrics record: whether the last step averaged, and the averaging's wire
        bytes per rank per step since the previous record."""
        record = {
            "synced": self.synced,
            "sync_bytes_per_step": self._window_bytes / max(1, self._window_steps),
        }
        self._window_bytes, self._window_steps = 0, 0
        return record

    # -- checkpoints -------------------------------------------------------------

    def state_by_name(self) -> dict[str, dict[str, torch.Tensor]]:
        """The outer state per parameter name: {"anchor": ..., "momentum": ...}."""
        state: dict[str, dict[str, torch.Tensor]] = {n: {} for n, _ in self.named}
        for kind, flat in (("anchor", self.anchor), ("momentum", self.momentum)):
            if flat is not None:
                for (n, _), view in zip(self.named, self._views(flat), strict=True):
                    state[n][kind] = view
        return state

    @torch.no_grad()
    def load_state_by_name(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore the outer state. A checkpoint without an anchor was taken where the dp
        ranks' models agree (every step of a run without local SGD): the parameters are the
        anchor. One without momentum starts it at zero."""
        for (n, p), anchor in zip(self.named, self._views(self.anchor), strict=True):
            anchor.copy_(state.get(n, {}).get("anchor", p))
        if self.momentum is not None:
            for (n, _), m in zip(self.named, self._views(self.momentum), strict=True):
                saved = state.get(n, {}).get("momentum")
                m.copy_(saved) if saved is not None else m.zero_()

    def checkpoint_record(self, step: int, max_steps: int) -> dict:
        """What meta.json says of local SGD at `step`: whether the dp ranks' models agree."""
        return {"sync_every": self.sync_every, "replicas_equal": self.syncs_at(step, max_steps)}


def check_resume(meta: dict, sync_every: int, dp: int, path) -> None:
    """Refuse to resume a checkpoint taken between two model averages, where the dp ranks hold
    different models, unless the run continues with local SGD on the same dp ranks."""
    record = meta.get("local_sgd")
    if record is None or record["replicas_equal"]:
        return
    saved_dp = meta["grid"]["dp"]
    if sync_every > 1 and dp == saved_dp:
        return
    raise ValueError(
        f"checkpoint {path} is at step {meta['step']}, between two model averages of local SGD "
        f"(parallel.sync_every {record['sync_every']}): its {saved_dp} dp ranks hold different "
        f"models. Resume it with parallel.dp {saved_dp} and parallel.sync_every > 1 (now dp "
        f"{dp}, sync_every {sync_every}), or from a checkpoint at a multiple of sync_every"
    )
