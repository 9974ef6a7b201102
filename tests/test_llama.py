"""The llama architecture: the model against a plain re-implementation, its config checks,
and a pipeline run checkpointed and resumed under another layout."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from hpcllm import checkpoint
from hpcllm.config import ConfigError, parse_args
from hpcllm.models.gpt import GPT, ModelConfig, cross_entropy
from hpcllm.train import check_same_model

from helpers import resume_elsewhere

CFG = ModelConfig(
    vocab_size=53, block_size=16, n_layer=2, n_head=4, d_model=32, arch="llama", n_kv_head=2
)
SEED = 5


def tokens(batch=2, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (batch, length), generator=generator)


# ---------------------------------------------------------------- a plain reference


def rms_norm(x, weight, eps=1e-5):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def rotate(x, theta):
    """RoPE, pair by pair: dimensions i and i + d/2 of position t turn by t * theta^(-2i/d)."""
    out = x.clone()
    T, d = x.shape[-2], x.shape[-1]
    for t in range(T):
        for i in range(d // 2):
            angle = t * theta ** (-2 * i / d)
            a, b = x[..., t, i], x[..., t, i + d // 2]
            out[..., t, i] = a * math.cos(angle) - b * math.sin(angle)
            out[..., t, i + d // 2] = b * math.cos(angle) + a * math.sin(angle)
    return out


def reference_logits(params: dict, cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """The llama forward written out: embeddings, per block RMSNorm -> GQA with RoPE (and
    QK-norm) -> residual, RMSNorm -> SwiGLU -> residual; final RMSNorm and head."""
    B, T = x.shape
    hd = cfg.d_model // cfg.n_head
    group = cfg.n_head // cfg.kv_heads()
    h = params["wte.weight"][x]
    mask = torch.ones(T, T).tril().bool()
    for layer in range(cfg.n_layer):
        p = {k.split(f"blocks.{layer}.", 1)[1]: v for k, v in params.items() if f"s.{layer}." in k}
        a = rms_norm(h, p["ln_1.weight"])
        q = (a @ p["attn.q.weight"].T).view(B, T, cfg.n_head, hd)
        k = (a @ p["attn.k.weight"].T).view(B, T, cfg.kv_heads(), hd)
        v = (a @ p["attn.v.weight"].T).view(B, T, cfg.kv_heads(), hd)
        if cfg.qk_norm:
            q, k = rms_norm(q, p["attn.q_norm.weight"]), rms_norm(k, p["attn.k_norm.weight"])
        heads = []
        for head in range(cfg.n_head):
            kv = head // group  # query heads 0..group-1 share key/value head 0, and so on
            qh, kh = rotate(q[:, :, head], cfg.rope_theta), rotate(k[:, :, kv], cfg.rope_theta)
            scores = qh @ kh.transpose(1, 2) / math.sqrt(hd)  # (B, T, T)
            scores = scores.masked_fill(~mask, float("-inf"))
            heads.append(torch.softmax(scores, -1) @ v[:, :, kv])
        h = h + torch.cat(heads, -1) @ p["attn.proj.weight"].T
        m = rms_norm(h, p["ln_2.weight"])
        gate, up = m @ p["mlp.gate.weight"].T, m @ p["mlp.up.weight"].T
        h = h + (gate * torch.sigmoid(gate) * up) @ p["mlp.proj.weight"].T
    return rms_norm(h, params["ln_f.weight"]) @ params["lm_head.weight"].T


@pytest.mark.parametrize(
    "changes",
    [{}, {"n_kv_head": 1, "qk_norm": True}, {"n_kv_head": 0, "rope_theta": 500.0}],
    ids=["gqa-2of4", "mqa-qk-norm", "mha-theta-500"],
)
@pytest.mark.numerics
def test_llama_equals_a_plain_reference(changes):
    cfg = dataclasses.replace(CFG, **changes)
    model = GPT(cfg, init_seed=SEED).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norm weights start at 1: make them matter
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator))
    x = tokens()
    params = dict(model.named_parameters())
    torch.testing.assert_close(model(x), reference_logits(params, cfg, x), atol=1e-5, rtol=1e-5)


def test_llama_parameters_no_biases_no_position_embedding():
    model = GPT(dataclasses.replace(CFG, qk_norm=True), init_seed=SEED)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert "wpe.weight" not in shapes and not [n for n in shapes if n.endswith(".bias")]
    hd = CFG.d_model // CFG.n_head
    assert shapes["blocks.0.attn.q.weight"] == (CFG.d_model, CFG.d_model)
    assert shapes["blocks.0.attn.k.weight"] == shapes["blocks.0.attn.v.weight"] == (2 * hd, 32)
    assert shapes["blocks.0.attn.q_norm.weight"] == (hd,)
    # 8/3 * 32 = 85.3, rounded up to a multiple of 64; ffn_hidden overrides the rule.
    assert shapes["blocks.1.mlp.gate.weight"] == shapes["blocks.1.mlp.up.weight"] == (128, 32)
    assert shapes["blocks.1.mlp.proj.weight"] == (32, 128)
    assert dataclasses.replace(CFG, d_model=768).ffn_size() == 2048
    assert GPT(dataclasses.replace(CFG, ffn_hidden=48)).blocks["0"].mlp.up.weight.shape == (48, 32)
    assert dataclasses.replace(CFG, arch="gpt2").ffn_size() == 4 * 32


@pytest.mark.numerics
def test_llama_stages_equal_the_full_model():
    full = GPT(CFG, init_seed=SEED)
    first = GPT(CFG, layers=range(0, 1), first=True, last=False, init_seed=SEED)
    last = GPT(CFG, layers=range(1, 2), first=False, last=True, init_seed=SEED)
    params = dict(full.named_parameters())
    staged = {**dict(first.named_parameters()), **dict(last.named_parameters())}
    assert sorted(staged) == sorted(params)
    assert all(torch.equal(p, params[n]) for n, p in staged.items())
    x, y = tokens(), tokens(seed=1)
    # The middle of the pipeline receives hidden states and still knows their positions.
    torch.testing.assert_close(
        cross_entropy(last(first(x)), y), cross_entropy(full(x), y), rtol=0, atol=0
    )


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--model.arch", "llama", "--model.n_head", "4", "--model.n_kv_head", "3"],
            "model.n_head (4) must be divisible by model.n_kv_head (3)",
        ),
        (["--model.arch", "llama", "--model.n_kv_head", "-1"], "model.n_kv_head = -1 is out of"),
        (
            ["--model.arch", "gpt2", "--model.n_kv_head", "2"],
            "model.n_kv_head = 2 applies to model.arch = llama only",
        ),
        (
            ["--model.arch", "gpt2", "--model.qk_norm", "true"],
            "model.qk_norm = True applies to model.arch = llama only",
        ),
        (["--model.arch", "mamba"], "model.arch must be gpt2 or llama, got 'mamba'"),
        (
            ["--model.arch", "llama", "--model.n_kv_head", "1", "--parallel.tp", "2"],
            "parallel.tp = 2 must divide model.n_kv_head (1)",
        ),
        (
            ["--model.arch", "llama", "--model.ffn_hidden", "99", "--parallel.tp", "2"],
            "parallel.tp = 2 must divide the MLP's hidden width (99",
        ),
        (["--model.arch", "llama", "--model.rope_theta", "0"], "model.rope_theta = 0.0 is out of"),
        (
            ["--model.arch", "llama", "--model.d_model", "36", "--model.n_head", "4"],
            "model.d_model / model.n_head = 9 must be even for llama",
        ),
    ],
)
def test_bad_llama_settings_are_refused_naming_the_keys(args, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        parse_args(args)


def test_good_llama_settings_pass():
    cfg, _ = parse_args(["--model.arch", "llama", "--model.n_head", "4", "--model.n_kv_head", "2"])
    assert cfg.model.kv_heads() == 2 and parse_args([])[0].model.arch == "llama"


def test_resume_refuses_another_architecture():
    cfg, _ = parse_args(["--model.arch", "llama", "--model.n_kv_head", "2"])
    saved = dataclasses.asdict(dataclasses.replace(cfg.model, n_kv_head=1))
    with pytest.raises(ValueError, match=r"model.n_kv_head = 1 in the checkpoint, 2 now"):
        check_same_model(saved, cfg, "ckpt")
    # A checkpoint from before model.arch existed is gpt2.
    before_arch = ("n_layer", "n_head", "d_model", "vocab_size", "block_size", "tie_embeddings")
    old = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k in before_arch}
    with pytest.raises(ValueError, match=r"model.arch = gpt2 in the checkpoint, llama now"):
        check_same_model(old, cfg, "ckpt")
    check_same_model(dataclasses.asdict(cfg.model), cfg, "ckpt")


# ---------------------------------------------------------------- end to end

LLAMA = {
    "model.arch": "llama",
    "model.n_head": 4,
    "model.n_kv_head": 2,
    "model.qk_norm": True,
    "train.max_steps": 6,
    "checkpoint.every": 3,
    "checkpoint.keep": 0,
    "train.threads": 1,
}


def test_llama_checkpoint_resumes_under_another_layout(reference_run, shards, tmp_path):
    """A pp=2 llama run checkpoints at step 3; resumed from there on one rank, steps 4-6
    repeat its losses."""
    llama = {**LLAMA, "data.path": shards}
    pp2, _ = reference_run(2, {**llama, "parallel.pp": 2})
    resumed = tmp_path / "resumed"
    # pp 2 sums over stages in another order than one rank: fp32 rounding over 3 steps.
    resume_elsewhere(pp2, 3, resumed, None, llama, loss_tol={"rtol": 1e-5, "atol": 1e-5})
    final = resumed / "checkpoints/step_000006"
    params = checkpoint.read_model(final, checkpoint.read_meta(final))
    assert "blocks.1.attn.k_norm.weight" in params and "wpe.weight" not in params
