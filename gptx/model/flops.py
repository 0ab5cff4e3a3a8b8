"""Model FLOPs per token and the hardware peak they are measured against (for MFU)."""
from __future__ import annotations

import re
import time

import torch

from gptx.config import ModelConfig

# Dense peaks in FLOP/s from the vendor datasheets (half the "with sparsity" figures): 16-bit
# tensor cores; "tf32" for fp32 matmuls when torch lets them use TF32
# (torch.backends.cuda.matmul.allow_tf32); plain fp32 otherwise. V100 has no TF32.
# The PCIe and NVL cards run lower clocks and power than the SXM parts that share their model
# name, so they come first: the first name found in the device's name wins.
GPU_PEAKS = {
    "H100 PCIe": {"16bit": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100 NVL": {"16bit": 835e12, "tf32": 417.5e12, "fp32": 60e12},
    "H200 NVL": {"16bit": 835e12, "tf32": 417.5e12, "fp32": 60e12},
    "GH200": {"16bit": 989e12, "tf32": 494.7e12, "fp32": 67e12},  # Grace Hopper: the H100/H200's GPU
    "H200": {"16bit": 989e12, "tf32": 494.7e12, "fp32": 67e12},  # SXM
    "H100": {"16bit": 989e12, "tf32": 494.7e12, "fp32": 67e12},  # SXM
    "A100": {"16bit": 312e12, "tf32": 156e12, "fp32": 19.5e12},  # PCIe and SXM alike
    "V100": {"16bit": 125e12, "fp32": 15.7e12},
}


def gpu_peak(device_name: str, precision: str, tf32: bool) -> float | None:
    """The datasheet peak for a GPU of this name: 16-bit, TF32 for fp32 with TF32 on, else fp32."""
    for key, peaks in GPU_PEAKS.items():
        # The model as a whole word: "NVIDIA A100-SXM4-80GB" is an A100, "NVIDIA RTX A1000 Laptop GPU"
        # is not; a form factor may follow after a space or a dash, in any case ("H100-PCIE").
        words = r"[ _-]".join(re.escape(word) for word in key.split())
        if re.search(rf"(?<![A-Za-z0-9]){words}(?![A-Za-z0-9])", device_name, flags=re.IGNORECASE):
            if precision != "fp32":
                return peaks["16bit"]
            return peaks.get("tf32", peaks["fp32"]) if tf32 else peaks["fp32"]
    return None


def layer_flops_per_token(spec, cfg: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward) of one entry of the LayerSpec list.

    Blocks: 6 x their matmul weights (block_matmul_params) plus 12 C T for attention scores and
    values (grouped-query attention shares keys and values, not the score FLOPs);
    the head: 6 V C for the logits. Embedding lookups and norms are memory-bound, ~0 FLOPs.
    """
    C, T, V = cfg.n_embd, cfg.seq_len, cfg.vocab_size
    name = spec.typename.__name__
    if name == "Block":
        return 6 * block_matmul_params(cfg) + 12 * C * T
    if name == "LMHead" or getattr(spec, "forward_fn", None) is not None:  # untied or tied head
        return 6 * V * C
    return 0.0


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: the blocks' weights and the head."""
    return cfg.n_layer * block_matmul_params(cfg) + cfg.vocab_size * cfg.n_embd


def block_matmul_params(cfg: ModelConfig) -> int:
    """Matmul weights of one block: queries and output C^2 each, keys and values C x (kv heads x
    head size) each, and per MLP 2 C H (GELU) or 3 C H (SwiGLU's gate, up and down)."""
    C, H = cfg.n_embd, cfg.ffn_hidden
    kv = cfg.kv_heads * cfg.head_dim
    mlps = 2 if cfg.macaron else 1
    return 2 * C * C + 2 * C * kv + mlps * (3 if cfg.mlp == "swiglu" else 2) * C * H


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token, PaLM-style: 6 N for the matmuls plus 12 L C T for attention."""
    return 6 * matmul_params(cfg) + 12 * cfg.n_layer * cfg.n_embd * cfg.seq_len


def mfu(tokens_per_sec: float, cfg: ModelConfig, peak_per_device: float | None, devices: int) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the peak of all devices used."""
    if not peak_per_device:
        return None
    return tokens_per_sec * flops_per_token(cfg) / (peak_per_device * devices)


MEASURED_CPU_PEAKS: dict[int, float] = {}  # thread count -> FLOP/s, measured once per process


def peak_flops(device: str, precision: str) -> float | None:
    """Peak FLOP/s of one device: a datasheet table for GPUs, a short measurement for CPUs."""
    if device == "cuda":
        return gpu_peak(torch.cuda.get_device_name(), precision, torch.backends.cuda.matmul.allow_tf32)
    threads = torch.get_num_threads()
    if threads not in MEASURED_CPU_PEAKS:  # a property of the host and the thread count
        MEASURED_CPU_PEAKS[threads] = measured_cpu_matmul_flops()
    return MEASURED_CPU_PEAKS[threads]


def measured_cpu_matmul_flops(n: int = 1024, seconds: float = 0.15, trials: int = 4) -> float:
    """Sustained fp32 matmul FLOP/s with this process's thread count: the best of a few short
    trials, since a busy neighbour only ever makes a trial slower."""
    with torch.random.fork_rng(devices=[]):  # leave the training RNG (dropout) untouched
        a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = 0.0
    for _ in range(trials):
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            reps += 1
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start))
    return best
