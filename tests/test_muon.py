"""Muon (hpcllm.optim.muon) on one rank: the iteration, the AdamW groups, exact resume."""

import copy

import pytest
import torch

from hpcllm.models.gpt import GPT, ModelConfig, cross_entropy
from hpcllm.optim.muon import Muon, assign_owners, orthogonalize, param_groups


@pytest.mark.numerics
@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_orthogonalize_pushes_singular_values_near_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    g[:, 0] *= 30  # one dominant direction, which must not swamp the others
    x = orthogonalize(g)
    s = torch.linalg.svdvals(x)
    assert x.shape == g.shape
    assert s.max() < 1.3 and s.median() > 0.6
    # Same singular vectors as the exact polar factor U V^T.
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cos = (x * (u @ vh)).sum() / (x.norm() * (u @ vh).norm())
    assert cos > 0.95


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, d_model=16))


def run_steps(model, opt, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(40, (4, 8), generator=gen)
        opt.zero_grad()
        cross_entropy(model(x), x).backward()
        opt.step()


def test_groups_split_hidden_matrices_from_the_rest():
    model = tiny_model()
    groups = param_groups(model.named_parameters(), lr=1e-3, muon_lr=0.02, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    muon, decay, no_decay = ([names[id(p)] for p in g["params"]] for g in groups)
    assert muon and all(".attn." in n or ".mlp." in n for n in muon)
    assert all(n.endswith("weight") for n in muon)
    assert set(decay) == {"wte.weight", "wpe.weight", "lm_head.weight"}
    assert all(p.dim() == 1 for p in groups[2]["params"]) and no_decay
    assert [g["initial_lr"] for g in groups] == [0.02, 1e-3, 1e-3]


@pytest.mark.numerics
def test_the_adamw_groups_equal_torch_adamw():
    ref_model, model = tiny_model(), tiny_model()
    groups = param_groups(model.named_parameters(), lr=1e-2, muon_lr=0.0, weight_decay=0.1)
    opt = Muon(groups, betas=(0.9, 0.95))
    ref_groups = [
        {"params": [p for n, p in ref_model.named_parameters() if n in names], "weight_decay": wd}
        for names, wd in (
            ({"wte.weight", "wpe.weight", "lm_head.weight"}, 0.1),
            ({n for n, p in ref_model.named_parameters() if p.dim() == 1}, 0.0),
        )
    ]
    ref = torch.optim.AdamW(ref_groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    run_steps(model, opt, 5)
    run_steps(ref_model, ref, 5)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        if p.dim() == 1 or name in ("wte.weight", "wpe.weight", "lm_head.weight"):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.numerics
def test_muon_update_is_the_scaled_orthogonalised_nesterov_momentum():
    w = torch.nn.Parameter(torch.randn(8, 4))
    start = w.detach().clone()
    opt = Muon([{"params": [w], "muon": True, "lr": 0.1, "weight_decay": 0.0}], momentum=0.9)
    grad = torch.randn(8, 4)
    w.grad = grad.clone()
    opt.step()
    buf = 0.1 * grad  # lerp from zero
    direction = grad.lerp(buf, 0.9)
    expected = start - 0.1 * (8 / 4) ** 0.5 * orthogonalize(direction)
    torch.testing.assert_close(w.detach(), expected)


def test_state_dict_resume_continues_exactly():
    def build(model):
        return Muon(param_groups(model.named_parameters(), lr=1e-2, muon_lr=0.02, weight_decay=0.1))

    straight = tiny_model()
    opt = build(straight)
    run_steps(straight, opt, 6)

    first = tiny_model()
    opt1 = build(first)
    run_steps(first, opt1, 3)
    resumed = copy.deepcopy(first)
    opt2 = build(resumed)
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))
    gen_state = torch.Generator().manual_seed(1)
    for _ in range(3):  # advance the data stream past the first 3 steps
        torch.randint(40, (4, 8), generator=gen_state)
    for _ in range(3):
        x = torch.randint(40, (4, 8), generator=gen_state)
        opt2.zero_grad()
        cross_entropy(resumed(x), x).backward()
        opt2.step()
    for p, q in zip(resumed.parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


def test_owners_balance_the_work():
    numels = [100, 90, 50, 40, 10, 10]
    owners = assign_owners(numels, 2)
    loads = [sum(n for n, o in zip(numels, owners, strict=True) if o == r) for r in range(2)]
    assert sorted(loads) == [150, 150]
    assert assign_owners([5, 5, 5], 1) == [0, 0, 0]
