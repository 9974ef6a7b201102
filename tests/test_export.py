"""`python -m hpcllm.export`: trained checkpoints of several layouts as Hugging Face folders
that transformers loads with the same logits and a tokenizer that gives the same ids."""

from __future__ import annotations

import pytest
import torch

from hpcllm import checkpoint
from hpcllm.data.prepare import prepare
from hpcllm.data.tokenizer import ByteTokenizer, load_tokenizer
from hpcllm.export import byte_tokenizer, write_folder
from hpcllm.export import main as export_main
from hpcllm.generate import load_model
from hpcllm.models.gpt import GPT, ModelConfig

from helpers import train, write_corpus

transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra")

# ASCII, whitespace and control characters, 2-, 3- and 4-byte UTF-8, and the literal text
# of the EOT token, which hpcllm encodes as text (never as the EOT id).
TEXTS = [
    "def f(x):\n\treturn x  # the quick brown fox",
    "naïve café, Grüße, Ελληνικά, 日本語のテキスト, emoji 🙂🚀 and \x00\x1b\x7f",
    "before <|endoftext|> after<|endoftext|>",
    " leading and trailing spaces  ",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Byte and BPE shards of the tiny corpus plus a document of non-ASCII text."""
    root = tmp_path_factory.mktemp("export-data")
    corpus = write_corpus(root / "corpus", num_docs=3, words_per_doc=600)
    (corpus / "unicode.txt").write_text(" ".join(TEXTS[1:] * 20), encoding="utf-8")
    for kind in ("byte", "bpe"):
        prepare([str(corpus)], str(root / kind), tokenizer=kind, vocab_size=320, val_fraction=0.1)
    return root


CASES = {
    # (tokenizer, ranks, settings, the transformers class)
    "gpt2-byte-dp2": ("byte", 2, {}, "GPT2LMHeadModel"),
    "gpt2-bpe-tied": ("bpe", None, {"model.tie_embeddings": True}, "GPT2LMHeadModel"),
    "llama-bpe-pp2-gqa": (
        "bpe",
        2,
        {"parallel.pp": 2, "model.arch": "llama", "model.n_kv_head": 1},
        "LlamaForCausalLM",
    ),
    "llama-byte-qk-norm-tied": (
        "byte",
        None,
        {
            "model.arch": "llama",
            "model.n_head": 4,
            "model.n_kv_head": 2,
            "model.qk_norm": True,
            "model.rope_theta": 500.0,
            "model.tie_embeddings": True,
        },
        "Qwen3ForCausalLM",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_transformers_with_equal_logits_and_ids(case, data, tmp_path):
    kind, ranks, settings, hf_class = CASES[case]
    run_dir, out = tmp_path / "run", tmp_path / "hf"
    result = train(
        ranks,
        {"data.path": data / kind, "run.dir": run_dir, "train.max_steps": 3, **settings},
        timeout=180,
    )
    assert result.returncode == 0, str(result)
    assert export_main(["--run-dir", str(run_dir), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    # Every file as readable as the others (safetensors alone would make its file owner-only).
    assert len({(p.stat().st_mode & 0o777) for p in out.iterdir()}) == 1

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(hf).__name__ == hf_class
    assert not any(info.values()), info  # every weight found, none left over
    ours, meta = load_model(checkpoint.find_latest(str(run_dir))[0])
    assert meta["grid"]["pp"] == settings.get("parallel.pp", 1)
    tokenizer = load_tokenizer(data / kind, kind)
    block = ours.cfg.block_size
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, ours.cfg.vocab_size, (2, block), generator=generator),
        torch.tensor([tokenizer.encode(" ".join(TEXTS))[:block].tolist()]),
    ]
    hf.eval()
    with torch.no_grad():
        for ids in batches:
            expected = ours(ids)
            torch.testing.assert_close(hf(ids).logits, expected, atol=1e-4, rtol=0)
    assert expected.abs().max() > 0.1  # trained logits, not all near zero

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for text in [*TEXTS, "".join(TEXTS)]:
        ids = tokenizer.encode(text).tolist()
        assert hf_tokenizer(text)["input_ids"] == ids, text
        assert hf_tokenizer.decode(ids) == text
    assert hf_tokenizer.eos_token_id == tokenizer.eot_id == hf.config.eos_token_id
    assert hf_tokenizer.decode([tokenizer.eot_id]) == "<|endoftext|>"


@pytest.mark.parametrize(
    "changes",
    [{}, {"arch": "llama", "n_kv_head": 2}, {"arch": "llama", "n_kv_head": 1, "qk_norm": True}],
    ids=["gpt2", "llama", "llama-qk-norm"],
)
def test_export_of_large_weights_equals_hpcllm(changes, tmp_path):
    """Weights 20x the initial scale (and norms away from 1) drive the activations into the
    range where conventions differ visibly, e.g. GPT-2's tanh GELU from the exact one by
    ~1e-3: a trained tiny model's logits would hide that under the tolerance."""
    cfg = ModelConfig(vocab_size=257, block_size=24, n_layer=2, n_head=4, d_model=32, **changes)
    model = GPT(cfg, init_seed=1).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.3 * noise if p.dim() == 1 else 20 * p)
    write_folder(model, ByteTokenizer(), "", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=generator)
    with torch.no_grad():
        expected = model(ids)
        torch.testing.assert_close(hf(ids).logits, expected, atol=1e-4, rtol=1e-5)
    assert expected.abs().max() > 5


def test_byte_tokenizer_maps_every_byte_to_its_value(tmp_path):
    tok = byte_tokenizer()
    tok.encode_special_tokens = True
    assert tok.get_vocab_size() == 257
    every_char = "".join(chr(c) for c in range(1, 0x800)) + "😀\U0010ffff"
    assert tok.encode(every_char).ids == list(every_char.encode("utf-8"))
    assert tok.decode(list(every_char.encode("utf-8"))) == every_char


def test_export_refuses_a_non_empty_out_folder_and_a_missing_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export_main(["--run-dir", str(tmp_path / "run"), "--out", str(out)]) == 2
    assert f"--out {out} exists and is not an empty folder" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert export_main(["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "x")]) == 2
    assert f"no complete checkpoint under {tmp_path / 'run'}/checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / ".tmp-x").exists()
