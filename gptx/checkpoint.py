"""Save and resume around DeepSpeed's checkpoints.

A run directory holds one folder per checkpoint (`iter_0000200/`, DeepSpeed's layer and
optimizer files plus ours) and a `latest` file naming the newest complete one. DeepSpeed
0.19 writes `latest` from rank 0 before the other ranks have finished, so we pass
save_latest=False and move the pointer ourselves, atomically, after a barrier.

Ours in each folder: `gptx.json` (resolved config, DeepSpeed JSON, layout, code version,
progress) and `rng_rank_XXXXX.pt` (each rank's RNG states, for dropout).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from gptx.config import Config
from gptx.atomic import atomic_write
from gptx.errors import CheckpointError

LATEST = "latest"
META = "gptx.json"


def code_version() -> str:
    """The git commit of the code that ran (with '-dirty' for uncommitted changes), if known."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("-dirty" if dirty else "")) if commit else "unknown"


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(engine, run_dir: str | Path, iteration: int, progress: dict, meta: dict) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    run_dir = Path(run_dir)
    tag = tag_for(iteration)
    engine.save_checkpoint(str(run_dir), tag=tag, client_state=dict(progress), save_latest=False)
    folder = run_dir / tag
    rank = dist.get_rank()
    buf = _torch_bytes(_rng_state())
    atomic_write(folder / f"rng_rank_{rank:05d}.pt", buf)
    if rank == 0:
        atomic_write(folder / META, (json.dumps({**meta, **progress}, indent=2) + "\n").encode())
    dist.barrier()
    if rank == 0:
        _fsync_tree(folder)
        atomic_write(run_dir / LATEST, tag.encode())
    dist.barrier()
    return folder


def _torch_bytes(obj) -> bytes:
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def find_latest(load_dir: str | Path) -> tuple[str, dict]:
    """The newest complete checkpoint's tag and its gptx.json, or a CheckpointError."""
    load_dir = Path(load_dir)
    pointer = load_dir / LATEST
    if not load_dir.is_dir():
        raise CheckpointError(f"--load '{load_dir}': no such directory")
    if not pointer.exists():
        raise CheckpointError(f"--load '{load_dir}': no '{LATEST}' file, so no complete checkpoint to resume from")
    tag = pointer.read_text().strip()
    meta_path = load_dir / tag / META
    if not meta_path.exists():
        raise CheckpointError(f"--load '{load_dir}': '{LATEST}' names '{tag}', which has no {META}")
    try:
        return tag, json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint file '{meta_path}': not valid JSON") from None


def check_compatible(meta: dict, cfg: Config, pipe_size: int, where: str) -> None:
    """Refuse, before any heavy work, a checkpoint of another model shape."""
    saved = meta.get("config", {}).get("model", {})
    current = cfg.to_dict()["model"]
    diffs = [f"{k} {saved.get(k)!r} (checkpoint) vs {current[k]!r} (now)"
             for k in current if k != "dropout" and saved.get(k) != current[k]]
    if diffs:
        raise CheckpointError(f"checkpoint '{where}' is of another model: " + "; ".join(diffs))


def load_weights_only(engine, load_dir: str | Path, tag: str) -> None:
    """Collective: this stage's layers from the layer files, for a checkpoint of another layout.

    Layer files are per position in the LayerSpec list, so any stage count reads them. The
    optimizer's own state is per stage and does not carry over: Adam's moments restart.
    """
    folder = Path(load_dir) / tag
    module = engine.module
    for local, layer in enumerate(module.forward_funcs):
        if not hasattr(layer, "load_state_dict"):
            continue  # the tied head: it is the embedding, synchronised below
        file = layer_file(folder, local + module._local_start)
        if not file.exists():
            raise CheckpointError(f"checkpoint '{folder}': missing {file.name}")
        layer.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    module._synchronize_tied_weights()
    # Mixed-precision optimizers keep fp32 master weights; refresh them from the loaded ones.
    if hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()
    elif hasattr(engine.optimizer, "_restore_from_bit16_weights"):
        engine.optimizer._restore_from_bit16_weights()


def load(engine, load_dir: str | Path, tag: str) -> dict:
    """Collective: restore model, optimizer, LR schedule, loss scaler and this rank's RNG."""
    path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"checkpoint '{Path(load_dir) / tag}': DeepSpeed could not load it")
    rng_file = Path(load_dir) / tag / f"rng_rank_{dist.get_rank():05d}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its latest complete checkpoint) or a checkpoint folder -> the folder."""
    path = Path(path)
    if (path / META).exists():
        return path
    tag, _ = find_latest(path)
    return path / tag


def config_from_meta(meta: dict) -> Config:
    from gptx.config import ModelConfig, TrainConfig
    saved = meta["config"]
    return Config(model=ModelConfig(**saved["model"]), train=TrainConfig(**saved["train"]), name=saved["name"])


def layer_file(folder: Path, idx: int) -> Path:
    return folder / f"layer_{idx:02d}-model_states.pt"


def load_plain_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """A training checkpoint (any stage count or precision) as the single-device GPT, plus its Config.

    Each pipeline position has one layer file whatever the layout; the tied head has none
    (it is the embedding), which the plain model shares by construction.
    """
    from gptx.model import GPT
    folder = resolve_checkpoint(path)
    cfg = config_from_meta(json.loads((folder / META).read_text()))
    model = GPT(cfg.model, seed=cfg.train.seed)
    for name, module in model.layers.items():
        file = layer_file(folder, int(name))
        if not file.exists():
            raise CheckpointError(f"checkpoint '{folder}': missing {file.name}")
        state = torch.load(file, map_location="cpu", weights_only=True)
        try:
            module.load_state_dict({k: v.to(dtype) for k, v in state.items()})
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint file '{file}' does not fit layer {name} of the model in "
                                  f"{META}: {str(e).splitlines()[-1].strip()}") from None
    return model.to(dtype), cfg


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
        atomic_write(layer_file(folder, idx), _torch_bytes({k: v.contiguous() for k, v in state.items()}))
    meta = {"config": cfg.to_dict(), "weights_only": True, "source": source, "pipe_parallel_size": None,
            "iteration": 0, "consumed_samples": 0, "tokens": 0, "lr_steps": 0, "code_version": code_version()}
    atomic_write(folder / META, (json.dumps(meta, indent=2) + "\n").encode())
    atomic_write(out / LATEST, tag.encode())
    return folder
