"""This process's host: which accelerator DeepSpeed picked, CPU threads per rank, and how glibc
keeps or returns freed memory (what CPU training speed and the memory tools' readings depend on)."""
from __future__ import annotations

import ctypes
import os

import torch

from gptx.config import ModelConfig


def accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name()


GLIBC_MMAP_CEILING = 32 * 2 ** 20
"""glibc's largest mmap threshold on 64-bit: blocks above it are always mapped and unmapped."""


def configure_host(accelerator: str, model: ModelConfig | None = None, micro_batch: int = 0,
                   precision: str = "fp32") -> int:
    """This process's settings; returns its thread count. On a CPU, given the model and micro-batch,
    freed memory is kept for reuse when an iteration's largest tensors would otherwise be mapped
    afresh each time (see keep_freed_memory). On a GPU, 16-bit training runs its few fp32 matmuls
    (the fp16 fused loss's head gradient) in TF32: its 10-bit mantissa is what the unfused fp16
    path's logit gradient has, and plain fp32 runs them many times slower. fp32 training keeps fp32."""
    if accelerator == "cuda" and precision in ("fp16", "bf16"):
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator == "cpu":
        if "OMP_NUM_THREADS" not in os.environ:
            # Ranks on one CPU share its cores; without this each would start a thread per core. The
            # cores this process may use: a cpuset (Slurm, docker --cpuset-cpus, taskset) holds fewer.
            local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            torch.set_num_threads(max(1, cores // local))
        if model is not None and largest_activation_bytes(model, micro_batch) > GLIBC_MMAP_CEILING:
            keep_freed_memory()
    return torch.get_num_threads()


def largest_activation_bytes(model: ModelConfig, micro_batch: int) -> int:
    """The fp32 logits of a micro-batch, or the MLP's hidden activations if wider."""
    hidden = model.ffn_hidden * (2 if model.mlp == "swiglu" else 1)
    return micro_batch * model.seq_len * max(model.padded_vocab_size, hidden) * 4


def keep_freed_memory() -> bool:
    """Keep freed host memory in the process for the next iteration (glibc only).

    glibc serves every allocation over 32 MiB with its own mmap and unmaps it when freed, so
    each iteration faults the pages of its logits and activations in afresh, zeroed by the
    kernel. Serving all allocations from the heap and trimming it only above 2 GiB free keeps
    those pages; the process holds its peak memory instead of returning it between iterations,
    and the heap's fragmentation adds to that peak (peak RSS grew by 25-65% on
    models whose tensors stay under 32 MiB, where nothing is gained: configure_host leaves
    those alone).
    On CPU, models with GPT-2's vocabulary train faster this way (docs/performance.md).
    GPTX_KEEP_FREED_MEMORY=0 opts out."""
    if os.environ.get("GPTX_KEEP_FREED_MEMORY") == "0":  # opt out: return freed memory to the OS
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        set_option = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(set_option(M_MMAP_MAX, 0)) and bool(set_option(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def return_freed_memory(promptly: bool = True) -> bool:
    """With `promptly`, map every allocation over 64 KiB on its own and unmap it when freed
    (glibc only), so this process's resident memory follows its live tensors: what
    tools/strategies.py measures. glibc's default keeps freed blocks of up to 32 MiB in its
    heap, and a ZeRO-3 step gathers and frees every layer, so resident memory would overstate
    what the strategy needs (docs/parallelism-and-memory.md). The price is page faults on every allocation, so timing
    goes back to blocks over 32 MiB only (`promptly=False`), where glibc's own threshold settles."""
    try:
        set_option = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False
    # Setting the threshold stops glibc's own adjustment, which also raises the heap's trim
    # threshold to twice the mmap threshold: set both as that adjustment would have.
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    threshold = 64 * 1024 if promptly else GLIBC_MMAP_CEILING
    return bool(set_option(M_MMAP_THRESHOLD, threshold)) and bool(set_option(M_TRIM_THRESHOLD, 2 * threshold))
