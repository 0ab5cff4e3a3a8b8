"""A checkpoint as one plain model, for the tools: any stage count or precision read into the
single-device GPT (fp32 master weights on request, from the ZeRO or fp16 optimizer's files), and
weights written back as a weights-only checkpoint (an import from Hugging Face)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from gptx.atomic import atomic_write
from gptx.config import Config, load_config
from gptx.errors import CheckpointError, ConfigError
from gptx.model.gpt import GPT, layer_specs
from gptx.parallel.data_parallel import fp32_master_layers
from gptx.parallel.ds_config import precision
from gptx.parallel.pipeline import layer_compute_weights, partition
from gptx.training.checkpoint import (CHECKPOINT_FORMAT, LATEST, META, code_version, layer_file, read_layer_file,
                                      read_torch_file, tag_for, torch_bytes, write_manifest)
from gptx.training.resume import check_complete, find_latest


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its latest complete checkpoint) or a complete checkpoint folder -> the folder."""
    path = Path(path)
    if (path / META).exists():
        check_complete(path)
        return path
    tag, _ = find_latest(path)
    return path / tag


def config_from_meta(meta: dict, where: str | Path) -> Config:
    """The run's config as its gptx.json records it, checked as --load checks it (keys a later
    gptx added are left out)."""
    saved = meta.get("config")
    if not (isinstance(saved, dict) and all(isinstance(saved.get(k, {}), dict) for k in ("model", "train"))):
        raise CheckpointError(f"checkpoint '{where}': {META} has no config with 'model' and 'train' tables")
    try:
        return load_config(saved=saved)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint '{where}': its {META}: {e}") from None


def trained_precision(path: str | Path) -> str:
    """fp32, bf16 or fp16: what the checkpoint's run trained in (fp32 for imported weights)."""
    meta = json.loads((resolve_checkpoint(path) / META).read_text())
    ds_config = meta.get("ds_config")
    return precision(ds_config) if isinstance(ds_config, dict) else "fp32"


def load_plain_model(path: str | Path, dtype: torch.dtype = torch.float32, master_weights: bool = False):
    """A training checkpoint (any stage count or precision) as the single-device GPT, plus its Config.

    Each pipeline position has one layer file whatever the layout; the tied head has none
    (it is the embedding), which the plain model shares by construction. With
    `master_weights`, a fp16/bf16 run's weights come from the optimizer's fp32 copies
    instead of the half-precision layer files (a fp32 run's layer files already are them).
    """
    folder = resolve_checkpoint(path)
    meta = json.loads((folder / META).read_text())
    cfg = config_from_meta(meta, folder)
    model = GPT(cfg.model, seed=cfg.train.seed)
    masters = fp32_master_weights(folder, meta, cfg) if master_weights else None
    for name, module in model.layers.items():
        file = layer_file(folder, int(name))
        state = read_layer_file(folder, int(name))
        if masters is not None:
            state.update(masters.get(int(name), {}))  # layers without parameters have no masters
        try:
            module.load_state_dict({k: v.to(dtype) for k, v in state.items()})
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint file '{file}' does not fit layer {name} of the model in "
                                  f"{META}: {str(e).splitlines()[-1].strip()}") from None
    return model.to(dtype), cfg


def _stage_param_order(cfg: Config, stage_layers: range) -> list[list[tuple[int, str, torch.Size]]]:
    """(layer index, key in its layer file, shape) of one stage's parameters, per optimizer group.

    The order DeepSpeed flattens them in: the stage module's parameters() (the tied
    embedding's module first, then the other layers by index), split into gptx's two
    param_groups (matrices, then vectors).
    """
    from deepspeed.pipe import TiedLayerSpec

    specs = layer_specs(cfg.model, cfg.train.seed)
    tied, rest = [], []
    for idx in stage_layers:
        spec = specs[idx]
        with torch.device("meta"):
            module = spec.build()
        named = [(idx, k, p.shape) for k, p in module.named_parameters()]
        if isinstance(spec, TiedLayerSpec):
            tied = tied or [(0, k, shape) for _, k, shape in named]  # the head's weights are layer 0's
        else:
            rest += named
    ordered = tied + rest
    groups = [[x for x in ordered if len(x[2]) >= 2], [x for x in ordered if len(x[2]) < 2]]
    return [g for g in groups if g]


