"""A GPT decoder in plain PyTorch. No MPI here: parallelism wraps this model from outside.

Two architectures share the skeleton (`model.arch`):
- `gpt2`: learned position embeddings, LayerNorm, a fused q/k/v projection, a GELU MLP,
  biases everywhere.
- `llama`: rotary position embeddings (the rotate-half convention of Hugging Face's Llama),
  RMSNorm, separate q/k/v projections with grouped-query attention (`n_kv_head` key/value
  heads shared by groups of query heads), an optional RMSNorm of each query and key head
  before the rotation (`qk_norm`), a SwiGLU MLP, no biases.

Blocks are held in a dict keyed by their global index (`model.blocks["5"]`), so a
pipeline stage is just a contiguous range of them plus, on the first stage, the
embeddings and, on the last, the final norm and LM head. An interleaved pipeline stage
holds several such ranges (chunks), and `forward(x, chunk=v)` runs one of them.

The model's shape, `ModelConfig`, lives in model_config.py (no torch there, so the
configuration loads without it) and is re-exported here.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpcllm.models.config import ModelConfig

# RMSNorm's epsilon, as Llama uses it (exported as rms_norm_eps).
RMS_NORM_EPS = 1e-5
# The rotary embedding's cos and sin tables, each (T, head_dim); computed once per forward.
Rope = tuple[torch.Tensor, torch.Tensor]


def rope_tables(
    seq_len: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, head_dim) of the rotary embedding, in fp32.

    Dimension i and i + head_dim/2 form a pair rotated by position * theta^(-2i/head_dim)
    (Hugging Face Llama's rotate-half layout, so exported weights need no permutation).
    """
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, head_dim) by the tables of rope_tables."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class CausalSelfAttention(nn.Module):
    """gpt2's attention: one fused q/k/v projection, biases, positions from the embedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout
        # Where the attention dropout draws its masks: tensor parallelism gives each rank's
        # heads a generator of their own (hpcllm.distributed.tensor_parallel.dropout_rng).
        self.dropout_rng: Callable[[], AbstractContextManager] = nullcontext

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # The width of the heads this module holds: all of them, or under tensor
        # parallelism one rank's share (qkv then holds only their rows).
        width = self.qkv.weight.shape[0] // 3
        q, k, v = self.qkv(x).split(width, dim=2)
        # (B, T, width) -> (B, heads, T, head_dim)
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        # softmax(Q K^T / sqrt(d_k)) V with a causal mask.
        with self.dropout_rng() if self.training and self.dropout else nullcontext():
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        y = y.transpose(1, 2).contiguous().view(B, T, width)
        return F.dropout(self.proj(y), self.dropout, self.training)


class GroupedQueryAttention(nn.Module):
    """llama's attention: separate q, k, v projections without biases, n_kv_head key/value
    heads each shared by n_head / n_kv_head query heads, rotary positions.

    Head counts are read from the projections' output widths (head_dim is fixed), so a
    column-parallel q/k/v holding a slice of the heads works unchanged.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.d_model // cfg.n_head
        kv_width = cfg.kv_heads() * self.head_dim
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k = nn.Linear(cfg.d_model, kv_width, bias=False)
        self.v = nn.Linear(cfg.d_model, kv_width, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=RMS_NORM_EPS)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=RMS_NORM_EPS)
        self.qk_norm = cfg.qk_norm
        self.dropout = cfg.dropout
        self.dropout_rng: Callable[[], AbstractContextManager] = nullcontext  # as gpt2's

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        assert rope is not None, "llama attention needs the rotary tables"
        B, T, _ = x.shape
        # (B, T, heads * head_dim) -> (B, T, heads, head_dim)
        q, k, v = (proj(x).view(B, T, -1, self.head_dim) for proj in (self.q, self.k, self.v))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        with self.dropout_rng() if self.training and self.dropout else nullcontext():
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                is_causal=True,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=True,  # key/value head j serves query heads j*g .. j*g + g-1
            )
        y = y.transpose(1, 2).reshape(B, T, -1)
        return F.dropout(self.proj(y), self.dropout, self.training)


