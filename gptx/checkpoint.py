"""Save and resume around DeepSpeed's checkpoints.

A run directory holds one folder per checkpoint (`iter_0000200/`, DeepSpeed's layer and
optimizer files plus ours) and a `latest` file naming the newest complete one. DeepSpeed
0.19 writes `latest` from rank 0 before the other ranks have finished, so gptx saves
without it (gptx/engine.py, defect 5) and moves the pointer itself, atomically, after a
barrier.

Ours in each folder: `gptx.json` (resolved config, DeepSpeed JSON, layout, code version,
progress), `rng_rank_XXXXX.pt` (each rank's RNG states, for dropout) and, written last,
once every rank has finished and the files are flushed, `manifest.json` (every file and
its size). A folder without a manifest that matches its files is incomplete and is never
loaded: `--load` falls back to the newest complete one.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from gptx.config import Config
from gptx.atomic import atomic_write
from gptx.engine import save_checkpoint
from gptx.errors import CheckpointError

LATEST = "latest"
META = "gptx.json"
MANIFEST = "manifest.json"
CHECKPOINT_FORMAT = 2
"""2: folders are complete only with a manifest. Folders without the key predate manifests."""
TAG_PREFIX = "iter_"


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
    return f"{TAG_PREFIX}{iteration:07d}"


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


class SpaceWatch:
    """What a run knows about its checkpoints' size, for the free-space checks around each save.

    Before a save, a folder as large as the previous one that cannot fit stops the run at
    once, with nothing written: the previous size is exact, so writing would only fill the
    disk halfway (for other programs too) and fail. Before the first save only an estimate
    exists (parameters x bytes per parameter; DeepSpeed's files vary with the optimizer and
    ZeRO), so a shortfall is a warning and the save is tried. After a save, a warning, once,
    when the next one will not fit.
    """

    def __init__(self):
        self.previous: int | None = None  # rank 0: the size of this run's last checkpoint
        self.estimated = False
        self.warned = False


def save(engine, run_dir: str | Path, iteration: int, progress: dict, meta: dict,
         space: SpaceWatch | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder.

    A write that fails on any rank (a full disk, a read-only or deleted directory) fails the
    save on every rank, agreed through an all-reduce: the partial folder is removed (or, where
    it cannot be, left without a manifest, so never loaded), `latest` keeps naming the last
    complete checkpoint, and every rank raises CheckpointWriteError, whose one line rank 0
    prints.
    """
    run_dir = Path(run_dir)
    tag = tag_for(iteration)
    folder = run_dir / tag
    rank = dist.get_rank()
    space = space or SpaceWatch()
    estimate = None
    if not space.estimated:  # on every rank alike: it is a collective
        estimate, space.estimated = _estimate_bytes(engine), True
    early, needed = 0, space.previous
    if rank == 0:
        early, needed = _before_save(run_dir, folder, space, estimate)
    _agree_or_raise(early, None, run_dir, folder, tag, needed, remove=False)
    error = save_checkpoint(engine, run_dir, tag, dict(progress))
    try:
        _write_layer_files_without_pipeline(engine, folder)
        buf = _torch_bytes(_rng_state())
        atomic_write(folder / f"rng_rank_{rank:05d}.pt", buf)
        if rank == 0:
            body = {**meta, **progress, "checkpoint_format": CHECKPOINT_FORMAT}
            atomic_write(folder / META, (json.dumps(body, indent=2) + "\n").encode())
    except Exception as e:  # noqa: BLE001 -- sorted by _write_errno
        error = error or e
    fault_point("save", progress["iteration"], folder)
    _agree_or_raise(*_write_errno(error, folder), run_dir, folder, tag, needed)
    code, unexpected = 0, None
    if rank == 0:
        try:
            _fsync_tree(folder)
            _write_manifest(folder)
            atomic_write(run_dir / LATEST, tag.encode())
        except Exception as e:  # noqa: BLE001
            try:
                (folder / MANIFEST).unlink(missing_ok=True)
            except OSError:
                pass  # the folder is removed below, or stays without a trusted manifest
            code, unexpected = _write_errno(e, folder)
    _agree_or_raise(code, unexpected, run_dir, folder, tag, needed)  # also the barrier before `latest` is read
    if rank == 0:
        space.previous = _tree_bytes(folder)
    return folder


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written; every rank raises it, rank 0 prints it."""


_TORCH_WRITE_FAILED = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


def _write_errno(error: Exception | None, where: Path) -> tuple[int, Exception | None]:
    """(errno, None) for a write error, (0, None) for none. Any other error is a bug, not a full
    disk: (EIO, the error), so that the other ranks still fail the save with this one instead of
    waiting for it, and this rank raises it with its traceback. torch's zip writer reports a
    full disk without an errno ("unexpected pos")."""
    import errno
    if error is None:
        return 0, None
    if isinstance(error, OSError) and error.errno:
        return error.errno, None
    if isinstance(error, RuntimeError) and any(t in str(error) for t in _TORCH_WRITE_FAILED):
        return (errno.ENOSPC if _free_bytes(where) < 1 << 20 else errno.EIO), None
    return errno.EIO, error


def _agree_or_raise(code: int, unexpected: Exception | None, run_dir: Path, folder: Path, tag: str,
                    needed: int | None, remove: bool = True) -> None:
    """Collective: the largest errno any rank saw; non-zero fails the save on every rank."""
    flag = torch.tensor([code], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    code = int(flag.item())
    if not code:
        return
    if unexpected is not None:
        raise unexpected
    message = ""
    if dist.get_rank() == 0:
        message = _failure_line(code, run_dir, folder, tag, needed, remove)
    raise CheckpointWriteError(message or f"could not write checkpoint {tag} to {run_dir}")


def _failure_line(code: int, run_dir: Path, folder: Path, tag: str, needed: int | None, remove: bool) -> str:
    import errno
    import shutil
    if remove:  # first: the free space then says what a retry would have
        shutil.rmtree(folder, ignore_errors=True)
    reason = os.strerror(code)
    if code == errno.ENOSPC:
        free = _free_bytes(run_dir)
        reason += (f" ({needed:,} bytes needed, {free:,} free)" if needed else f" ({free:,} bytes free)")
    elif code == errno.ENOENT:
        reason += " (the directory was deleted while the run was writing to it)"
    partial = (f"; the partial folder {folder.name} has no {MANIFEST} and is never loaded"
               if folder.exists() and not (folder / MANIFEST).exists() else "")
    try:
        last = (run_dir / LATEST).read_text().strip()
    except OSError:
        last = ""
    done = (f"the last complete checkpoint is {run_dir / last} (--load {run_dir} resumes from it)" if last
            else f"no checkpoint was completed in {run_dir}")
    return f"could not write checkpoint {tag} to {run_dir}: {reason}; {done}{partial}"


def _before_save(run_dir: Path, folder: Path, space: SpaceWatch, estimate: int | None) -> tuple[int, int | None]:
    """Rank 0: (errno that stops the save before anything is written, bytes needed)."""
    import errno
    if not run_dir.is_dir():  # DeepSpeed would silently make it again, without config.json and metrics
        return errno.ENOENT, None
    free = _free_bytes(run_dir)
    if folder.exists():  # rewriting a folder (after a fallback): it is incomplete until its new manifest
        try:
            (folder / MANIFEST).unlink(missing_ok=True)
        except OSError as e:
            return e.errno or errno.EIO, None
        free += _tree_bytes(folder)
    if space.previous is not None:
        return (errno.ENOSPC if free < space.previous else 0), space.previous
    if estimate and free < estimate and not space.warned:
        space.warned = True
        print(f"warning: checkpoint {folder.name} needs about {estimate:,} bytes (parameters x bytes per "
              f"parameter), {run_dir} has {free:,} free: the save will likely fail", flush=True)
    return 0, estimate


def check_next_fits(run_dir: Path, space: SpaceWatch) -> str | None:
    """Rank 0, after a save (and any pruning): a warning, once, when the next checkpoint will not fit."""
    if space.previous is None or space.warned:
        return None
    free = _free_bytes(run_dir)
    if free >= space.previous:
        return None
    space.warned = True
    return (f"warning: the next checkpoint will not fit: it needs about {space.previous:,} bytes (the size of the "
            f"last one), {run_dir} has {free:,} free; free some space or pass --keep-checkpoints")


def _estimate_bytes(engine) -> int:
    """Collective: the whole model's checkpoint size from its parameters (weights, two Adam moments,
    and fp32 master weights in half precision). Counted on the first data-parallel replica only:
    the others hold the same parameters (whole, or as ZeRO shards of the same total)."""
    local = 0
    grid = getattr(engine, "grid", None)
    if grid is None or grid.get_data_parallel_rank() == 0:
        for p in engine.module.parameters():
            size = p.element_size()
            local += getattr(p, "ds_numel", p.numel()) * (size + 8 + (4 if size < 4 else 0))
    total = torch.tensor([local], dtype=torch.int64)
    dist.all_reduce(total)
    return int(total.item())


def _free_bytes(path: Path) -> int:
    import shutil
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _tree_bytes(folder: Path) -> int:
    try:
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    except OSError:
        return 0


def prepare_run_dir(run_dir: Path, config_text: str | None) -> None:
    """Collective, at start-up: rank 0 makes the run directory and writes config.json (and a probe
    file) there; a read-only or unwritable --save stops every rank with one line, before training."""
    import errno
    code, reason = 0, ""
    if dist.get_rank() == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".gptx-write-probe-{os.getpid()}"
            probe.write_bytes(b"gptx")
            probe.unlink()
            if config_text is not None:
                (run_dir / "config.json").write_text(config_text)
        except OSError as e:
            code, reason = e.errno or errno.EIO, e.strerror or str(e)
    flag = torch.tensor([code], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag.item()):
        raise CheckpointError(f"--save '{run_dir}' cannot be written: {reason or os.strerror(int(flag.item()))}; "
                              f"choose a writable --save directory (nothing was trained)")


def _write_layer_files_without_pipeline(engine, folder: Path) -> None:
    """Collective. The pipeline engine writes one file per layer; DeepSpeed's plain engine writes
    one state dict (and under ZeRO-3 only shards), so gptx writes the same layer files itself."""
    from gptx.sequential import DataParallelEngine, layer_states
    if not isinstance(engine, DataParallelEngine):
        return
    states = layer_states(engine)
    if states is not None:
        for idx, state in states.items():
            atomic_write(layer_file(folder, idx), _torch_bytes(state))


def _write_manifest(folder: Path) -> None:
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.name != MANIFEST}
    atomic_write(folder / MANIFEST, (json.dumps(files, indent=1) + "\n").encode())


def fault_point(where: str, iteration: int, folder: Path | None = None) -> None:
    """Fault injection for the reliability tests: GPTX_FAULT=ACTION,WHERE,ITERATION,RANK makes
    that rank raise (ACTION raise), die by SIGKILL (kill), stop responding (hang) or, in a
    save, delete the folder being written (delete) there. Unset, it does nothing."""
    spec = os.environ.get("GPTX_FAULT")
    if not spec:
        return
    action, point, at, rank = spec.split(",")
    if point != where or int(at) != iteration or int(rank) != dist.get_rank():
        return
    if action == "kill":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "delete" and folder is not None:
        import shutil
        shutil.rmtree(folder)
        return
    if action == "hang":
        import time
        while True:
            time.sleep(1)
    raise RuntimeError(f"injected fault at {where} of iteration {iteration} on rank {rank}")


def incomplete_reason(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted, or None when it is complete."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return f"no {MANIFEST} (its writing never finished)"
    try:
        files = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return f"{MANIFEST} is not valid JSON"
    for name, size in files.items():
        path = folder / name
        if not path.exists():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """Checkpoint folders, newest first."""
    folders = [f for f in run_dir.glob(TAG_PREFIX + "*") if f.is_dir() and f.name[len(TAG_PREFIX):].isdigit()]
    return sorted(folders, key=lambda f: int(f.name[len(TAG_PREFIX):]), reverse=True)


def prune(run_dir: Path, keep: int) -> list[Path]:
    """Rank 0, after `latest` moved: delete all but the newest `keep` complete checkpoints.

    Incomplete folders older than the newest complete one go too (a crash's leftovers);
    nothing newer than `latest` is touched.
    """
    import shutil
    newest = (run_dir / LATEST).read_text().strip()
    kept, removed = 0, []
    for folder in checkpoint_folders(run_dir):
        if kept == 0 and folder.name != newest:
            continue  # newer than latest: not ours to judge
        if kept < keep and incomplete_reason(folder) is None:
            kept += 1
            continue
        shutil.rmtree(folder)
        removed.append(folder)
    return removed


def _torch_bytes(obj) -> bytes:
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def find_latest(load_dir: str | Path, warn=_to_stderr) -> tuple[str, dict]:
    """The newest complete checkpoint's tag and its gptx.json, or a CheckpointError.

    `latest` names the newest complete checkpoint unless something went wrong after it was
    written (a damaged disk, a copy that stopped halfway); then the newest folder that is
    complete by its manifest is used instead, with a warning.
    """
    load_dir = Path(load_dir)
    if not load_dir.is_dir():
        raise CheckpointError(f"--load '{load_dir}': no such directory")
    pointer = load_dir / LATEST
    named = pointer.read_text().strip() if pointer.exists() else None
    candidates = checkpoint_folders(load_dir)
    if named:
        candidates.sort(key=lambda f: f.name != named)  # the one `latest` names first
    problems = []
    for folder in candidates:
        reason = _unusable(folder)
        if reason and folder.name == named and _predates_manifests(folder):
            # `latest` only ever named complete checkpoints, also before manifests existed.
            warn(f"warning: '{folder}' has no {MANIFEST} (saved by an older gptx); trusting '{LATEST}'")
            reason = None
        if reason is None:
            if folder.name != named:
                pointed = f"'{LATEST}' names '{named}'" if named else f"there is no '{LATEST}' file"
                warn(f"warning: {pointed} but {'; '.join(problems) or 'it is not there'}; "
                     f"resuming from '{folder}', the newest complete checkpoint")
            return folder.name, json.loads((folder / META).read_text())
        problems.append(f"'{folder.name}': {reason}")
    if not candidates:
        raise CheckpointError(f"--load '{load_dir}': no checkpoint folders ({TAG_PREFIX}*) to resume from")
    raise CheckpointError(f"--load '{load_dir}': no complete checkpoint; " + "; ".join(problems))


def is_checkpoint_folder(path: str | Path) -> bool:
    """RUN/iter_N (with its gptx.json), as opposed to a run directory."""
    path = Path(path)
    return path.name.startswith(TAG_PREFIX) and (path / META).is_file()


def run_dir_of(load: str | Path) -> Path:
    """The run directory that --load names: itself, or the parent of a checkpoint folder."""
    load = Path(load)
    return load.parent if is_checkpoint_folder(load) else load


def resolve_load(load: str | Path, warn=_to_stderr) -> tuple[Path, str, dict]:
    """--load as given -> (run directory, checkpoint tag, that checkpoint's gptx.json).

    A run directory resumes from its newest complete checkpoint (find_latest). A checkpoint
    folder, which every tool accepts too, resumes from that one if it is complete; when
    `latest` names a later one, one line says so, and that this run's checkpoints go to the
    same directory (where they replace the later ones as the run reaches them).
    """
    load = Path(load)
    if not is_checkpoint_folder(load):
        tag, meta = find_latest(load, warn)
        return load, tag, meta
    run_dir = load.parent
    reason = _unusable(load)
    if reason and _predates_manifests(load):
        warn(f"warning: '{load}' has no {MANIFEST} (saved by an older gptx); loading it as asked")
        reason = None
    if reason:
        raise CheckpointError(f"--load '{load}': an incomplete checkpoint ({reason}); pass the run directory "
                              f"'{run_dir}' to resume from its newest complete one")
    pointer = run_dir / LATEST
    named = pointer.read_text().strip() if pointer.exists() else ""
    if named[len(TAG_PREFIX):].isdigit() and int(named[len(TAG_PREFIX):]) > int(load.name[len(TAG_PREFIX):]):
        warn(f"note: resuming from {load.name} as asked, though '{pointer}' names the later {named} (--load "
             f"{run_dir} resumes from there); new checkpoints go to {run_dir} and replace later ones as the run "
             f"reaches them: pass --save DIR to keep them")
    return run_dir, load.name, json.loads((load / META).read_text())


def _predates_manifests(folder: Path) -> bool:
    if (folder / MANIFEST).exists():
        return False
    try:
        return "checkpoint_format" not in json.loads((folder / META).read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _unusable(folder: Path) -> str | None:
    reason = incomplete_reason(folder)
    if reason is None:
        try:
            json.loads((folder / META).read_text())
        except (OSError, json.JSONDecodeError):
            return f"{META} is missing or not valid JSON"
    return reason


RUN_FILES = ("config.json", "metrics.jsonl", LATEST)
"""What a run directory holds besides its checkpoint folders."""


def check_save_dir(save: str | Path | None, load: str | Path | None) -> None:
    """Refuse, before anything is written, a --save directory that holds another run.

    Writing there would replace its config.json, move its `latest` and append to its
    metrics.jsonl. Saving into the directory being resumed (--load) is a continuation.
    """
    if save is None:
        return
    save = Path(save)
    if load is not None and save.resolve() == Path(load).resolve():
        return
    if save.exists() and not save.is_dir():
        raise CheckpointError(f"--save '{save}': exists and is not a directory")
    if not save.exists():
        return
    found = [name for name in RUN_FILES if (save / name).exists()]
    folders = checkpoint_folders(save)
    if folders:
        found.append(f"{len(folders)} checkpoint folder(s), newest {folders[0].name}")
        raise CheckpointError(f"--save '{save}' already holds another run ({', '.join(found)}); choose a new "
                              f"--save directory, or pass --load {save} to continue that run (nothing was written)")
    if found:  # a run that stopped before its first checkpoint: nothing to resume, but its files are there
        raise CheckpointError(f"--save '{save}' holds a run that saved no checkpoint ({', '.join(found)}); "
                              f"delete the directory to start again there, or choose a new --save directory "
                              f"(nothing was written)")


def keep_saved_padding(meta: dict, cfg: Config, where: str) -> tuple[Config, str | None]:
    """The config to resume `meta`'s checkpoint with, and a line for the log when it changed.

    The GPT-2-vocabulary presets pad their table to a multiple of 64 since a later version:
    a checkpoint saved before has its own row count, which it keeps unless the padding was
    asked for by a file or the command line (then check_compatible refuses the other shape).
    """
    import dataclasses
    saved = meta.get("config", {}).get("model", {}).get("pad_vocab_to_multiple", 1)
    m = cfg.model
    if not cfg.padding_from_preset or saved == m.pad_vocab_to_multiple:
        return cfg, None
    kept = dataclasses.replace(m, pad_vocab_to_multiple=saved)
    line = (f"note: checkpoint '{where}' has a table of {kept.padded_vocab_size:,} rows where "
            f"'{cfg.name}' now pads to {m.padded_vocab_size:,}: it keeps its {kept.padded_vocab_size:,} rows")
    return dataclasses.replace(cfg, model=kept, padding_from_preset=False), line


def check_compatible(meta: dict, cfg: Config, pipe_size: int, where: str) -> None:
    """Refuse, before any heavy work, a checkpoint of another model shape."""
    import dataclasses
    from gptx.config import ModelConfig
    # Keys added since the checkpoint was written had their default then; keys this version does
    # not know are left out, as before. Both sides are compared with their widths resolved, so a
    # default and the value it stands for are the same shape.
    written = meta.get("config", {}).get("model", {})
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    saved = dataclasses.asdict(ModelConfig(**{k: v for k, v in written.items() if k in known}).resolved())
    current = dataclasses.asdict(cfg.model.resolved())
    changed = [k for k in current if k != "dropout" and saved.get(k) != current[k]]
    if changed:
        diffs = "; ".join(f"{k} {saved.get(k)!r} (checkpoint) vs {current[k]!r} (now)" for k in changed)
        # --load takes the model from the checkpoint: a shape differs only when it was given again.
        raise CheckpointError(f"checkpoint '{where}' is of another model: {diffs}; leave {', '.join(changed)} out "
                              f"of --model/--set to resume with the checkpoint's (--load restores the model), "
                              f"or train a new run without --load for another shape")


def _shown(value) -> str:
    if value is None:
        return "default"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def config_changes(meta: dict, cfg: Config) -> list[str]:
    """'KEY OLD -> NEW' for each model or training key where `cfg` (the checkpoint's config with
    what was given again on top) differs from the checkpoint's, for the start-up log.

    Called after check_compatible, so the model keys left are those that keep the shape
    (dropout). Training keys added since the checkpoint compare with their defaults. A
    weights-only checkpoint (converted weights) starts a new run: its training keys are not
    the run's, so only its model counts.
    """
    import dataclasses
    from gptx.config import ModelConfig, TrainConfig
    saved = meta.get("config") or {}
    lines = []
    if saved.get("name") and saved["name"] != cfg.name and not meta.get("weights_only"):
        lines.append(f"model {saved['name']} -> {cfg.name}")
    written = saved.get("model") or {}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    old = dataclasses.asdict(ModelConfig(**{k: v for k, v in written.items() if k in known}).resolved())
    new = dataclasses.asdict(cfg.model.resolved())
    lines += [f"{k} {_shown(old[k])} -> {_shown(new[k])}" for k in new if k in written and old[k] != new[k]]
    if saved.get("train") is not None and not meta.get("weights_only"):
        for f in dataclasses.fields(TrainConfig):
            before, after = saved["train"].get(f.name, f.default), getattr(cfg.train, f.name)
            if before != after:
                lines.append(f"{f.name} {_shown(before)} -> {_shown(after)}")
    return lines


SCHEDULE_FLAGS = {"lr": "--lr", "min_lr": "--min-lr", "warmup_iters": "--warmup-iters",
                  "decay_iters": "--lr-decay-iters"}


def check_schedule(meta: dict, cfg: Config, where: str, override: bool) -> str | None:
    """Refuse, before any heavy work, a resume whose LR schedule differs from the checkpoint's.

    The schedule's step count resumes, its shape comes from the config: a changed shape
    (typically a larger train_iters, which lr_decay_iters follows by default) would make
    the LR jump at the resume. With `override` the new shape is used; returns the warning.
    """
    import dataclasses
    from gptx.schedule import schedule_of
    saved = meta.get("config", {}).get("train")
    if meta.get("weights_only") or not saved:
        return None  # converted weights: a new run, with its own schedule
    old, new = schedule_of(saved), schedule_of(dataclasses.asdict(cfg.train))
    changed = [k for k in old if old[k] != new[k]]
    if not changed:
        return None
    diffs = "; ".join(f"{k} {old[k]:g} (checkpoint) vs {new[k]:g} (now)" for k in changed)
    if override:
        return f"warning: the learning-rate schedule changes at this resume ({diffs}); --override-lr-schedule"
    why = " (lr_decay_iters defaults to train_iters)" if "decay_iters" in changed and not cfg.train.lr_decay_iters else ""
    keep = " ".join(f"{SCHEDULE_FLAGS[k]} {old[k]:g}" for k in changed)
    raise CheckpointError(f"checkpoint '{where}' was trained on another learning-rate schedule: {diffs}{why}; "
                          f"pass {keep} to keep the checkpoint's, or --override-lr-schedule to continue on the new "
                          f"one (the LR jumps at the resume)")


def load_weights_only(engine, load_dir: str | Path, tag: str) -> None:
    """Collective: this stage's layers from the layer files, for a checkpoint of another layout.

    Layer files are per position in the LayerSpec list, so any stage count reads them. The
    optimizer's own state is per stage and does not carry over: Adam's moments restart.
    """
    from gptx.sequential import DataParallelEngine, load_layer_states
    folder = Path(load_dir) / tag
    if isinstance(engine, DataParallelEngine):
        load_layer_states(engine, lambda idx: _read_layer_file(folder, idx))
        return
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


def _read_layer_file(folder: Path, idx: int) -> dict:
    file = layer_file(folder, idx)
    if not file.exists():
        raise CheckpointError(f"checkpoint '{folder}': missing {file.name}")
    return torch.load(file, map_location="cpu", weights_only=True)


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


def load_plain_model(path: str | Path, dtype: torch.dtype = torch.float32, master_weights: bool = False):
    """A training checkpoint (any stage count or precision) as the single-device GPT, plus its Config.

    Each pipeline position has one layer file whatever the layout; the tied head has none
    (it is the embedding), which the plain model shares by construction. With
    `master_weights`, a fp16/bf16 run's weights come from the optimizer's fp32 copies
    instead of the half-precision layer files (a fp32 run's layer files already are them).
    """
    from gptx.model import GPT
    folder = resolve_checkpoint(path)
    meta = json.loads((folder / META).read_text())
    cfg = config_from_meta(meta)
    model = GPT(cfg.model, seed=cfg.train.seed)
    masters = fp32_master_weights(folder, meta, cfg) if master_weights else None
    for name, module in model.layers.items():
        file = layer_file(folder, int(name))
        if not file.exists():
            raise CheckpointError(f"checkpoint '{folder}': missing {file.name}")
        state = torch.load(file, map_location="cpu", weights_only=True)
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
    from gptx.model import layer_specs
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


def _pipe_param_key(name: str) -> tuple[int, str]:
    """A stage module's parameter name -> (layer index, key in its layer file)."""
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
    states = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in files]
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for g in range(len(states[0]["single_partition_of_fp32_groups"])):
        base = 0
        for sd in states:
            part = sd["single_partition_of_fp32_groups"][g]
            for name, frag in sd["param_slice_mappings"][g].items():
                pieces.setdefault(name, []).append((base + frag.start, part[frag.start:frag.start + frag.numel]))
            base += part.numel()
    return {name: torch.cat([t for _, t in sorted(frags, key=lambda x: x[0])]) for name, frags in pieces.items()}


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


def fp32_master_weights(folder: Path, meta: dict, cfg: Config) -> dict[int, dict[str, torch.Tensor]] | None:
    """Layer index -> state dict from the optimizer's fp32 master copies, or None when the run was fp32.

    The tied embedding is taken from the first stage (its copies are kept equal).
    """
    from gptx.pipeline import layer_compute_weights, partition
    from gptx.model import layer_specs
    ds = meta.get("ds_config", {})
    if not (ds.get("fp16", {}).get("enabled") or ds.get("bf16", {}).get("enabled")):
        return None
    pp, dp = meta.get("pipe_parallel_size"), meta.get("data_parallel_size")
    if pp == 0 and dp:  # no pipeline: DeepSpeed's own consolidation reads its ZeRO shards
        from gptx.sequential import fp32_master_layers
        return fp32_master_layers(folder)
    if not pp or not dp:
        raise CheckpointError(f"checkpoint '{folder}' holds no optimizer state (weights only): no master weights")
    specs = layer_specs(cfg.model, cfg.train.seed)
    parts = partition(specs, cfg.train.partition_method, pp, layer_compute_weights(cfg, specs))
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for stage in range(pp):
        order = _stage_param_order(cfg, range(parts[stage], parts[stage + 1]))
        shapes = {(idx, key): shape for group in order for idx, key, shape in group}
        zero = sorted(folder.glob(f"*zero_pp_rank_*_mp_rank_{stage:02d}_optim_states.pt"))
        if zero:
            prefix = zero[0].name.split("zero_pp_rank_")[0]
            files = [folder / f"{prefix}zero_pp_rank_{d}_mp_rank_{stage:02d}_optim_states.pt" for d in range(dp)]
            masters = {_pipe_param_key(name): t for name, t in _zero_masters(files).items()}
        else:
            states = torch.load(folder / f"mp_rank_{stage:02d}_model_states.pt", map_location="cpu",
                                weights_only=False)
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
        atomic_write(layer_file(folder, idx), _torch_bytes({k: v.contiguous() for k, v in state.items()}))
    meta = {"config": cfg.to_dict(), "weights_only": True, "checkpoint_format": CHECKPOINT_FORMAT, "source": source,
            "pipe_parallel_size": None, "iteration": 0, "consumed_samples": 0, "tokens": 0, "lr_steps": 0,
            "code_version": code_version()}
    atomic_write(folder / META, (json.dumps(meta, indent=2) + "\n").encode())
    _write_manifest(folder)
    atomic_write(out / LATEST, tag.encode())
    return folder
