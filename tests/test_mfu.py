"""FLOPs per token, device peaks and MFU (hpcllm.training.mfu)."""

import pytest
import torch

from hpcllm.models.gpt import GPT, ModelConfig
from hpcllm.training import mfu


@pytest.mark.parametrize("tied", [False, True])
def test_matmul_weights_count_blocks_and_head_once(tied):
    cfg = ModelConfig(
        vocab_size=300, block_size=32, n_layer=3, n_head=4, d_model=64, tie_embeddings=tied
    )
    d = cfg.d_model
    # qkv 3d², attention proj d², fc 4d², mlp proj 4d² per block; the head V·d (tied or not)
    expected = cfg.n_layer * 12 * d * d + cfg.vocab_size * d
    assert mfu.matmul_weights(GPT(cfg)) == expected


def test_flops_per_token_is_6n_plus_attention():
    assert mfu.flops_per_token(1000, n_layer=2, d_model=8, seq_len=16) == 6000 + 12 * 2 * 8 * 16


def test_gpu_table_prefers_the_longest_matching_name():
    assert mfu.gpu_peak_tflops("NVIDIA H100 PCIe", torch.bfloat16) == 756.0
    assert mfu.gpu_peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.0
    assert mfu.gpu_peak_tflops("NVIDIA A100-SXM4-80GB", torch.float32) == 156.0
    assert mfu.gpu_peak_tflops("Some Future GPU", torch.bfloat16) is None


def test_cpu_peak_is_probed_once_then_cached(tmp_path, monkeypatch):
    calls = []

    def probe(threads, dtype=torch.float32, seconds=0.3):
        calls.append(threads)
        return 0.05 * threads

    monkeypatch.setattr(mfu, "probe_cpu_tflops", probe)
    cache = tmp_path / "peak.json"
    assert mfu.cpu_peak_tflops(2, cache=cache) == pytest.approx(0.1)
    assert mfu.cpu_peak_tflops(2, cache=cache) == pytest.approx(0.1)
    assert mfu.cpu_peak_tflops(1, cache=cache) == pytest.approx(0.05)
    assert calls == [2, 1]
    # Two ranks probing together on the node are another figure than one alone.
    assert mfu.cpu_peak_tflops(2, cache=cache, ranks_on_node=2) == pytest.approx(0.1)
    assert calls == [2, 1, 2]
    cache.write_text("not json")  # a damaged cache is measured again, not fatal
    assert mfu.cpu_peak_tflops(2, cache=cache) == pytest.approx(0.1)


def test_probe_measures_a_positive_rate():
    assert 0 < mfu.probe_cpu_tflops(1, seconds=0.05) < 100


def test_peak_override_and_mfu_arithmetic():
    assert mfu.peak_tflops(torch.device("cpu"), torch.float32, 1, override=2.5) == 2.5
    # 1e4 tokens/s x 1e8 FLOPs/token = 1e12 FLOP/s over 4 ranks x 0.5 TFLOP/s = 50%
    assert mfu.mfu(1e4, 1e8, 4, 0.5) == pytest.approx(0.5)
