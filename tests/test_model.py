"""The GPT model on its own (no MPI): shapes, causality, pipeline stages, tied weights, sampling."""

import dataclasses
import math

import pytest
import torch

from hpcllm.models.gpt import GPT, ModelConfig, cross_entropy, param_groups

CFG = ModelConfig(vocab_size=67, block_size=16, n_layer=3, n_head=4, d_model=32)
SEED = 3


def tokens(batch=2, length=12, seed=0, vocab=CFG.vocab_size):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_shape_and_initial_loss():
    model = GPT(CFG, init_seed=SEED).eval()
    x = tokens()
    logits = model(x)
    assert logits.shape == (2, 12, CFG.vocab_size)
    loss = cross_entropy(logits, tokens(seed=1))
    assert loss.dim() == 0
    # Small initial weights give near-uniform predictions: loss close to ln(vocab).
    assert abs(loss.item() - math.log(CFG.vocab_size)) < 0.1


def test_longer_than_context_is_an_error():
    with pytest.raises(ValueError, match=r"longer than the model's context"):
        GPT(CFG, init_seed=SEED)(tokens(length=CFG.block_size + 1))


def test_unresolved_vocab_or_context_is_an_error():
    # The config's 0 means "take it from the data": the trainer resolves it before building.
    for unresolved in ({"vocab_size": 0}, {"block_size": 0}):
        with pytest.raises(ValueError, match=r"must be set \(positive\) before the model is built"):
            GPT(dataclasses.replace(CFG, **unresolved))


@pytest.mark.numerics
def test_causality():
    model = GPT(CFG, init_seed=SEED).eval()
    x = tokens(batch=1, length=CFG.block_size)
    base = model(x)
    for t in (3, 9, CFG.block_size - 1):
        changed = x.clone()
        changed[0, t] = (changed[0, t] + 1) % CFG.vocab_size
        out = model(changed)
        # Positions before t cannot see token t; position t and later do.
        torch.testing.assert_close(out[0, :t], base[0, :t], rtol=0, atol=1e-6)
        assert (out[0, t] - base[0, t]).abs().max() > 1e-4


def test_same_seed_same_weights_other_seed_differs():
    a, b = GPT(CFG, init_seed=SEED).state_dict(), GPT(CFG, init_seed=SEED).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = GPT(CFG, init_seed=SEED + 1).state_dict()
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])


@pytest.mark.numerics
@pytest.mark.parametrize("split", [1, 2])
def test_pipeline_stages_equal_the_full_model(split):
    full = GPT(CFG, init_seed=SEED)
    first = GPT(CFG, layers=range(0, split), first=True, last=False, init_seed=SEED)
    last = GPT(CFG, layers=range(split, CFG.n_layer), first=False, last=True, init_seed=SEED)

    # Same names, same initial values: a stage is exactly its slice of the full model.
    full_params = dict(full.named_parameters())
    stage_params = {**dict(first.named_parameters()), **dict(last.named_parameters())}
    assert sorted(stage_params) == sorted(full_params)
    assert not set(dict(first.named_parameters())) & set(dict(last.named_parameters()))
    for name, p in stage_params.items():
        assert torch.equal(p, full_params[name]), name
    assert "lm_head.weight" in dict(last.named_parameters()) and "wte.weight" in dict(
        first.named_parameters()
    )

    x, y = tokens(), tokens(seed=1)
    hidden = first(x)
    assert hidden.shape == (2, 12, CFG.d_model)
    loss_staged = cross_entropy(last(hidden), y)
    loss_full = cross_entropy(full(x), y)
    torch.testing.assert_close(loss_staged, loss_full, rtol=0, atol=0)

    # Backward through the stages gives the full model's gradients.
    loss_staged.backward()
    loss_full.backward()
    for name, p in stage_params.items():
        torch.testing.assert_close(p.grad, full_params[name].grad, rtol=1e-6, atol=1e-7, msg=name)


def test_tied_embeddings_share_storage():
    cfg = dataclasses.replace(CFG, tie_embeddings=True)
    model = GPT(cfg, init_seed=SEED)
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    untied = GPT(CFG, init_seed=SEED)
    n_tied = sum(p.numel() for p in model.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == CFG.vocab_size * CFG.d_model
    with torch.no_grad():
        model.wte.weight[0, 0] = 123.0
    assert model.lm_head.weight[0, 0].item() == 123.0
    # The shared matrix appears once in the optimizer groups.
    grouped = [p for g in param_groups(model, 0.1) for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    # A last pipeline stage holds the shared weight as `wte` too (its head's weight), with
    # the first stage's initial values, so both ends of the pipeline start from one matrix.
    first = GPT(cfg, layers=range(0, 1), first=True, last=False, init_seed=SEED)
    last = GPT(cfg, layers=range(1, 3), first=False, last=True, init_seed=SEED)
    assert last.lm_head.weight is last.wte.weight and not hasattr(last, "wpe")
    assert [n for n, _ in last.named_parameters()].count("wte.weight") == 1
    assert "lm_head.weight" not in dict(last.named_parameters())
    fresh = GPT(cfg, init_seed=SEED)
    assert torch.equal(first.wte.weight, fresh.wte.weight)
    assert torch.equal(last.wte.weight, fresh.wte.weight)


def test_param_groups_decay_only_matrices():
    model = GPT(CFG, init_seed=SEED)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(
        p.dim() == 1 for p in no_decay["params"]
    )
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_generate_length_and_determinism():
    model = GPT(CFG, init_seed=SEED).eval()
    prompt = tokens(batch=1, length=5)
    out = model.generate(prompt, 30, top_k=10, generator=torch.Generator().manual_seed(0))
    # Longer than block_size: the context is cropped, the output still grows by one per step.
    assert out.shape == (1, 35)
    assert torch.equal(out[:, :5], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < CFG.vocab_size
    again = model.generate(prompt, 30, top_k=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    # top_k=1 is greedy: each new token is the argmax of the logits.
    greedy = model.generate(prompt, 3, top_k=1)
    assert greedy[0, 5].item() == model(prompt)[0, -1].argmax().item()


@pytest.mark.parametrize(
    "changes",
    [{}, {"tie_embeddings": True}, {"arch": "llama", "n_kv_head": 2, "ffn_hidden": 96}],
    ids=["gpt2", "gpt2-tied", "llama-gqa"],
)
def test_matrix_parameter_count_from_the_shape_equals_the_model(changes):
    """The memory check before allocating counts parameters from the shape alone."""
    cfg = dataclasses.replace(CFG, **changes)
    model = GPT(cfg, init_seed=SEED)
    matrices = {id(p): p for p in model.parameters() if p.dim() == 2}  # tied: one tensor
    position = cfg.block_size * cfg.d_model if cfg.arch == "gpt2" else 0  # wpe: not counted
    assert sum(p.numel() for p in matrices.values()) - position == cfg.num_matrix_params()