class MLP(nn.Module):
    """gpt2's MLP: proj(gelu(fc(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.ffn_size())
        self.proj = nn.Linear(cfg.ffn_size(), cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.proj(F.gelu(self.fc(x))), self.dropout, self.training)


class SwiGLU(nn.Module):
    """llama's MLP: proj(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.ffn_size(), bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.ffn_size(), bias=False)
        self.proj = nn.Linear(cfg.ffn_size(), cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(self.gate(x)) * self.up(x)
        return F.dropout(self.proj(hidden), self.dropout, self.training)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The architecture's normalisation over d_model: LayerNorm (gpt2) or RMSNorm (llama)."""
    if cfg.arch == "llama":
        return nn.RMSNorm(cfg.d_model, eps=RMS_NORM_EPS)
    return nn.LayerNorm(cfg.d_model)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        llama = cfg.arch == "llama"
        self.ln_1 = make_norm(cfg)
        self.attn = GroupedQueryAttention(cfg) if llama else CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = SwiGLU(cfg) if llama else MLP(cfg)

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT decoder, or one pipeline stage of it.

    `layers` selects which blocks this module holds (default: all); `first` and
    `last` say whether it holds the embeddings and the final norm + LM head. `layers` may
    also be a list of ranges, the chunks of an interleaved pipeline stage: the embeddings
    then go before the first chunk and the head after the last, and `forward` runs one
    chunk at a time.
    `init_seed` seeds the initial weights (hpcllm.train passes train.seed).
    Parameter names are the full model's (`blocks.5.attn.qkv.weight` keeps that
    name on whichever stage holds block 5), so checkpoints do not depend on the
    pipeline layout.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layers: range | list[range] | None = None,
        first: bool = True,
        last: bool = True,
        *,
        init_seed: int = 0,
    ):
        super().__init__()
        if cfg.vocab_size <= 0 or cfg.block_size <= 0:
            raise ValueError(
                f"model.vocab_size ({cfg.vocab_size}) and model.block_size ({cfg.block_size}) "
                "must be set (positive) before the model is built"
            )
        self.cfg = cfg
        self.init_seed = init_seed
        if layers is None:
            layers = range(cfg.n_layer)
        self.chunks = [layers] if isinstance(layers, range) else list(layers)
        self.layers = [i for chunk in self.chunks for i in chunk]
        self.first, self.last = first, last
        # A tied head on a last stage that does not embed still holds `wte`: the shared
        # weight, under the name (and with the initial values) it has on the first stage, so
        # checkpoints and optimizer state name it alike in every layout. Only the first stage
        # looks tokens up in it.
        if first or (last and cfg.tie_embeddings):
            self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if first and cfg.arch == "gpt2":  # llama's positions are rotations inside attention
            self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in self.layers})
        if last:
            self.ln_f = make_norm(cfg)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            if cfg.tie_embeddings:
                self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # Each block (and each embedding or head) draws from its own generator, seeded
        # from its global name, so its initial weights are the same whichever
        # pipeline layout builds it.
        generators: dict[str, torch.Generator] = {}
        for name, module in self.named_modules():
            if not isinstance(module, (nn.Linear, nn.Embedding)):
                continue
            if name == "lm_head" and self.cfg.tie_embeddings:
                continue  # shares the token embedding, already initialised
            owner = ".".join(name.split(".")[:2]) if name.startswith("blocks.") else name
            if owner not in generators:
                generators[owner] = torch.Generator().manual_seed(
                    self.init_seed + zlib.crc32(owner.encode())
                )
            # GPT-2: residual projections scaled by depth so the stream's variance stays bounded.
            std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith(".proj") else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std, generator=generators[owner])
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        """First stage: x is token ids (B, T); otherwise hidden states (B, T, C).

        The last stage returns logits (B, T, vocab), other stages hidden states (B, T, C).
        With several chunks, only the blocks of `chunk` run; the first chunk of the first
        stage embeds and the last chunk of the last stage applies the head.
        The loss is not part of the model: the pipeline schedule applies a loss function to
        the last stage's output, so that a vocab-parallel loss can replace `cross_entropy`.
        """
        embeds, heads = self.first and chunk == 0, self.last and chunk == len(self.chunks) - 1
        if embeds:
            T = x.shape[1]
            if T > self.cfg.block_size:
                raise ValueError(
                    f"sequence of {T} tokens is longer than the model's context "
                    f"(block_size {self.cfg.block_size})"
                )
            x = self.wte(x)  # (B, T, C)
            if self.cfg.arch == "gpt2":
                x = x + self.wpe(torch.arange(T, device=x.device))
            x = F.dropout(x, self.cfg.dropout, self.training)
        rope = None
        if self.cfg.arch == "llama":
            head_dim = self.cfg.d_model // self.cfg.n_head
            rope = rope_tables(x.shape[1], head_dim, self.cfg.rope_theta, x.device)
        for i in self.chunks[chunk]:
            x = self.blocks[str(i)](x, rope)
        if not heads:
            return x
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample `max_new_tokens` continuations of idx (B, T); needs the whole model."""
        assert self.first and self.last and len(self.chunks) == 1, (
            "generate() needs all stages in one module"
        )
        for _ in range(max_new_tokens):
            context = idx[:, -self.cfg.block_size :]
            logits = self(context)[:, -1, :] / max(temperature, 1e-6)
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1, None]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
        return idx


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits (B, T, vocab) against token ids (B, T), in fp32."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices (linear and embedding weights), not biases or norms."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
