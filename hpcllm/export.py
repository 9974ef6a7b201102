"""`python -m hpcllm.export`: a checkpoint as a Hugging Face `transformers` model folder.

    python -m hpcllm.export --run-dir runs/default --out hf/my-model
    python -m hpcllm.export --checkpoint runs/default/checkpoints/step_000300 --out hf/my-model

Works with checkpoints of any parallel layout (the shards are merged through meta.json's
index). Writes config.json, model.safetensors and the tokenizer (tokenizer.json,
tokenizer_config.json, special_tokens_map.json), which `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained` load. gpt2 becomes a `GPT2LMHeadModel`, llama a
`LlamaForCausalLM`, or with model.qk_norm a `Qwen3ForCausalLM` (Llama has no QK-norm; Qwen3
is Llama with it). The files are written directly: exporting needs no `transformers`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from hpcllm.data.tokenizer import EOT_TOKEN, TOKENIZER_FILE, ByteTokenizer
from hpcllm.generate import add_checkpoint_options, load_checkpoint
from hpcllm.models.gpt import GPT, RMS_NORM_EPS, ModelConfig

# nn.LayerNorm's default epsilon, which gpt2's norms use.
LAYER_NORM_EPS = 1e-5


def hf_config(m: ModelConfig, eot_id: int) -> dict:
    """config.json for `m`: the transformers class, shapes and conventions of hpcllm's model."""
    common = {
        "vocab_size": m.vocab_size,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "dtype": "float32",
    }
    if m.arch == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_positions": m.block_size,
            "n_embd": m.d_model,
            "n_layer": m.n_layer,
            "n_head": m.n_head,
            "n_inner": m.ffn_size(),
            # hpcllm's F.gelu is the exact (erf) GELU: transformers' "gelu", not GPT-2's
            # default "gelu_new" (the tanh approximation), which differs by up to ~1e-3.
            "activation_function": "gelu",
            "layer_norm_epsilon": LAYER_NORM_EPS,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            **common,
        }
    head_dim = m.d_model // m.n_head
    return {
        "architectures": ["Qwen3ForCausalLM" if m.qk_norm else "LlamaForCausalLM"],
        "model_type": "qwen3" if m.qk_norm else "llama",
        "hidden_size": m.d_model,
        "intermediate_size": m.ffn_size(),
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": m.kv_heads(),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.block_size,
        "rms_norm_eps": RMS_NORM_EPS,
        # transformers 5 reads rope_parameters, earlier versions rope_theta.
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        **common,
    }


