"""The model's shape (`ModelConfig`), apart from the model so that it loads without torch.

config.py takes the `[model]` section from here, and the job plumbing that must work before
torch loads (the watchdog, the run folder) imports config.py; model.py re-exports the class.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The model's architecture and shape."""

    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide d_model."""
    d_model: int = 128
    """Width of the residual stream."""
    vocab_size: int = 0
    """Vocabulary size; 0 takes it from the data shards."""
    block_size: int = 0
    """Longest context the model accepts (position embeddings); 0 means train.seq_len."""
    tie_embeddings: bool = False
    """Share the token embedding matrix with the LM head."""
    dropout: float = 0.0
    """Dropout probability on attention, MLP and embeddings."""
    arch: str = "gpt2"
    """'gpt2' or 'llama' (RoPE, RMSNorm, grouped-query attention, SwiGLU, no biases)."""
    n_kv_head: int = 0
    """llama: key/value heads, a divisor of n_head (grouped-query attention); 0 means n_head."""
    qk_norm: bool = False
    """llama: RMSNorm each query and key head before the rotary embedding."""
    ffn_hidden: int = 0
    """Hidden width of the MLP; 0 means 4 * d_model (gpt2), or 8/3 * d_model rounded up to a
    multiple of 64 (llama, whose SwiGLU has three matrices instead of two)."""
    rope_theta: float = 10000.0
    """llama: base of the rotary embedding's frequencies."""

    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head when it is 0."""
        return self.n_kv_head or self.n_head

    def num_matrix_params(self) -> int:
        """Parameters of the model's matrices (embeddings, attention, MLP, head): all but the
        biases, norms and position embedding, from the shape alone (no torch)."""
        d, head = self.d_model, self.d_model // self.n_head
        attention = 2 * d * d + 2 * d * self.kv_heads() * head  # q, proj; k, v
        mlp = (3 if self.arch == "llama" else 2) * d * self.ffn_size()
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layer * (attention + mlp) + embeddings

    def ffn_size(self) -> int:
        """The MLP's hidden width (ffn_hidden, or the architecture's default rule)."""
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.arch == "llama":
            hidden = (8 * self.d_model + 2) // 3  # ceil(8/3 * d_model)
            return (hidden + 63) // 64 * 64
        return 4 * self.d_model
