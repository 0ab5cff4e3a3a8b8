"""A checkpoint as one plain model, for the tools: any stage count or precision read into the
single-device GPT (fp32 master weights on request, from the ZeRO or fp16 optimizer's files), and
weights written back as a weights-only checkpoint (an import from Hugging Face)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from gptx.atomic import atomic_write
from gptx.config import Config, load_config
from gptx.errors import CheckpointError, ConfigError
from gptx.model.gpt import GPT
from gptx.parallel.ds_config import precision
from gptx.training.checkpoint import code_version
from gptx.training.checkpoint_files import (CHECKPOINT_FORMAT, LATEST, META, layer_file, read_layer_file, tag_for,
                                            torch_bytes, write_manifest)
from gptx.training.optimizer_files import fp32_master_weights
from gptx.training.resume import check_complete, find_latest, is_checkpoint_folder

WEIGHTS_PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its latest complete checkpoint) or a complete checkpoint folder -> the folder."""
    path = Path(path)
    if is_checkpoint_folder(path):
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
    """fp32, bf16 or fp16: what the checkpoint's run trained in (for imported weights, what they were
    stored in; fp32 where an older gptx did not record it)."""
    meta = json.loads((resolve_checkpoint(path) / META).read_text())
    ds_config = meta.get("ds_config")
    if isinstance(ds_config, dict):
        return precision(ds_config)
    return meta.get("precision") if meta.get("precision") in WEIGHTS_PRECISIONS else "fp32"


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
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"checkpoint file '{file}' holds a {type(state).__name__}, not a table of a "
                                  f"layer's tensors; the file is not a gptx layer file: --load an earlier "
                                  f"checkpoint folder of the run")
        if masters is not None:
            state.update(masters.get(int(name), {}))  # layers without parameters have no masters
        try:
            module.load_state_dict({k: v.to(dtype) for k, v in state.items()})
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint file '{file}' does not fit layer {name} of the model in "
                                  f"{META}: {str(e).splitlines()[-1].strip()}") from None
    return model.to(dtype), cfg


def save_weights_only(layers: dict[int, dict[str, torch.Tensor]], cfg: Config, out: str | Path,
                      source: str, stored_precision: str = "fp32") -> Path:
    """A checkpoint holding only layer files (e.g. converted weights) that --load starts from;
    `stored_precision` is what the weights were stored in before (an export's --dtype auto keeps it).

    Training from it starts at iteration 0 with a fresh optimizer; tools read it like any other.
    A write that fails (a full disk) removes what it wrote: a half-written folder would block the retry.
    """
    out = Path(out)
    tag = tag_for(0)
    folder = out / tag
    created = [path for path in (out, folder) if not path.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for idx, state in layers.items():
            atomic_write(layer_file(folder, idx), torch_bytes({k: v.contiguous() for k, v in state.items()}))
        meta = {"config": cfg.to_dict(), "weights_only": True, "checkpoint_format": CHECKPOINT_FORMAT,
                "source": source, "precision": stored_precision, "pipe_parallel_size": None, "iteration": 0,
                "consumed_samples": 0, "tokens": 0, "lr_steps": 0, "code_version": code_version()}
        atomic_write(folder / META, (json.dumps(meta, indent=2) + "\n").encode())
        write_manifest(folder)
        atomic_write(out / LATEST, tag.encode())
    except BaseException as e:  # Ctrl-C too
        if created:  # the outermost directory this call made, with everything in it; nothing else
            shutil.rmtree(created[0], ignore_errors=True)
        if not isinstance(e, OSError):
            raise
        raise CheckpointError(f"--save '{out}': could not write the checkpoint ({e.strerror or e}); free space "
                              f"or choose another --save (nothing was kept)") from None
    return folder
