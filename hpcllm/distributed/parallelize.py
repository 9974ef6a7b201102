"""Building this rank's part of the model, and parallelising it from outside the model.

`build_stage` turns the config and the grid into this rank's module: the blocks of its
pipeline stage (`split_layers` decides which), with the embeddings on the first stage and
the final norm and LM head on the last. Interleaved (parallel.virtual_stages V > 1), the
module holds the rank's V chunks, chunk v the blocks of virtual stage v * pp + pp rank. Only those modules are ever built, so no rank holds
the whole model; parameters keep the full model's names and are initialised per name, so
the weights do not depend on the layout.

`parallelize(model, grid, cfg, tp_comm)` is then the one place where modules are swapped by
name for their parallel versions, as torchtitan's `parallelize` does: model.py never learns
about ranks. Tensor parallelism swaps `attn.qkv` and `mlp.fc` (llama: `attn.q/k/v`, `mlp.gate/up`, whose
shared input is copied into the parallel region once per module) for column-parallel layers, `attn.proj` and `mlp.proj` for row-parallel ones, llama's QK-norms
for `HeadNorm`s (their replicated weight meets a rank's own heads only), `wte` for a vocab-parallel embedding and
`lm_head` for a column-parallel head over the vocabulary; `loss_function` gives the schedule
the matching (vocab-parallel) loss.
"""

from __future__ import annotations

from functools import partial

import torch.nn as nn

from hpcllm.config import Config
from hpcllm.distributed.comm import TensorComm
from hpcllm.distributed.pipeline import LossFn, rank_chunks, split_layers
from hpcllm.distributed.tensor_parallel import (
    ColumnParallelLinear,
    HeadNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_input,
    dropout_rng,
    padded_vocab,
    vocab_parallel_cross_entropy,
)
from hpcllm.distributed.tied import mark_replica
from hpcllm.distributed.topology import Grid
from hpcllm.models.gpt import GPT, cross_entropy


def build_stage(cfg: Config, grid: Grid, device, tp_comm: TensorComm | None = None) -> GPT:
    """This rank's pipeline stage of the GPT (the whole model when pp = 1), with this tp
    rank's shards of its weights (`tp_comm` by default the grid's tp group, host buffers)."""
    if tp_comm is None:
        tp_comm = TensorComm(grid.comm("tp"), name="tp")
    model = stage_module(cfg, grid, tp_comm)
    # Created there already under a device context (the planner's meta or fake tensors).
    tensors = [*model.parameters(), *model.buffers()]
    return model if all(t.device == device for t in tensors) else model.to(device)


def stage_module(cfg: Config, grid: Grid, tp_comm: TensorComm) -> GPT:
    """`build_stage` before its move to the device: created wherever tensors are created by
    default (the layout planner builds it on meta or fake tensors)."""
    p, pp = cfg.parallel, grid.size("pp")
    layers = split_layers(cfg.model.n_layer, pp, p.stage_layers, p.virtual_stages)
    chunks = rank_chunks(layers, pp, grid.rank("pp"))
    model = GPT(
        cfg.model,
        layers=chunks[0] if len(chunks) == 1 else chunks,
        first=grid.is_first_stage,
        last=grid.is_last_stage,
        init_seed=cfg.train.seed,
    )
    return parallelize(model, grid, cfg, tp_comm)


def parallelize(model: GPT, grid: Grid, cfg: Config, tp_comm: TensorComm) -> GPT:
    """Apply the grid's module-swapping parallelisms to this rank's stage, by module name.

    Only tensor parallelism swaps modules; data parallelism works on gradients
    (DataParallel) and pipeline parallelism on which modules exist (`build_stage`). The
    dense modules were initialised in full; each parallel module keeps this rank's slice.
    """
    assert grid.size("tp") == tp_comm.size == cfg.parallel.tp
    if tp_comm.size > 1:
        _tensor_parallel(model, cfg, tp_comm)
    # The last stage's copy of a weight tied across stages (hpcllm/distributed/tied.py).
    mark_replica(model)
    return model


def _tensor_parallel(model: GPT, cfg: Config, tp_comm: TensorComm) -> None:
    """Swap the dense modules for tensor-parallel ones, by name (see `parallelize`)."""
    padded = padded_vocab(cfg.model.vocab_size, tp_comm.size)
    for name, module in list(model.named_modules()):
        new: nn.Module | None = None
        if name.endswith(".attn.qkv"):
            # Three segments (q, k, v): each rank keeps its heads' rows of all three.
            new = ColumnParallelLinear.from_dense(module, tp_comm, groups=3)
        elif name.endswith(".mlp.fc"):
            new = ColumnParallelLinear.from_dense(module, tp_comm)
        elif name.endswith((".attn.q", ".attn.k", ".attn.v", ".mlp.gate", ".mlp.up")):
            # They share their module's input, copied once (below): one all-reduce of its
            # gradient for q, k and v together, one for gate and up.
            new = ColumnParallelLinear.from_dense(module, tp_comm, copy_input=False)
        elif name.endswith((".attn.q_norm", ".attn.k_norm")):
            new = HeadNorm(module, tp_comm)
        elif name.endswith((".attn.proj", ".mlp.proj")):
            new = RowParallelLinear.from_dense(module, tp_comm)
        elif name == "wte":
            new = VocabParallelEmbedding.from_dense(module, tp_comm, padded)
        elif name == "lm_head":
            new = ColumnParallelLinear.from_dense(module, tp_comm, padded=padded)
        elif name.endswith(".attn"):
            module.dropout_rng = dropout_rng(tp_comm)
        if cfg.model.arch == "llama" and name.endswith((".attn", ".mlp")):
            copy_input(module, tp_comm)
        if new is not None:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, new)
    if cfg.model.tie_embeddings and model.last:
        # The same vocabulary rows on this rank; on a last stage that does not embed, the
        # copy of the first stage's shard.
        model.lm_head.weight = model.wte.weight


def loss_function(cfg: Config, tp_comm: TensorComm) -> LossFn:
    """The loss the schedule applies to the last stage's output: plain cross-entropy, or
    under tp the vocab-parallel one on this rank's logit shard."""
    if tp_comm.size == 1:
        return cross_entropy
    return partial(vocab_parallel_cross_entropy, comm=tp_comm, vocab_size=cfg.model.vocab_size)