def param_layer_key(name: str) -> tuple[int, str]:
    """A parameter's name in a stage module or the no-pipeline model -> (layer index, key in its layer file)."""
    if name.startswith("layers."):  # the no-pipeline model: layers.<index>.<key>
        name = name[len("layers."):]
    if name.startswith("tied_modules."):
        return 0, name.split(".", 2)[2]  # the tied embedding is layer 0's
    idx, key = name.split(".", 1)
    return int(idx), key


def _zero_masters(files: list[Path]) -> dict[str, torch.Tensor]:
    """A stage's fp32 masters from its ZeRO-1 / bf16 optimizer files (one per data-parallel rank).

    Each rank holds a slice of every flat group; `param_slice_mappings` says where each
    parameter's fragment starts in that rank's slice, which also covers DeepSpeed's
    alignment padding and round-robin ordering.
    """
    states = [read_torch_file(f, weights_only=False)["optimizer_state_dict"] for f in files]
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for g in range(len(states[0]["single_partition_of_fp32_groups"])):
        base = 0
        for sd in states:
            part = sd["single_partition_of_fp32_groups"][g]
            for name, frag in sd["param_slice_mappings"][g].items():
                pieces.setdefault(name, []).append((base + frag.start, part[frag.start:frag.start + frag.numel]))
            base += part.numel()
    return {name: torch.cat([t for _, t in sorted(frags, key=lambda x: x[0])]) for name, frags in pieces.items()}


def _records_zero_stage(file: Path) -> bool:
    """DeepSpeed's ZeRO optimizers record their stage in their files; its bf16 optimizer does not."""
    state = read_torch_file(file, weights_only=False, mmap=True)
    return "zero_stage" in state["optimizer_state_dict"]


def _fp16_masters(states: dict, order: list[list[tuple[int, str, torch.Size]]], where: str) -> dict:
    """A stage's fp32 masters from DeepSpeed's fp16 optimizer without ZeRO: flat groups in parameter order."""
    opt = states.get("optimizer") or {}
    if "fp32_groups_flat" in opt:  # FP16_Optimizer (fused Adam)
        flat = list(opt["fp32_groups_flat"])
    elif "fp32_groups" in opt:  # FP16_UnfusedOptimizer: a list of tensors per group
        flat = [torch.cat([t.reshape(-1) for t in group]) for group in opt["fp32_groups"]]
    else:
        raise CheckpointError(f"checkpoint '{where}': no fp32 master weights in DeepSpeed's optimizer state")
    if len(flat) != len(order):
        raise CheckpointError(f"checkpoint '{where}': {len(flat)} optimizer groups, gptx expects {len(order)}")
    masters = {}
    for group, entries in zip(flat, order):
        if group.numel() != sum(shape.numel() for _, _, shape in entries):
            raise CheckpointError(f"checkpoint '{where}': an optimizer group holds {group.numel()} values, "
                                  f"the stage's parameters {sum(s.numel() for _, _, s in entries)}")
        offset = 0
        for idx, key, shape in entries:
            masters[(idx, key)] = group[offset:offset + shape.numel()].view(shape).clone()
            offset += shape.numel()
    return masters


