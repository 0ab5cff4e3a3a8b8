"""What an engine's optimizer keeps beside the model's weights: a 16-bit run's fp32 master copies,
Adam's moments (amsgrad's maximum too) and step count, and fp16's loss scale, set from outside when a
run resumes on another layout.

After weights are written into the model from outside, the optimizer's fp32 copies must follow.
Refreshing them from the 16-bit weights rounds them; when the checkpoint kept its fp32 masters,
set_fp32_masters gives the copies those exact values instead. An fp32 engine has no copies: its
parameters are the masters (ZeRO keeps a partitioned copy, refreshed from them).
"""
from __future__ import annotations

from typing import Callable

import torch

ValueOf = Callable[[str], torch.Tensor]  # a parameter's name in engine.module -> its full value
LOSS_SCALE_KEYS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")  # a dynamic scaler's state


def scale_holder(optimizer):
    """The object whose `cur_scale` is the loss scale: FP16_Optimizer / FP16_UnfusedOptimizer keep
    it in loss_scale_config, the ZeRO optimizer in loss_scaler (DeepSpeed 0.19)."""
    return getattr(optimizer, "loss_scale_config", None) or getattr(optimizer, "loss_scaler", None) or optimizer


def set_loss_scale(engine, saved: dict) -> bool:
    """A fp16 engine's dynamic loss scale := `saved` (LOSS_SCALE_KEYS, what each optimizer keeps of them);
    False where there is none to set (bf16, fp32, a static scale)."""
    holder = scale_holder(engine.optimizer)
    if not engine.fp16_enabled() or not getattr(holder, "dynamic_loss_scale", getattr(holder, "dynamic", False)):
        return False
    for key, value in saved.items():
        if hasattr(holder, key):
            setattr(holder, key, value)
    return True


def refresh_fp32_masters(engine) -> None:
    """The optimizer's fp32 copies := the model's (16-bit) weights, as DeepSpeed does after a load."""
    if hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()


def _write_fp32_copies(engine, value_of: ValueOf) -> None:
    """Each parameter's fp32 tensor that the torch optimizer steps := value_of(its name), whatever
    the layout. Under ZeRO and DeepSpeed's bf16 optimizer each rank holds a fragment of every flat
    group and takes its own slice of the full value; FP16_Optimizer keeps one flat fp32 tensor per
    group, in the group's parameter order; FP16_UnfusedOptimizer one tensor per parameter; an fp32
    engine without ZeRO steps the parameters themselves."""
    params = dict(engine.module.named_parameters())
    name_of = {id(p): name for name, p in params.items()}
    optimizer = engine.optimizer
    if any(hasattr(p, "ds_id") for p in params.values()):
        set_zero3_fp32(params, value_of)
    elif any(hasattr(p, "_hp_mapping") for p in params.values()):
        from deepspeed.utils import safe_set_full_fp32_param
        for name, p in params.items():
            safe_set_full_fp32_param(p, value_of(name).to(p.device, torch.float32))
    elif hasattr(optimizer, "fp32_groups_flat"):  # FP16_Optimizer
        for flat, group in zip(optimizer.fp32_groups_flat, optimizer.fp16_groups):
            values = [value_of(name_of[id(p)]).reshape(-1) for p in group]
            flat.data.copy_(torch.cat(values).to(flat.device))
    elif hasattr(optimizer, "fp32_groups"):  # FP16_UnfusedOptimizer
        for copies, group in zip(optimizer.fp32_groups, optimizer.fp16_groups):
            for copy, p in zip(copies, group):
                copy.data.copy_(value_of(name_of[id(p)]).view_as(copy))
    elif all(p.dtype == torch.float32 for p in params.values()):
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(value_of(name).view_as(p))
    else:
        raise TypeError(f"gptx cannot set the fp32 copies of {type(optimizer).__name__}")


def set_zero3_fp32(params: dict[str, torch.Tensor], value_of: ValueOf) -> None:
    """Each ZeRO-3 parameter's fp32 partition on this rank := its chunk of value_of(its name).

    DeepSpeed defect 10 (gptx/parallel/engine.py): ZeRO-3's set_full_hp_param (safe_set_full_fp32_param)
    slices the full value without the padding its partitions have, so where the ranks do not divide a
    parameter's size the last rank's chunk runs past the end and that rank stops with a RuntimeError,
    leaving the others waiting. gptx pads the value and hands each rank its own chunk.
    """
    import torch.distributed as dist
    from deepspeed.utils import safe_set_local_fp32_param
    for name, p in params.items():
        group = getattr(p, "ds_process_group", None)  # the ranks this parameter is cut across (MiCS: a shard group)
        rank, ranks = dist.get_rank(group=group), dist.get_world_size(group=group)
        chunk = p.ds_tensor.numel()
        value = value_of(name).reshape(-1).to(torch.float32)
        padded = torch.nn.functional.pad(value, (0, chunk * ranks - value.numel()))
        safe_set_local_fp32_param(p, padded[rank * chunk:(rank + 1) * chunk].to(p.ds_tensor.device))


def trains_in_fp32(engine) -> bool:
    """Whether the model's weights are fp32: then they are the masters (ZeRO keeps a copy of them)."""
    return all(p.dtype == torch.float32 for p in engine.module.parameters())


def set_fp32_masters(engine, master_of: ValueOf) -> None:
    """Each parameter's fp32 master copy := master_of(its name in engine.module), whatever the optimizer."""
    if trains_in_fp32(engine):
        refresh_fp32_masters(engine)  # fp32 training: the weights loaded are the masters (ZeRO keeps a copy)
        return
    _write_fp32_copies(engine, master_of)


def stepped_tensors(engine) -> list[torch.Tensor]:
    """The fp32 tensors the engine's torch optimizer steps (flat groups, fragments or parameters): its state's keys."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3 hands its sub-groups to the optimizer one by one
        return list(optimizer.fp32_partitioned_groups_flat)
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's wrappers hold the torch one
    return [t for group in inner.param_groups for t in group["params"]]


def set_adam_state(engine, step: int, moment_of: dict[str, ValueOf]) -> None:
    """Adam's step count and moments (moment_of: "exp_avg", "exp_avg_sq" and with amsgrad "max_exp_avg_sq"
    -> each parameter's full value) into the engine's torch optimizer, before its first step and before
    the weights are loaded: each moment is written where the fp32 weights live, whose layout _write_fp32_copies
    knows for every optimizer, and copied from there into the optimizer's state."""
    if not moment_of:
        return  # saved before the first step: a new optimizer's state is that
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    tensors = stepped_tensors(engine)
    moments = {}
    for key, value_of in moment_of.items():
        _write_fp32_copies(engine, value_of)
        moments[key] = [t.detach().clone() for t in tensors]
    # torch's Adam counts steps in a float tensor per parameter, incremented in place (so each needs
    # its own), on the parameter's device when fused; DeepSpeed's FusedAdam counts in an int
    torch_adam = type(inner).__module__.startswith("torch.optim")
    on_device = inner.defaults.get("fused") or inner.defaults.get("capturable")
    for i, t in enumerate(tensors):
        count = torch.tensor(float(step), device=t.device if on_device else "cpu") if torch_adam else step
        inner.state[t] = {"step": count, **{key: values[i] for key, values in moments.items()}}
