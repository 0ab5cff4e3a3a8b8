"""The fp32 master weights a 16-bit engine's optimizer keeps beside the model's own weights.

After weights are written into the model from outside (a resume onto another layout), the
optimizer's copies must follow. Refreshing them from the 16-bit weights rounds them; when the
checkpoint kept its fp32 masters, set_fp32_masters gives the copies those exact values instead.
An fp32 engine has no copies: its parameters are the masters.
"""
from __future__ import annotations

from typing import Callable

import torch


def refresh_fp32_masters(engine) -> None:
    """The optimizer's fp32 copies := the model's (16-bit) weights, as DeepSpeed does after a load."""
    if hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()


def set_fp32_masters(engine, master_of: Callable[[str], torch.Tensor]) -> None:
    """Each parameter's fp32 copy := master_of(its name in engine.module), whatever the optimizer.

    Under ZeRO and DeepSpeed's bf16 optimizer each rank holds a fragment of every flat group
    and takes its own slice of the full value; FP16_Optimizer keeps one flat fp32 tensor per
    group, in the group's parameter order; FP16_UnfusedOptimizer one tensor per parameter.
    """
    params = dict(engine.module.named_parameters())
    if all(p.dtype == torch.float32 for p in params.values()):
        refresh_fp32_masters(engine)  # fp32 training: the weights loaded are the masters (ZeRO keeps a copy)
        return
    name_of = {id(p): name for name, p in params.items()}
    optimizer = engine.optimizer
    if any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in params.values()):
        from deepspeed.utils import safe_set_full_fp32_param
        for name, p in params.items():
            safe_set_full_fp32_param(p, master_of(name).to(p.device, torch.float32))
    elif hasattr(optimizer, "fp32_groups_flat"):  # FP16_Optimizer
        for flat, group in zip(optimizer.fp32_groups_flat, optimizer.fp16_groups):
            values = [master_of(name_of[id(p)]).reshape(-1) for p in group]
            flat.data.copy_(torch.cat(values).to(flat.device))
    elif hasattr(optimizer, "fp32_groups"):  # FP16_UnfusedOptimizer
        for copies, group in zip(optimizer.fp32_groups, optimizer.fp16_groups):
            for copy, p in zip(copies, group):
                copy.data.copy_(master_of(name_of[id(p)]).view_as(copy))
    else:
        raise TypeError(f"gptx cannot set the fp32 master weights of {type(optimizer).__name__}")