def fp32_master_weights(folder: Path, meta: dict, cfg: Config,
                        wanted: set[int] | None = None) -> dict[int, dict[str, torch.Tensor]] | None:
    """Layer index -> state dict from the optimizer's fp32 master copies, or None when the run was fp32.

    The tied embedding is taken from the first stage (its copies are kept equal). With `wanted` layers,
    only the stages holding one of them are read (a pipeline's optimizer files are large).
    """
    ds = meta.get("ds_config", {})
    if not (ds.get("fp16", {}).get("enabled") or ds.get("bf16", {}).get("enabled")):
        return None
    pp, dp = meta.get("pipe_parallel_size"), meta.get("data_parallel_size")
    if pp == 0 and dp:
        bf16_files = [folder / f"bf16_zero_pp_rank_{d}_mp_rank_00_optim_states.pt" for d in range(dp)]
        if all(f.exists() for f in bf16_files) and not _records_zero_stage(bf16_files[0]):
            # DeepSpeed's bf16 optimizer (bf16 with ZeRO-1), whose files zero_to_fp32 does not read
            order = _stage_param_order(cfg, range(len(layer_specs(cfg.model, cfg.train.seed))))
            shapes = {(idx, key): shape for group in order for idx, key, shape in group}
            layers: dict[int, dict[str, torch.Tensor]] = {}
            for name, tensor in _zero_masters(bf16_files).items():
                idx, key = param_layer_key(name)
                layers.setdefault(idx, {})[key] = tensor.view(shapes[(idx, key)])
            return layers
        return fp32_master_layers(folder)  # ZeRO: DeepSpeed's own consolidation reads its shards
    if not pp or not dp:
        raise CheckpointError(f"checkpoint '{folder}' holds no optimizer state (weights only): no master weights")
    specs = layer_specs(cfg.model, cfg.train.seed)
    parts = partition(specs, cfg.train.partition_method, pp, layer_compute_weights(cfg, specs))
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for stage in range(pp):
        if wanted is not None and not wanted.intersection(range(parts[stage], parts[stage + 1])):
            continue
        order = _stage_param_order(cfg, range(parts[stage], parts[stage + 1]))
        shapes = {(idx, key): shape for group in order for idx, key, shape in group}
        zero = sorted(folder.glob(f"*zero_pp_rank_*_mp_rank_{stage:02d}_optim_states.pt"))
        if zero:
            prefix = zero[0].name.split("zero_pp_rank_")[0]
            files = [folder / f"{prefix}zero_pp_rank_{d}_mp_rank_{stage:02d}_optim_states.pt" for d in range(dp)]
            masters = {param_layer_key(name): t for name, t in _zero_masters(files).items()}
        else:
            states = read_torch_file(folder / f"mp_rank_{stage:02d}_model_states.pt", weights_only=False)
            masters = _fp16_masters(states, order, str(folder))
        if masters.keys() != shapes.keys():
            raise CheckpointError(f"checkpoint '{folder}': stage {stage}'s optimizer holds other parameters than "
                                  f"the model in {META}")
        for (idx, key), tensor in masters.items():
            if tensor.numel() != shapes[(idx, key)].numel():
                raise CheckpointError(f"checkpoint '{folder}': master weight {idx}.{key} has {tensor.numel()} "
                                      f"values, the model {shapes[(idx, key)].numel()}")
            layers.setdefault(idx, {}).setdefault(key, tensor.view(shapes[(idx, key)]))
    return layers


def save_weights_only(layers: dict[int, dict[str, torch.Tensor]], cfg: Config, out: str | Path,
                      source: str) -> Path:
    """A checkpoint holding only layer files (e.g. converted weights) that --load starts from.

    Training from it starts at iteration 0 with a fresh optimizer; tools read it like any other.
    """
    out = Path(out)
    tag = tag_for(0)
    folder = out / tag
    folder.mkdir(parents=True, exist_ok=True)
    for idx, state in layers.items():
        atomic_write(layer_file(folder, idx), torch_bytes({k: v.contiguous() for k, v in state.items()}))
    meta = {"config": cfg.to_dict(), "weights_only": True, "checkpoint_format": CHECKPOINT_FORMAT, "source": source,
            "pipe_parallel_size": None, "iteration": 0, "consumed_samples": 0, "tokens": 0, "lr_steps": 0,
            "code_version": code_version()}
    atomic_write(folder / META, (json.dumps(meta, indent=2) + "\n").encode())
    write_manifest(folder)
    atomic_write(out / LATEST, tag.encode())
    return folder
