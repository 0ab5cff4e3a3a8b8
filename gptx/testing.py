"""Switches for gptx's own tests, read from the environment; unset (as in every real run) they do nothing.

GPTX_CPU_FP16=1   lets DeepSpeed's CPU accelerator run fp16, so the fp16 optimizers and loss scaling are
                  tested on machines without a GPU (slowly: it is not for training).
GPTX_FAULT=...    injects a fault at a named point of a run (tests/integration/test_reliability.py,
                  tests/unit/training/test_reliability.py).
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

CPU_FP16_ENV = "GPTX_CPU_FP16"


def cpu_fp16_allowed() -> bool:
    return os.environ.get(CPU_FP16_ENV) == "1"


def allow_cpu_fp16() -> None:
    """With GPTX_CPU_FP16=1, let DeepSpeed's CPU accelerator run fp16 (slowly), for tests.

    It answers is_fp16_supported() with False on CPUs without AVX512-FP16, and the engine
    refuses fp16 on that answer; torch's CPU fp16 kernels and DeepSpeed's fp16 optimizers
    work on CPU tensors all the same.
    """
    if not cpu_fp16_allowed():
        return
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return
    accelerator.is_fp16_supported = lambda: True
    accelerator.supported_dtypes = lambda: [torch.float, torch.bfloat16, torch.float16]


def fault_point(where: str, iteration: int, folder: Path | None = None) -> None:
    """Fault injection for the reliability tests: GPTX_FAULT=ACTION,WHERE,ITERATION,RANK makes
    that rank raise (ACTION raise), die by SIGKILL (kill), receive SIGTERM and go on (term: what
    a scheduler's preemption sends), stop responding (hang) or, in a save, delete the folder
    being written (delete) there. Unset, it does nothing."""
    spec = os.environ.get("GPTX_FAULT")
    if not spec:
        return
    action, point, at, rank = spec.split(",")
    if point != where or int(at) != iteration or int(rank) != dist.get_rank():
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if action == "delete" and folder is not None:
        shutil.rmtree(folder)
        return
    if action == "hang":
        while True:
            time.sleep(1)
    raise RuntimeError(f"injected fault at {where} of iteration {iteration} on rank {rank}")
