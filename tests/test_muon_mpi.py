"""Muon across ranks: orthogonalisation spread over dp equals single-rank Muon, in training too."""

import pytest
import torch

from hpcllm.checkpoint.index import placement_of
from hpcllm.config import Config, ParallelConfig
from hpcllm.distributed.parallelize import loss_function, parallelize
from hpcllm.distributed.topology import Grid
from hpcllm.models.gpt import GPT, ModelConfig, cross_entropy
from hpcllm.optim.muon import Muon, param_groups

from helpers import TINY, assert_close_dicts, assert_reordered_close, losses, resume_elsewhere

CFG = ModelConfig(vocab_size=40, block_size=8, n_layer=3, n_head=2, d_model=16)


def steps_of_muon(comm, num_steps=4, tp_comm=None) -> tuple[dict, dict]:
    """Parameters after `num_steps` of Muon on the same data everywhere (so every rank holds
    the gradients that a dp all-reduce would give), and their placements; with `tp_comm`,
    this tp rank's shards."""
    model = GPT(CFG, init_seed=3)
    loss_fn = cross_entropy
    if tp_comm is not None:
        grid = Grid.build(tp_comm.comm, dp=1, pp=1, tp=tp_comm.size)
        config = Config(model=CFG, parallel=ParallelConfig(tp=tp_comm.size))
        model = parallelize(model, grid, config, tp_comm)
        loss_fn = loss_function(config, tp_comm)
    groups = param_groups(model.named_parameters(), lr=1e-2, muon_lr=0.05, weight_decay=0.1)
    # AdamW's eps 1e-5 for the embeddings and vectors: tensor parallelism changes summation
    # orders, and the key bias's gradient is zero in exact arithmetic (softmax ignores a
    # constant added to every key), so ~1e-9 noise there would become lr-sized steps with
    # eps 1e-8 (test_tensor_parallel's TP_ADAM_EPS says more).
    opt = Muon(groups, comm=comm, tp_comm=tp_comm, eps=1e-5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(num_steps):
        x = torch.randint(CFG.vocab_size, (4, CFG.block_size), generator=gen)
        opt.zero_grad()
        loss_fn(model(x), x).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, {
        n: placement_of(p) for n, p in model.named_parameters()
    }


@pytest.mark.numerics
@pytest.mark.mpi(ranks=[2, 4], timeout=120)
def test_distributed_muon_equals_single_rank_muon(comm):
    from hpcllm.distributed.comm import TensorComm

    tc = TensorComm(comm, name="dp")
    start = [p.detach().clone() for p in GPT(CFG, init_seed=3).parameters()]
    spread = steps_of_muon(tc)[0].values()
    alone = steps_of_muon(None)[0].values()
    # Each matrix is orthogonalised whole, on one rank, by the same operations as alone.
    for p, q in zip(spread, alone, strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    assert any(not torch.equal(p, s) for p, s in zip(spread, start, strict=True))


@pytest.mark.numerics
@pytest.mark.mpi(ranks=2, timeout=120)
def test_muon_under_tp_equals_single_rank_muon(comm):
    """At tp 2 each rank holds half of every hidden matrix; Muon orthogonalises the whole
    matrices (gathered over tp) and each rank keeps its slice: single-rank Muon's result."""
    from test_tensor_parallel import local_part

    from hpcllm.distributed.comm import TensorComm

    sharded, placements = steps_of_muon(None, tp_comm=TensorComm(comm, name="tp"))
    alone, _ = steps_of_muon(None)
    assert sharded.keys() == alone.keys()
    split = [n for n, p in placements.items() if p is not None and ".blocks." in f".{n}"]
    assert len([n for n in split if n.endswith("weight")]) == 4 * CFG.n_layer  # qkv, proj, fc, proj
    for name, mine in sharded.items():
        placement = placements[name]
        expected = (
            alone[name] if placement is None else local_part(alone[name], placement, mine.shape)
        )
        # tp 2 computes every matrix product from halves: the same maths in another order.
        assert_reordered_close(mine, expected, steps=4, msg=name)


def muon_job(shards, **more) -> dict:
    """8 steps of Muon at a constant rate, checkpointing at 4 (conftest's reference_run trains
    each such job once)."""
    constant_lr = {"optim.warmup_steps": 0, "optim.min_lr": TINY["optim.lr"]}
    return {
        **constant_lr,
        "data.path": shards,
        "optim.name": "muon",
        "train.max_steps": 8,
        "checkpoint.every": 4,
        **more,
    }


# dp 2 and one rank's 2 micro-batches sum the batch in another order: fp32 rounding, 8 steps.
LOSS_TOL = {"rtol": 1e-5, "atol": 0.0}


def test_muon_training_dp2_equals_dp1_with_accumulation(reference_run, shards):
    dp2, _ = reference_run(2, muon_job(shards))
    dp1, _ = reference_run(None, muon_job(shards, **{"train.grad_accum_steps": 2}))
    ref, got = losses(dp2), losses(dp1)
    assert sorted(ref) == sorted(got) == list(range(1, 9))
    assert_close_dicts(got, ref, **LOSS_TOL)
    # And Muon is not AdamW: the same run with AdamW takes another path.
    adamw, _ = reference_run(None, muon_job(shards, **{"optim.name": "adamw"}))
    assert losses(adamw)[8] != pytest.approx(ref[8], rel=1e-3)


def test_muon_resume_continues_exactly_across_layouts(reference_run, shards, tmp_path):
    """Muon's momentum is saved with the checkpoint: the step-4 checkpoint of 8 steps on dp 2,
    resumed on dp 1 (same global batch), repeats steps 5-8."""
    dp2, _ = reference_run(2, muon_job(shards))
    dp1 = muon_job(shards, **{"train.grad_accum_steps": 2})
    resume_elsewhere(dp2, 4, tmp_path / "resumed", None, dp1, loss_tol=LOSS_TOL)
