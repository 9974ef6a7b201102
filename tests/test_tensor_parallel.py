"""Tests of tensor parallelism: the parallel layers against dense ones, every layout with
tp > 1 on up to 4 ranks against the single-rank run, dropout streams, memory per rank, and
end to end (`python -m hpcllm.train`): tp 2 against tp 1 and checkpoints resumed across tp
(the tp 1 run is test_pipeline's one-rank run, shared through conftest's reference_run).

The vocabulary of the in-process tests (67) and of the byte shards (257) is odd, so every
tp > 1 run also exercises the vocabulary padding.
"""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mpi4py import MPI
from test_comm_mpi import cuda_mpi, cuda_setup
from test_pipeline import (
    D_MODEL,
    GRAD_CLIP,
    INIT_SEED,
    LOSS_TOL,
    N_LAYER,
    SEQ_LEN,
    SETTINGS,
    VAL_BATCHES,
    VAL_SEED,
    differences,
    layout_config,
    one_rank_run,
    single_rank_reference,
    step_batches,
)

from hpcllm.checkpoint.index import Placement, placement_of
from hpcllm.config import Config, ParallelConfig
from hpcllm.distributed.build import build_rank
from hpcllm.distributed.comm import TensorComm
from hpcllm.distributed.data_parallel import DataParallel
from hpcllm.distributed.parallelize import build_stage, loss_function, parallelize
from hpcllm.distributed.steps import (
    clip_grad_norm,
    evaluate,
    mean_over_grid,
    stage_inputs,
    train_step,
)
from hpcllm.distributed.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    padded_vocab,
    vocab_parallel_cross_entropy,
)
from hpcllm.distributed.topology import AXES, Grid
from hpcllm.models.gpt import GPT, ModelConfig, cross_entropy

from helpers import assert_close_dicts, losses, merged_params, resume_elsewhere

VOCAB = 67
TP_CFG = ModelConfig(
    vocab_size=VOCAB, block_size=SEQ_LEN, n_layer=N_LAYER, n_head=4, d_model=D_MODEL
)
TIED_CFG = ModelConfig(
    vocab_size=VOCAB,
    block_size=SEQ_LEN,
    n_layer=2,
    n_head=4,
    d_model=D_MODEL,
    tie_embeddings=True,
)
# llama under tp: grouped-query attention (2 key/value heads, one per tp rank) and QK-norm,
# whose replicated weights meet each rank's own heads only.
LLAMA_TP_CFG = ModelConfig(
    vocab_size=VOCAB,
    block_size=SEQ_LEN,
    n_layer=N_LAYER,
    n_head=4,
    d_model=D_MODEL,
    arch="llama",
    n_kv_head=2,
    qk_norm=True,
)
CPU = torch.device("cpu")
# AdamW's eps for the in-process layouts (test_pipeline explains why it is not 1e-8). Tensor
# parallelism also changes the summation order inside every block (row-parallel partial sums,
# the vocab-parallel loss), which leaves absolute gradient noise of ~1e-9 (measured). A
# gradient that is ~1e-7 in exact arithmetic (e.g. wte row 8 in the second step, samples cancelling)
# then differs by 1.5%, and with eps 1e-6 Adam's first step turns that into a 1.8e-6 weight
# difference; eps 1e-5 keeps such steps below lr * 1e-4 = 3e-7, and is still two orders below
# the real gradients (~1e-3), so Adam still normalises them.
TP_ADAM_EPS = 1e-5
# End to end, hpcllm.train's AdamW has eps 1e-8: the same ~1e-9 noise on a gradient that is
# ~0 in exact arithmetic moves such a weight by up to ~lr/10 differently between tp 1 and tp 2
# (measured: 3.6e-5 on one of 4096 elements over 6 steps). A fault moves weights by ~lr
# (3e-3); the exact comparison is the in-process test's.
TP_E2E_PARAM_TOL = {"atol": 1e-4, "rtol": 1e-5}