def hf_state_dict(m: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """hpcllm's parameters (the whole model) under transformers' names and layouts."""
    out: dict[str, torch.Tensor] = {}
    if m.arch == "gpt2":
        # GPT-2's Conv1D stores (in, out): hpcllm's Linear weights transposed.
        per_block = {
            "ln_1.weight": "ln_1.weight",
            "ln_1.bias": "ln_1.bias",
            "attn.qkv.weight": "attn.c_attn.weight",
            "attn.qkv.bias": "attn.c_attn.bias",
            "attn.proj.weight": "attn.c_proj.weight",
            "attn.proj.bias": "attn.c_proj.bias",
            "ln_2.weight": "ln_2.weight",
            "ln_2.bias": "ln_2.bias",
            "mlp.fc.weight": "mlp.c_fc.weight",
            "mlp.fc.bias": "mlp.c_fc.bias",
            "mlp.proj.weight": "mlp.c_proj.weight",
            "mlp.proj.bias": "mlp.c_proj.bias",
        }
        top = {
            "wte.weight": "transformer.wte.weight",
            "wpe.weight": "transformer.wpe.weight",
            "ln_f.weight": "transformer.ln_f.weight",
            "ln_f.bias": "transformer.ln_f.bias",
        }
        block_prefix = "transformer.h"
    else:
        # The rotary embedding already uses transformers' rotate-half layout: q and k rows
        # are copied as they are.
        per_block = {
            "ln_1.weight": "input_layernorm.weight",
            "attn.q.weight": "self_attn.q_proj.weight",
            "attn.k.weight": "self_attn.k_proj.weight",
            "attn.v.weight": "self_attn.v_proj.weight",
            "attn.proj.weight": "self_attn.o_proj.weight",
            "attn.q_norm.weight": "self_attn.q_norm.weight",
            "attn.k_norm.weight": "self_attn.k_norm.weight",
            "ln_2.weight": "post_attention_layernorm.weight",
            "mlp.gate.weight": "mlp.gate_proj.weight",
            "mlp.up.weight": "mlp.up_proj.weight",
            "mlp.proj.weight": "mlp.down_proj.weight",
        }
        top = {
            "wte.weight": "model.embed_tokens.weight",
            "ln_f.weight": "model.norm.weight",
        }
        block_prefix = "model.layers"
    if not m.tie_embeddings:  # a tied head is the embedding, stored once
        top["lm_head.weight"] = "lm_head.weight"
    for name, tensor in state.items():
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            target = f"{block_prefix}.{index}.{per_block[rest]}"
            if m.arch == "gpt2" and tensor.dim() == 2:
                tensor = tensor.t()
        elif name in top:
            target = top[name]
        else:
            assert name == "lm_head.weight" and m.tie_embeddings, f"unmapped parameter {name}"
            continue
        out[target] = tensor.detach().contiguous().clone()
    return out


def byte_symbols() -> list[str]:
    """The printable character GPT-2's byte-level scheme (the `tokenizers` ByteLevel
    pre-tokenizer) stands in for each byte 0..255 with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in symbols:  # control characters, space, DEL, NBSP, soft hyphen
            symbols[b] = chr(256 + len(symbols) - len(printable))
    return [symbols[b] for b in range(256)]


def byte_tokenizer():
    """hpcllm's byte tokenizer as a `tokenizers.Tokenizer`: each UTF-8 byte is the id of its
    value, EOT is 256. A BPE model without merges over the ByteLevel pre-tokenizer's
    characters, so every byte stays a token of its own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    symbols = byte_symbols()
    assert set(symbols) == set(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={s: b for b, s in enumerate(symbols)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOT_TOKEN])
    assert tokenizer.token_to_id(EOT_TOKEN) == ByteTokenizer.eot_id
    return tokenizer


def write_tokenizer(tokenizer, data_path: str, out: Path, max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for `tokenizer`
    (hpcllm's), loadable as a PreTrainedTokenizerFast."""
    if tokenizer.name == ByteTokenizer.name:
        byte_tokenizer().save(str(out / TOKENIZER_FILE))
    else:
        shutil.copyfile(Path(data_path) / TOKENIZER_FILE, out / TOKENIZER_FILE)
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": max_length,
        # hpcllm encodes the text "<|endoftext|>" inside a document as text, never as EOT.
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def write_folder(model: GPT, tokenizer, data_path: str, out: Path) -> None:
    """The whole `model` and hpcllm's `tokenizer` (its BPE file in data_path) as a Hugging
    Face folder `out`, which must not exist; it appears complete or not at all."""
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        m = model.cfg
        config = hf_config(m, tokenizer.eot_id)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tensors = hf_state_dict(m, model.state_dict())
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # safetensors creates its file for its owner only; the folder's other files follow
        # the umask, and a model shared with a group must be readable like its config.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp / "model.safetensors", 0o666 & ~umask)
        write_tokenizer(tokenizer, data_path, tmp, m.block_size)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(args: argparse.Namespace) -> Path:
    """Write the Hugging Face folder args.out from the checkpoint the options name; returns
    the checkpoint's path."""
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder; choose another")
    path, model, meta, tokenizer = load_checkpoint(args)
    if out.exists():
        out.rmdir()  # empty, checked above
    write_folder(model, tokenizer, args.data or meta["config"]["data"]["path"], out)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hpcllm.export", description=__doc__.splitlines()[0]
    )
    add_checkpoint_options(parser)
    parser.add_argument("--out", required=True, help="folder to write (must not exist yet)")
    args = parser.parse_args(argv)
    try:
        path = export(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {path} to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
