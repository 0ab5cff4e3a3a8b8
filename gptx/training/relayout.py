"""Resuming a checkpoint on another layout: another number of pipeline stages, or another
data-parallel size where the optimizer's state is split across the replicas (ZeRO, DeepSpeed's
bf16 optimizer), which DeepSpeed cannot load (it stops with a ZeRORuntimeException).

What carries over exactly: the weights (a 16-bit run's fp32 master weights too), Adam's moments
and step count, all read per parameter from the optimizer files (gptx.training.optimizer_files),
a fp16 run's loss scale, the iteration, the data position and the LR schedule. What restarts:
the dropout streams, and the optimizer's state where adam_state_blocker says why.
"""
from __future__ import annotations

import glob
from pathlib import Path

import torch

from gptx.parallel.data_parallel import DataParallelEngine, load_layer_states
from gptx.parallel.ds_config import precision, zero_stage
from gptx.parallel.optimizer_state import (refresh_fp32_masters, set_adam_state, set_fp32_masters, set_loss_scale,
                                           trains_in_fp32)
from gptx.training.checkpoint_files import read_layer_file
from gptx.training.consolidate import config_from_meta
from gptx.training.optimizer_files import (Layers, adam_amsgrad, adam_state, fp32_master_weights, loss_scale_state,
                                           param_layer_key)


def stages(pipe_size: int | None) -> str:
    return "no pipeline" if pipe_size == 0 else f"{pipe_size} pipeline stage(s)"


def optimizer_kind(ds_config: dict) -> str:
    return f"ZeRO-{zero_stage(ds_config)} in {precision(ds_config)}"


def layout_change(meta: dict, folder: Path, pipe_size: int, dp_size: int, ds_config: dict,
                  partition_method: str = "parameters") -> str | None:
    """What differs between the checkpoint's layout and this run's that DeepSpeed cannot load
    across, or None when DeepSpeed's own load restores everything."""
    saved_pp, saved_dp = meta.get("pipe_parallel_size"), meta.get("data_parallel_size")
    if saved_pp != pipe_size:
        return f"the checkpoint has {stages(saved_pp)} and this run {stages(pipe_size)}"
    saved_method = ((meta.get("config") or {}).get("train") or {}).get("partition_method", "parameters")
    if pipe_size > 1 and saved_method.lower() != partition_method.lower():
        # Other layers on each stage: each stage's optimizer file holds another stage's parameters now.
        return (f"the checkpoint's {stages(saved_pp)} were partitioned by '{saved_method}' and this run's by "
                f"'{partition_method}'")
    saved = meta.get("ds_config")
    # Each ZeRO stage and precision keeps its optimizer in files of its own; DeepSpeed loads only its
    # own kind (another stops it with an AttributeError or a missing file).
    if isinstance(saved, dict) and optimizer_kind(saved) != optimizer_kind(ds_config):
        return f"the checkpoint's optimizer is {optimizer_kind(saved)} and this run's {optimizer_kind(ds_config)}"
    split = glob.glob(str(folder / "*zero_pp_rank_*_optim_states.pt"))
    if split and saved_dp is not None and saved_dp != dp_size:
        return (f"the checkpoint's optimizer state is split across {saved_dp} data-parallel replicas and this run "
                f"has {dp_size}")
    return None


def value_of(layers: Layers):
    """A parameter's name in engine.module -> its value in `layers` (layer index -> key -> tensor)."""
    def value(name: str) -> torch.Tensor:
        idx, key = param_layer_key(name)
        return layers[idx][key]
    return value