def local_part(full: torch.Tensor, placement: Placement, local_shape) -> torch.Tensor:
    """The local tensor a rank with `placement` holds of `full` (zeros where it is padding)."""
    local = full.new_zeros(local_shape)
    for start, stop, box in placement.parts:
        src = full.narrow(placement.dim, box.offset[placement.dim], box.length[placement.dim])
        local.narrow(placement.dim, start, stop - start).copy_(src)
    return local


def assemble(pieces: list[tuple[torch.Tensor, Placement | None]]) -> torch.Tensor:
    """The global tensor from every tp rank's (local tensor, placement)."""
    local, placement = pieces[0]
    if placement is None:
        return local
    full = torch.full(placement.shape, float("nan"))
    for local, placement in pieces:
        assert placement is not None
        for start, stop, box in placement.parts:
            full.narrow(placement.dim, box.offset[placement.dim], box.length[placement.dim]).copy_(
                local.narrow(placement.dim, start, stop - start)
            )
    assert not full.isnan().any(), "the tp shards do not cover the tensor"
    return full


def seeded(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- layers against dense ones


@pytest.mark.numerics
@pytest.mark.mpi(ranks=2, timeout=120)
def test_parallel_layers_match_dense(comm):
    """Forward outputs and every gradient of the column- (fused qkv: three segments),
    row-parallel and vocab-parallel layers and of the vocab-parallel cross-entropy equal the
    dense layers' (their rank's slice of them); replicated gradients are equal on both ranks."""
    tp = TensorComm(comm, name="tp")
    torch.manual_seed(0)
    B, T, C, V = 2, 5, 8, 67  # V odd: the vocabulary is padded to 68
    x_full = seeded(B, T, C, seed=1)

    # Column-parallel fused qkv: 3 segments, each rank keeps its half of q, of k and of v.
    qkv = nn.Linear(C, 3 * C)
    with torch.no_grad():
        qkv.weight.copy_(seeded(3 * C, C, seed=2))
        qkv.bias.copy_(seeded(3 * C, seed=3))
    col = ColumnParallelLinear.from_dense(qkv, tp, groups=3)
    half = C // 2
    rows = torch.cat(
        [torch.arange(g * C + tp.rank * half, g * C + (tp.rank + 1) * half) for g in range(3)]
    )
    x_dense = x_full.clone().requires_grad_()
    x_tp = x_full.clone().requires_grad_()
    out_dense, out_tp = qkv(x_dense), col(x_tp)
    torch.testing.assert_close(out_tp, out_dense[..., rows])
    g = seeded(B, T, 3 * C, seed=4)
    (out_dense * g).sum().backward()
    (out_tp * g[..., rows]).sum().backward()
    # The input's gradient is the sum of both ranks' parts: copy_to_parallel's all-reduce.
    torch.testing.assert_close(x_tp.grad, x_dense.grad)
    torch.testing.assert_close(col.weight.grad, qkv.weight.grad[rows])
    torch.testing.assert_close(col.bias.grad, qkv.bias.grad[rows])
    assert torch.equal(
        local_part(qkv.weight.detach(), placement_of(col.weight), col.weight.shape),
        col.weight.detach(),
    )

    # Row-parallel: each rank takes its half of the input features; the bias is replicated.
    proj = nn.Linear(4 * C, C)
    with torch.no_grad():
        proj.weight.copy_(seeded(C, 4 * C, seed=5))
        proj.bias.copy_(seeded(C, seed=6))
    row = RowParallelLinear.from_dense(proj, tp)
    h_full = seeded(B, T, 4 * C, seed=7)
    h_dense = h_full.clone().requires_grad_()
    h_tp = h_full.chunk(2, dim=-1)[tp.rank].clone().requires_grad_()
    y_dense, y_tp = proj(h_dense), row(h_tp)
    torch.testing.assert_close(y_tp, y_dense)
    g = seeded(B, T, C, seed=8)
    (y_dense * g).sum().backward()
    (y_tp * g).sum().backward()
    torch.testing.assert_close(h_tp.grad, h_dense.grad.chunk(2, dim=-1)[tp.rank])
    torch.testing.assert_close(row.weight.grad, proj.weight.grad.chunk(2, dim=1)[tp.rank])
    torch.testing.assert_close(row.bias.grad, proj.bias.grad)
    # Replicated: the same gradient bit for bit on both ranks, with no extra all-reduce.
    for t in (x_tp.grad, row.bias.grad):
        both = comm.allgather(t)
        assert torch.equal(both[0], both[1])

    # Vocab-parallel embedding and cross-entropy, V padded to 68 rows (34 per rank).
    emb = nn.Embedding(V, C)
    head = nn.Linear(C, V, bias=False)
    with torch.no_grad():
        emb.weight.copy_(seeded(V, C, seed=17))
        head.weight.copy_(seeded(V, C, seed=18))
    padded = padded_vocab(V, tp.size)
    assert padded == 68
    emb_tp = VocabParallelEmbedding.from_dense(emb, tp, padded)
    head_tp = ColumnParallelLinear.from_dense(head, tp, padded=padded)
    ids = torch.randint(V, (B, T), generator=torch.Generator().manual_seed(9))
    ids[0, :2] = torch.tensor([0, V - 1])  # both ends of the vocabulary
    targets = torch.randint(V, (B, T), generator=torch.Generator().manual_seed(10))
    targets[1, :2] = torch.tensor([V - 1, 33])  # the last real id, the last of rank 0
    h_dense, h_tp = emb(ids), emb_tp(ids)
    torch.testing.assert_close(h_tp, h_dense)
    logits_dense, logits_tp = head(h_dense), head_tp(h_tp)
    assert logits_tp.shape == (B, T, padded // 2)
    if tp.rank == 1:
        # The padded logit is h . 0 = 0, below the real ones; only the masking keeps it out.
        assert torch.equal(logits_tp[..., -1], torch.zeros(B, T))
    loss_dense = F.cross_entropy(logits_dense.reshape(-1, V), targets.reshape(-1))
    loss_tp = vocab_parallel_cross_entropy(logits_tp, targets, tp, V)
    torch.testing.assert_close(loss_tp, loss_dense)
    loss_dense.backward()
    loss_tp.backward()
    for mine, dense in ((emb_tp.weight, emb.weight), (head_tp.weight, head.weight)):
        torch.testing.assert_close(
            mine.grad, local_part(dense.grad, placement_of(mine), mine.shape)
        )
    if tp.rank == 1:  # the padded row: no gradient, so it stays zero
        assert torch.equal(emb_tp.weight.grad[-1], torch.zeros(C))
        assert torch.equal(head_tp.weight.grad[-1], torch.zeros(C))


# ---------------------------------------------------------------- training layouts


def run_tp_layout(
    comm,
    *,
    pp: int,
    dp: int,
    tp: int,
    schedule: str,
    num_micro: int,
    micro_batch: int,
    cfg,
    zero: int = 0,
    virtual_stages: int = 1,
) -> dict | None:
    """Train `cfg`'s GPT for 10 steps on `comm` laid out as pp x dp x tp (`virtual_stages`
    chunks per pp rank), built by hpcllm.train's own `build_rank` (parallelized stage,
    schedule with the vocab-parallel loss, dp, AdamW; under `zero` 1 ZeRO-1's sharded AdamW,
    with small buckets so shards cut through sharded, replicated and padded parameters alike).

    On rank 0 of `comm`: losses, gradient norms, validation loss, every parameter assembled
    from its tp shards under its global name, and which replicas (over dp, or over tp for a
    replicated parameter) differ bitwise; None on the other ranks.
    """
    grid = Grid.build(comm, dp=dp, pp=pp, tp=tp)
    parallel = ParallelConfig(
        pp=pp,
        dp=dp,
        tp=tp,
        schedule=schedule,
        virtual_stages=virtual_stages,
        zero=zero,
        bucket_mb=0.01 if zero else 25.0,
    )
    rank = build_rank(
        layout_config(cfg, parallel, micro_batch=micro_batch, num_micro=num_micro, eps=TP_ADAM_EPS),
        grid,
        CPU,
        {a: TensorComm(grid.comm(a), name=a) for a in AXES},
    )
    model, ddp, sched, optimizer = rank.model, rank.ddp, rank.schedule, rank.optimizer
    pp_comm, dp_comm, tp_comm = rank.comms["pp"], rank.comms["dp"], rank.comms["tp"]
    reads_data = grid.is_first_stage or grid.is_last_stage

    def inputs(seed: int, count: int) -> list[tuple]:
        batches = (
            step_batches(
                seed,
                num_micro=count,
                micro_batch=micro_batch,
                dp_rank=grid.rank("dp"),
                dp_size=dp,
                vocab=cfg.vocab_size,
            )
            if reads_data
            else [(None, None)] * count
        )
        return stage_inputs(batches, grid, CPU)

    losses, grad_norms = [], []
    for step in range(10):
        loss_sum = train_step(sched, ddp, inputs(step, num_micro), nullcontext())
        grad_norms.append(clip_grad_norm(model, GRAD_CLIP, [pp_comm], tp_comm, ddp))
        optimizer.step()
        losses.append(
            mean_over_grid(loss_sum, num_micro if grid.is_last_stage else 0, [pp_comm, dp_comm])
        )
    val_loss = evaluate(sched, inputs(VAL_SEED, VAL_BATCHES), [pp_comm, dp_comm], nullcontext())
    local = {n: (p.detach().clone(), placement_of(p)) for n, p in model.named_parameters()}
    gathered = comm.gather((grid.coords, local), root=0)
    grid.free()
    if comm.rank != 0:
        return None
    params, replicas_differ = {}, []
    names = {n for _, part in gathered for n in part}
    for name in sorted(names):
        holders = [(c, part[name]) for c, part in gathered if name in part]
        shards: dict[int, tuple] = {}
        for coords, (tensor, placement) in holders:
            # Replicas: the same (pp, tp) shard on every dp rank; a replicated parameter also
            # the same on every tp rank. Both must be bitwise equal.
            key = coords["tp"] if placement is not None else 0
            if key in shards and not torch.equal(shards[key][0], tensor):
                replicas_differ.append(f"{name} (dp {coords['dp']}, tp {coords['tp']})")
            shards.setdefault(key, (tensor, placement))
        params[name] = assemble([shards[k] for k in sorted(shards)])
    if cfg.tie_embeddings:
        params["lm_head.weight"] = params["wte.weight"]
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "val_loss": val_loss,
        "params": params,
        "replicas_differ": replicas_differ,
    }


@pytest.mark.mpi(ranks=4, timeout=240)
def test_tp_layouts_match_single_rank(comm):
    """tp 2 (untied and tied embeddings), tp 4, dp 2 x tp 2 (zero 0 and 1), pp 2 x tp 2
    under both schedules, and interleaved (2 chunks per pp rank) pp 2 x tp 2 and
    pp 2 x dp 2 under ZeRO-1: over 10 steps, the single-rank run's losses, gradient norms,
    validation loss and every parameter (fp32, atol 1e-6); dp and tp replicas bitwise equal."""
    rank = comm.rank
    wanted = [(2, TP_CFG), (4, TP_CFG), (2, TIED_CFG)]
    mine = {
        (m, c.tie_embeddings): single_rank_reference(m, cfg=c, eps=TP_ADAM_EPS)
        for m, c in wanted[rank::4]
    }
    reference = {k: r for part in comm.allgather(mine) for k, r in part.items()}

    runs = []  # (label, reference key, result on rank 0 of the layout's communicator)
    half = comm.Split(color=rank // 2, key=rank)
    cfg = (TP_CFG, TIED_CFG)[rank // 2]
    label = f"tp=2 tied={cfg.tie_embeddings}"
    result = run_tp_layout(
        half, pp=1, dp=1, tp=2, schedule="1f1b", num_micro=2, micro_batch=2, cfg=cfg
    )
    runs.append((label, (2, cfg.tie_embeddings), result))
    half.Free()
    layouts = [  # (pp, dp, tp, zero, schedule, micro-batches, micro-batch size, virtual stages)
        (1, 1, 4, 0, "1f1b", 2, 2, 1),
        (1, 2, 2, 0, "1f1b", 2, 1, 1),  # each dp rank takes one sample of the reference's two
        (1, 2, 2, 1, "1f1b", 2, 1, 1),
        (2, 1, 2, 0, "1f1b", 4, 2, 1),
        (2, 1, 2, 0, "gpipe", 4, 2, 1),
        (2, 1, 2, 0, "1f1b", 4, 2, 2),
        (2, 2, 1, 1, "1f1b", 2, 1, 2),
    ]
    for pp, dp, tp, zero, kind, m, mb, virtual in layouts:
        axes = {"pp": pp, "dp": dp, "tp": tp, "zero": zero, "virtual_stages": virtual}
        result = run_tp_layout(comm, **axes, schedule=kind, num_micro=m, micro_batch=mb, cfg=TP_CFG)
        label = f"pp={pp} (V={virtual}) x dp={dp} x tp={tp} zero {zero} {kind} m={m}"
        runs.append((label, (m, False), result))

    gathered = comm.gather([run for run in runs if run[2] is not None], root=0)
    if rank != 0:
        return
    results = [run for part in gathered for run in part]
    assert len(results) == 2 + len(layouts)
    problems = []
    for label, key, result in results:
        problems += differences(label, result, reference[key])
    assert not problems, "\n".join(problems)
    ref = reference[2, False]
    assert max(ref["grad_norms"]) > GRAD_CLIP  # clipping, by the norm over all shards, acted


@pytest.mark.numerics
@pytest.mark.mpi(ranks=2, timeout=120)
def test_llama_tp2_matches_single_rank(comm):
    """llama (GQA, QK-norm, SwiGLU, RoPE) at tp 2: the single-rank run's losses, gradient
    norms, validation loss and parameters, QK-norm weights included (their gradient is the
    sum over both ranks' heads)."""
    reference = (
        single_rank_reference(2, cfg=LLAMA_TP_CFG, eps=TP_ADAM_EPS) if comm.rank == 0 else None
    )
    result = run_tp_layout(
        comm, pp=1, dp=1, tp=2, schedule="1f1b", num_micro=2, micro_batch=2, cfg=LLAMA_TP_CFG
    )
    if comm.rank == 0:
        assert "blocks.0.attn.q_norm.weight" in result["params"]
        problems = differences("llama tp=2", result, reference)
        assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- dropout and memory


@pytest.mark.mpi(ranks=2, timeout=120)
def test_dropout_masks_match_where_replicated_and_differ_inside(comm, monkeypatch):
    """With dropout on, tp ranks draw the same masks on replicated activations (the block
    outputs agree bit for bit) and different ones for their own heads' attention."""
    tp = TensorComm(comm, name="tp")
    grid = Grid.build(comm, tp=2)
    cfg = ModelConfig(
        vocab_size=VOCAB, block_size=SEQ_LEN, n_layer=2, n_head=4, d_model=D_MODEL, dropout=0.5
    )
    model = parallelize(
        GPT(cfg, init_seed=INIT_SEED), grid, Config(model=cfg, parallel=ParallelConfig(tp=2)), tp
    )
    torch.manual_seed(123)  # hpcllm.train seeds every tp rank of a (pp, dp) coordinate alike
    seen = []  # the generator state each attention dropout starts from
    sdpa = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(torch.get_rng_state())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    outputs = []
    model.blocks["0"].register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
    x = torch.randint(VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    model.train()
    model(x)
    after = torch.get_rng_state()
    theirs = comm.allgather((seen, outputs, after))
    assert len(seen) == 2
    # Inside: each rank's heads draw from a stream of their own.
    assert all(not torch.equal(a, b) for a, b in zip(theirs[0][0], theirs[1][0], strict=True))
    # Outside: the block output (attention and MLP dropout on replicated activations) and the
    # default generator afterwards are the same on both ranks.
    assert torch.equal(theirs[0][1][0], theirs[1][1][0])
    assert torch.equal(theirs[0][2], theirs[1][2])
    # Dropout did act: without it the output differs.
    model.eval()
    outputs.clear()
    model(x)
    assert not torch.equal(outputs[0], theirs[comm.rank][1][0])
    grid.free()


@pytest.mark.mpi(ranks=2, timeout=120)
def test_parameters_and_gradients_per_rank_are_a_tp_share(comm):
    """Measured on the built stage and its gradient buckets: under tp 2 each rank holds half
    of every sharded weight (the vocabulary's padding row aside), the replicated ones whole."""
    cfg = Config(model=TP_CFG)
    dense = build_stage(cfg, Grid.build(MPI.COMM_SELF), CPU)
    cfg2 = Config(model=TP_CFG, parallel=ParallelConfig(tp=2))
    grid = Grid.build(comm, tp=2)
    model = build_stage(cfg2, grid, CPU)
    full = dict(dense.named_parameters())
    sharded = replicated = 0
    for name, p in model.named_parameters():
        placement = placement_of(p)
        if placement is None:
            assert p.shape == full[name].shape, name
            replicated += p.numel()
        else:
            extra = (
                (padded_vocab(VOCAB, 2) - VOCAB) * D_MODEL
                if name in ("wte.weight", "lm_head.weight")
                else 0
            )
            assert 2 * p.numel() == full[name].numel() + extra, name
            sharded += p.numel()
    dense_sharded = sum(full[n].numel() for n, p in model.named_parameters() if placement_of(p))
    assert sharded / dense_sharded == pytest.approx(0.5, abs=0.01)
    # Gradients live in the data-parallel buckets, sized by the local parameters.
    ddp = DataParallel(model, TensorComm(grid.comm("dp")))
    assert sum(b.buffer.numel() for b in ddp.buckets) == sharded + replicated
    grid.free()


@cuda_mpi
@pytest.mark.parametrize("path", ["cuda-aware", "staged"])
def test_cuda_tp_gpt_matches_dense(comm, path, monkeypatch):
    """tp 2 on CUDA tensors (through both MPI buffer paths of comm.py): the loss and every
    gradient of one forward and backward equal the dense model's on the CPU."""
    cuda_aware = cuda_setup(comm, path, monkeypatch)
    tp = TensorComm(comm, cuda_aware, name="tp")
    grid = Grid.build(comm, tp=2)
    config = Config(model=TP_CFG, parallel=ParallelConfig(tp=2))
    model = parallelize(GPT(TP_CFG, init_seed=INIT_SEED), grid, config, tp).cuda()
    dense = GPT(TP_CFG, init_seed=INIT_SEED)
    ((x, y),) = step_batches(0, num_micro=1, micro_batch=2, dp_rank=0, dp_size=1, vocab=VOCAB)
    loss = loss_function(config, tp)(model(x.cuda()), y.cuda())
    loss.backward()
    reference = cross_entropy(dense(x), y)
    reference.backward()
    torch.testing.assert_close(loss.cpu(), reference, atol=1e-5, rtol=1e-5)
    full = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        placement = placement_of(p)
        want = full[name].grad
        if placement is not None:
            want = local_part(want, placement, p.shape)
        torch.testing.assert_close(p.grad.cpu(), want, atol=1e-5, rtol=1e-4, msg=name)
    grid.free()


# ---------------------------------------------------------------- end to end


def tp2_run(reference_run, shards):
    """SETTINGS on tp 2 (2 ranks; one of model.n_head = 2 heads each), with an end-of-run
    sample, which merges the shards: (run folder, result). Its tp 1 counterpart is
    test_pipeline's one-rank run, the same job."""
    return reference_run(
        2, {**SETTINGS, "data.path": shards, "parallel.tp": 2, "run.sample_tokens": 12}
    )


def test_train_tp2_matches_tp1_and_writes_shards(reference_run, shards):
    (tp2, result), (tp1, _) = tp2_run(reference_run, shards), one_rank_run(reference_run, shards)
    assert_close_dicts(losses(tp2), losses(tp1), **LOSS_TOL)
    step6 = tp2 / "checkpoints/step_000006"
    assert_close_dicts(
        merged_params(step6),
        merged_params(tp1 / "checkpoints/step_000006"),
        **TP_E2E_PARAM_TOL,
    )
    assert sorted(p.name for p in step6.glob("model-*")) == [
        "model-pp0-dp0-tp0.safetensors",
        "model-pp0-dp0-tp1.safetensors",
    ]
    tensors = json.loads((step6 / "meta.json").read_text())["tensors"]
    # The fused qkv: each rank's heads are three boxes, its q, k and v rows.
    qkv = tensors["model/blocks.0.attn.qkv.weight"]
    assert qkv["shape"] == [3 * D_MODEL, D_MODEL]
    assert sorted((p["offset"][0], p["length"][0], p["file"][-15:-12]) for p in qkv["pieces"]) == [
        (0, 16, "tp0"),
        (16, 16, "tp1"),
        (32, 16, "tp0"),
        (48, 16, "tp1"),
        (64, 16, "tp0"),
        (80, 16, "tp1"),
    ]
    # The vocabulary without its padding row; a replicated tensor written once, by tp rank 0.
    wte = tensors["model/wte.weight"]
    assert wte["shape"] == [257, D_MODEL]
    assert sorted((p["offset"][0], p["length"][0]) for p in wte["pieces"]) == [(0, 129), (129, 128)]
    for name in (
        "model/blocks.0.ln_1.weight",
        "model/blocks.0.attn.proj.bias",
        "optim/blocks.0.mlp.fc.weight/step",
    ):
        assert [p["file"][-15:-12] for p in tensors[name]["pieces"]] == ["tp0"], name
    out = result.stdout
    assert out.count("sample:\n") == 1 and out.split("sample:\n", 1)[1].strip(), out[-2000:]


@pytest.mark.parametrize("written, resumed", [(2, 1), (1, 2)], ids=["tp2-to-tp1", "tp1-to-tp2"])
def test_checkpoint_resumes_under_another_tp(reference_run, shards, tmp_path, written, resumed):
    """The step-3 checkpoint of one tp, alone in a fresh run folder, resumed under the other:
    steps 4-6 repeat the uninterrupted run's losses (step 5 on depends on the restored AdamW
    state), and the final weights match."""
    run = tp2_run if written == 2 else one_rank_run
    source, _ = run(reference_run, shards)
    result = resume_elsewhere(
        source,
        3,
        tmp_path / "resumed",
        resumed,
        {**SETTINGS, "data.path": shards, "parallel.tp": resumed},
        loss_tol=LOSS_TOL,
        param_tol=TP_E2E_PARAM_TOL,
    )
    assert f"'tp': {written}}} -> {{'pp': 1, 'dp': 1, 'tp': {resumed}}}" in result.stdout, (
        result.stdout[-2000:]
    )
