"""Building this rank's part of the model, and parallelising it from outside the model.

`build_stage` turns the config and the grid into this rank's module: the blocks of its
pipeline stage (`split_layers` decides which), with the embeddings on the first stage and
the final norm and LM head on the last. Only those modules are ever built, so no rank holds
the whole model; parameters keep the full model's names and are initialised per name, so
the weights do not depend on the layout.

`parallelize(model, grid, cfg)` is then the one place where modules are swapped by name for
their parallel versions, as torchtitan's `parallelize` does: model.py never learns about
ranks. Tensor parallelism will do it here (column-parallel `attn.qkv` and `mlp.fc`,
row-parallel `attn.proj` and `mlp.proj`, a vocab-parallel `wte` and `lm_head`); with tp = 1,
all that exists today, there is nothing to swap and the stage is returned as built.
"""

from __future__ import annotations

from hpcllm.config import Config
from hpcllm.model import GPT
from hpcllm.parallel.pipeline import split_layers
from hpcllm.topology import Grid


def build_stage(cfg: Config, grid: Grid, device) -> GPT:
    """This rank's pipeline stage of the GPT (the whole model when pp = 1)."""
    layers = split_layers(cfg.model.n_layer, grid.size("pp"), cfg.parallel.stage_layers)
    model = GPT(
        cfg.model,
        layers=layers[grid.rank("pp")],
        first=grid.is_first_stage,
        last=grid.is_last_stage,
        init_seed=cfg.train.seed,
    )
    return parallelize(model, grid, cfg).to(device)


def parallelize(model: GPT, grid: Grid, cfg: Config) -> GPT:
    """Apply the grid's module-swapping parallelisms to this rank's stage, by module name.

    Only tensor parallelism swaps modules, and tp = 1 today (config.validate refuses any
    other value), so the stage comes back unchanged; data parallelism works on gradients
    (DataParallel) and pipeline parallelism on which modules exist (`build_stage`).
    """
    assert grid.size("tp") == cfg.parallel.tp == 1, "tensor parallelism is not implemented yet"
    return model