def load_layers(engine, folder: Path, masters: Layers | None = None,
                adam: tuple[int, dict[str, Layers]] | None = None) -> None:
    """Collective: Adam's state when given (step count, moments), then this rank's layers from the
    layer files (one per position in the LayerSpec list, so any layout reads them), then the
    optimizer's fp32 copies from `masters`, or from the loaded weights when there are none (an
    fp32 run, converted weights)."""
    if adam is not None:  # first: it passes through the fp32 copies (an fp32 run's weights), which the rest sets
        step, moments = adam
        set_adam_state(engine, step, {key: value_of(layers) for key, layers in moments.items()})
    fp32_engine = trains_in_fp32(engine)

    def layer_state(idx: int) -> dict:
        state = read_layer_file(folder, idx)
        if masters is not None and fp32_engine:  # an fp32 run's weights are the 16-bit checkpoint's masters
            state.update({key: value.float() for key, value in masters.get(idx, {}).items()})
        return state
    if isinstance(engine, DataParallelEngine):
        load_layer_states(engine, layer_state)
    else:
        module = engine.module
        for local, layer in enumerate(module.forward_funcs):
            if hasattr(layer, "load_state_dict"):  # not the tied head: it is the embedding, synchronised below
                layer.load_state_dict(layer_state(local + module._local_start))
        module._synchronize_tied_weights()
    if masters is None or fp32_engine:
        refresh_fp32_masters(engine)
    else:
        set_fp32_masters(engine, value_of(masters))


def wanted_layers(engine) -> set[int]:
    return {param_layer_key(name)[0] for name, _ in engine.module.named_parameters()}


def saved_masters(engine, folder: Path, meta: dict) -> Layers | None:
    """The fp32 master weights of the checkpoint's layers this rank holds: a 16-bit checkpoint's
    from its optimizer files, an fp32 one's layer files when this run is 16-bit (its copies would
    otherwise be widened from the rounded weights); None for fp32 into fp32 (the loaded weights are
    the masters)."""
    if precision(meta.get("ds_config") or {}) == "fp32":
        if trains_in_fp32(engine):
            return None
        return {idx: {k: v.float() for k, v in read_layer_file(folder, idx).items()} for idx in wanted_layers(engine)}
    return fp32_master_weights(folder, meta, config_from_meta(meta, folder), wanted=wanted_layers(engine))


def adam_state_blocker(meta: dict, ds_config: dict) -> str | None:
    """Why Adam's state cannot carry over from the checkpoint (`meta`) into this run (`ds_config`), or None."""
    mine, theirs = adam_amsgrad(ds_config), adam_amsgrad(meta.get("ds_config") or {})
    if mine is None or theirs is None:
        return "gptx carries Adam's and AdamW's"
    if mine != theirs:
        return "amsgrad differs"
    offload = (ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    if zero_stage(ds_config) == 3 and (offload.get("device") == "nvme" or offload.get("ratio", 1) < 1):
        return "this run's ZeRO-3 swaps its optimizer state to NVMe or keeps part of it on the device"
    return None


def saved_adam_state(engine, folder: Path, meta: dict) -> tuple[int, dict[str, Layers]] | None:
    """Adam's step count and moments of the checkpoint's layers this rank holds (adam_state_blocker first)."""
    return adam_state(folder, meta, config_from_meta(meta, folder), wanted=wanted_layers(engine))


def carry_loss_scale(engine, folder: Path, meta: dict) -> bool:
    """A fp16 checkpoint's dynamic loss scale into this fp16 run, rather than its initial one (which
    would cost skipped steps to find the scale again); False where there is none to carry."""
    saved = loss_scale_state(folder, meta)
    return saved is not None and set_loss_scale(engine, saved)


def what_carries_over(change: str, masters: bool, adam_blocker: str | None, loss_scale: bool) -> str:
    """The log line of a resume on another layout."""
    carried = ["weights (their fp32 master copies too)" if masters else "weights"]
    carried += ["Adam's moments and step count"] * (adam_blocker is None) + ["the loss scale"] * loss_scale
    line = f"{change}: {', '.join(carried)}, iteration, data position and LR schedule carry over exactly"
    if adam_blocker is None:
        return line
    return f"warning: {line}; the optimizer's state restarts from zero ({adam_blocker})"
