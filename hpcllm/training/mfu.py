"""Model FLOPs utilisation: the FLOPs a step needs, over what the hardware could do.

FLOPs per token follow the usual count (Kaplan et al.; PaLM appendix B): 6 per weight that
takes part in a matrix multiply (2 forward, 4 backward), plus the attention scores and their
weighted sum, 12 · n_layer · d_model · seq_len (causal masking is not discounted, as is usual).
Embedding lookups cost nothing; the LM head is a matrix multiply and counts, tied or not.

The peak is per rank: on a GPU from a table of known devices (dense tensor-core figures, the
ones vendors quote for bf16/fp16 and TF32), on a CPU from a short matrix-multiply probe with
this rank's threads, cached so later runs start at once. `train.peak_tflops` overrides both.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

# Dense peak TFLOP/s per device: (bf16 or fp16, fp32 through TF32). Names are matched as
# substrings of torch.cuda.get_device_name(), longest first.
GPU_PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 494.0),
    "H100 SXM": (989.0, 494.0),
    "H100 NVL": (835.0, 418.0),
    "H100 PCIe": (756.0, 378.0),
    "H100": (989.0, 494.0),
    "GH200": (989.0, 494.0),
    "B200": (2250.0, 1100.0),
    "A100": (312.0, 156.0),
    "A800": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "L40": (181.0, 90.5),
    "A40": (150.0, 74.8),
    "A10": (125.0, 62.5),
    "L4": (121.0, 60.0),
    "V100": (125.0, 15.7),
    "RTX 4090": (165.0, 82.6),
    "RTX 3090": (71.0, 35.6),
    "T4": (65.0, 8.1),
}

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hpcllm" / "peak.json"


def matmul_weights(model: nn.Module) -> int:
    """Weights that take part in matrix multiplies: every nn.Linear's, each counted once
    (a head tied to the embedding is a Linear sharing the embedding's weight)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


def flops_per_token(num_matmul_weights: int, n_layer: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token: forward and backward, weights and attention."""
    return 6.0 * num_matmul_weights + 12.0 * n_layer * d_model * seq_len


def gpu_peak_tflops(device_name: str, dtype: torch.dtype) -> float | None:
    """The table's dense peak for this device and dtype, or None for a device not in it."""
    for name in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if name.lower() in device_name.lower():
            half, tf32 = GPU_PEAK_TFLOPS[name]
            return half if dtype in (torch.bfloat16, torch.float16) else tf32
    return None


def probe_cpu_tflops(
    threads: int, dtype: torch.dtype = torch.float32, seconds: float = 0.3
) -> float:
    """Best-of-several float32 matmul throughput with `threads` threads, in TFLOP/s."""
    n = 512
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.mm(a, b)  # warm up the kernels and the thread pool
        best = 0.0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            for _ in range(4):
                torch.mm(a, b)
            best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(before)
    return best / 1e12


def _cpu_key(threads: int, dtype: torch.dtype, ranks_on_node: int) -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model
            )
    except OSError:
        pass
    return (
        f"{model}|{os.cpu_count()} cpus|{ranks_on_node} ranks x {threads} threads|{dtype}|"
        f"torch {torch.__version__}"
    )


def cpu_peak_tflops(
    threads: int, dtype: torch.dtype = torch.float32, cache: Path = CACHE, ranks_on_node: int = 1
) -> float:
    """The probe's figure for this CPU and thread count, measured once and cached.

    Every rank of a node probes at the same time, as they will compute, so the figure is a
    rank's share of the node; it is cached per number of ranks on the node (4 ranks on 2
    cores get half the peak of 2 ranks each)."""
    key = _cpu_key(threads, dtype, ranks_on_node)
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(key), float):
        return known[key]
    peak = probe_cpu_tflops(threads, dtype)
    known[key] = peak
    try:  # a read-only home only costs the probe next time
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(cache)
    except OSError:
        pass
    return peak


def peak_tflops(
    device: torch.device,
    dtype: torch.dtype,
    threads: int,
    override: float = 0.0,
    ranks_on_node: int = 1,
) -> float | None:
    """Per-rank peak TFLOP/s: `override` if set, else the GPU table or the cached CPU probe."""
    if override > 0:
        return override
    if device.type == "cuda":
        return gpu_peak_tflops(torch.cuda.get_device_name(device), dtype)
    return cpu_peak_tflops(threads, torch.float32, ranks_on_node=ranks_on_node)


def mfu(
    tokens_per_s: float, flops_per_tok: float, num_ranks: int, peak_per_rank_tflops: float
) -> float:
    """The fraction of the ranks' combined peak that the model's FLOPs used."""
    return tokens_per_s * flops_per_tok / (num_ranks * peak_per_rank_tflops * 1e12)
