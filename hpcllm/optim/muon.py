"""Muon: momentum orthogonalised by a Newton-Schulz iteration, for hidden weight matrices.

Muon (Keller Jordan et al., 2024, as used in the modded-nanogpt speedruns) replaces each 2-D
hidden weight's momentum by the nearest semi-orthogonal matrix, approximated by five steps of
a quintic Newton-Schulz iteration, so that every direction of the update moves at the same
rate. Embeddings, the LM head and vectors (biases, norm gains) keep AdamW: this optimizer runs
both, one param group per kind, so the rest of hpcllm sees one ordinary torch optimizer (one
state dict, per-parameter state by name in checkpoints).

Distributed over data parallelism: after the gradient all-reduce every dp rank holds the same
gradients and momentum, so the expensive part, the orthogonalisation, is split. Each rank
orthogonalises its own 1/dp share of the matrices, and the updates are all-gathered over the
dp communicator in one flat buffer. Every rank then applies every update, which keeps the
parameters and the optimizer state identical everywhere: the result equals single-rank Muon,
and its state (momentum per parameter) is saved and restored like AdamW's, in any layout.

Under tensor parallelism a rank holds only a slice of each hidden matrix, and the
orthogonalisation of a slice is not the slice of the orthogonalisation. The tp ranks therefore
all-gather their momentum directions (one flat buffer), assemble each whole matrix from the
slices' placements, orthogonalise the whole matrices (split over dp as above) and keep their
own slice of each update: the same result as single-rank Muon, for twice the momentum's bytes
on the tp link per step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from hpcllm.checkpoint.index import Placement, placement_of

# Coefficients of the quintic iteration: chosen (Jordan) to push singular values into about
# [0.7, 1.2] in five steps rather than to converge exactly, which is all the update needs.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(
    g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with `g`'s singular vectors (Newton-Schulz)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1: inside the basin
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


def is_hidden_matrix(name: str, param: nn.Parameter) -> bool:
    """Muon's parameters: 2-D weights inside the transformer blocks, not the embeddings,
    the head or any vector."""
    return param.dim() == 2 and ".blocks." in f".{name}"


class Muon(torch.optim.Optimizer):
    """Muon for the groups marked `muon=True`, AdamW for the others.

    Build the groups with `param_groups(model, ...)`. `comm` (the dp TensorComm) spreads the
    orthogonalisation over the data-parallel ranks; without it every matrix is done here.
    """

    def __init__(
        self,
        groups: list[dict],
        *,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.float32,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        comm=None,
        tp_comm=None,
    ):
        for group in groups:
            if "muon" not in group or "lr" not in group:
                raise ValueError("every Muon param group needs 'muon' (bool) and 'lr'")
        defaults = {
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_steps": ns_steps,
            "betas": betas,
            "eps": eps,
            "weight_decay": 0.0,
        }
        super().__init__(groups, defaults)
        self.ns_dtype = ns_dtype
        self.comm = comm
        self.tp_comm = tp_comm if tp_comm is not None and tp_comm.size > 1 else None
        # Every tp rank's placement of each sharded matrix (exchanged once; small objects).
        self._placements: dict[int, list[Placement]] = {}

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Muon does not take a closure")
        for group in self.param_groups:
            if group["muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)

    # -- Muon --------------------------------------------------------------------------

    def _momentum_direction(
        self, p: nn.Parameter, group: dict, grad: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Update the momentum buffer with `grad` (default p.grad); the matrix to
        orthogonalise (Nesterov look-ahead)."""
        grad = p.grad if grad is None else grad
        assert grad is not None
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
        buf = state["momentum_buffer"]
        grad = grad.float()
        buf.lerp_(grad, 1 - group["momentum"])
        return grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf.clone()

    def _muon_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        directions = [self._momentum_direction(p, group) for p in params]
        if self.tp_comm is not None:
            directions = self._whole_matrices(params, directions)
        updates = self._orthogonalized(directions, group["ns_steps"])
        for p, update in zip(params, updates, strict=True):
            scale = update_scale(update.shape)
            placement = placement_of(p)
            if self.tp_comm is not None and placement is not None:
                update = local_slice(update, placement, p.shape)
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update.to(p.dtype), alpha=-group["lr"] * scale)

    def _orthogonalized(self, directions: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
        """Orthogonalise every matrix: here, or this rank's share then an all-gather."""
        if self.comm is None or self.comm.size == 1:
            return [orthogonalize(d, steps, self.ns_dtype) for d in directions]
        size, rank = self.comm.size, self.comm.rank
        owner = assign_owners([d.numel() for d in directions], size)
        sizes = [
            sum(d.numel() for d, o in zip(directions, owner, strict=True) if o == r)
            for r in range(size)
        ]
        # One flat buffer, one equal-sized segment per rank (padded), in rank order.
        segment = max(sizes)
        device = directions[0].device
        mine = torch.zeros(segment, dtype=torch.float32, device=device)
        offset = 0
        for d, o in zip(directions, owner, strict=True):
            if o == rank:
                mine[offset : offset + d.numel()] = orthogonalize(d, steps, self.ns_dtype).reshape(
                    -1
                )
                offset += d.numel()
        flat = self.comm.allgather(mine)
        updates: list[torch.Tensor] = []
        offsets = [r * segment for r in range(size)]
        for d, o in zip(directions, owner, strict=True):
            updates.append(flat[offsets[o] : offsets[o] + d.numel()].view_as(d))
            offsets[o] += d.numel()
        return updates

    def _whole_matrices(
        self, params: list[nn.Parameter], directions: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Tensor parallelism: each sharded matrix's whole direction, from every tp rank's
        slice (one all-gather of all slices; every rank's slices have the same shapes)."""
        assert self.tp_comm is not None
        sharded = [i for i, p in enumerate(params) if placement_of(p) is not None]
        for i in sharded:
            if id(params[i]) not in self._placements:
                self._placements[id(params[i])] = self.tp_comm.comm.allgather(
                    placement_of(params[i])
                )
        if not sharded:
            return directions
        flat = torch.cat([directions[i].reshape(-1) for i in sharded])
        every = self.tp_comm.allgather(flat).view(self.tp_comm.size, -1)
        whole = list(directions)
        offset = 0
        for i in sharded:
            n = directions[i].numel()
            placements = self._placements[id(params[i])]
            full = directions[i].new_zeros(placements[0].shape)
            for r, placement in enumerate(placements):
                local = every[r, offset : offset + n].view_as(directions[i])
                for start, stop, box in placement.parts:
                    d = placement.dim
                    full.narrow(d, box.offset[d], box.length[d]).copy_(
                        local.narrow(d, start, stop - start)
                    )
            whole[i] = full
            offset += n
        return whole

    # -- AdamW for the rest -------------------------------------------------------------

    def _adamw_group(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
            step = state["step"].item()
            grad = p.grad.float()
            state["exp_avg"].lerp_(grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias1, bias2 = 1 - beta1**step, 1 - beta2**step
            # The same operations, in the same order, as torch.optim.AdamW (foreach=False).
            denom = (state["exp_avg_sq"].sqrt() / bias2**0.5).add_(group["eps"])
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.addcdiv_(state["exp_avg"].to(p.dtype), denom.to(p.dtype), value=-group["lr"] / bias1)


def update_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """Scale so that the update's RMS does not shrink for tall matrices (fan-out > fan-in),
    by the whole matrix's shape."""
    return max(1.0, shape[0] / shape[1]) ** 0.5


def assign_owners(numels: list[int], size: int) -> list[int]:
    """Which rank orthogonalises each matrix: largest first, each to the least-loaded rank,
    so the ranks' shares of the work (and of the gathered buffer) stay close."""
    load = [0] * size
    owner = [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: -numels[i]):
        r = min(range(size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += numels[i]
    return owner


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    *,
    lr: float,
    muon_lr: float,
    weight_decay: float,
) -> list[dict]:
    """Muon for hidden matrices; AdamW with decay for other matrices, without for vectors.

    Each group keeps its peak learning rate as `initial_lr`, so a schedule can scale them all.
    """
    muon, decay, no_decay = [], [], []
    for name, p in named_params:
        if is_hidden_matrix(name, p):
            muon.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": muon, "muon": True, "lr": muon_lr, "weight_decay": weight_decay},
        {"params": decay, "muon": False, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "muon": False, "lr": lr, "weight_decay": 0.0},
    ]
    for g in groups:
        g["initial_lr"] = g["lr"]
    return groups


def local_slice(full: torch.Tensor, placement: Placement, shape: torch.Size) -> torch.Tensor:
    """This rank's slice of a whole matrix (zeros where the local tensor is padding)."""
    local = full.new_zeros(shape)
    d = placement.dim
    for start, stop, box in placement.parts:
        local.narrow(d, start, stop - start).copy_(full.narrow(d, box.offset[d], box.length[d]))
    return local
