"""Save and load around DeepSpeed's checkpoints (gptx.training.checkpoint_files: the folder's files;
gptx.training.resume: which one --load means and whether this run may continue it;
gptx.training.consolidate: a checkpoint as one plain model).

A run directory holds one folder per checkpoint (`iter_0000200/`, DeepSpeed's layer and
optimizer files plus ours) and a `latest` file naming the newest complete one. DeepSpeed
0.19 writes `latest` from rank 0 before the other ranks have finished, so gptx saves
without it (gptx/parallel/engine.py, defect 5) and moves the pointer itself, atomically, after a
barrier.

Ours in each folder: `gptx.json` (resolved config, DeepSpeed JSON, layout, code version,
progress), `rng_rank_XXXXX.pt` (each rank's RNG states, for dropout) and, written last,
once every rank has finished and the files are flushed, `manifest.json` (every file and
its size). A folder without a manifest that matches its files is incomplete and is never
loaded: `--load` falls back to the newest complete one. A run resumed from an earlier
checkpoint writes the later folders again: the complete one it replaces is kept aside
(`iter_N.replaced`) until the new one is complete, and put back when the save fails.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from gptx import testing
from gptx.atomic import atomic_write
from gptx.errors import CheckpointError
from gptx.parallel.data_parallel import DataParallelEngine, layer_states
from gptx.parallel.engine import save_checkpoint
from gptx.training.checkpoint_files import (CHECKPOINT_FORMAT, LATEST, MANIFEST, META, checkpoint_folders, damaged,
                                            incomplete_reason, layer_file, read_latest, read_torch_file, tag_for,
                                            torch_bytes, verify_archive, write_manifest)

REPLACED = ".replaced"
"""The suffix of a complete folder kept aside while the run writes its iteration again."""


def code_version() -> str:
    """The git commit of the code that ran (with '-dirty' for uncommitted changes), if known."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("-dirty" if dirty else "")) if commit else "unknown"


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
        buf = torch_bytes(_rng_state())
        atomic_write(folder / f"rng_rank_{rank:05d}.pt", buf)
        if rank == 0:
            body = {**meta, **progress, "checkpoint_format": CHECKPOINT_FORMAT}
            atomic_write(folder / META, (json.dumps(body, indent=2) + "\n").encode())
    except Exception as e:  # noqa: BLE001 -- sorted by write_error_code
        error = error or e
    testing.fault_point("save", progress["iteration"], folder)
    _agree_or_raise(*write_error_code(error, folder), run_dir, folder, tag, needed)
    code, unexpected = 0, None
    if rank == 0:
        try:
            _fsync_tree(folder)
            write_manifest(folder)
            atomic_write(run_dir / LATEST, tag.encode())
            shutil.rmtree(aside_of(folder), ignore_errors=True)
        except Exception as e:  # noqa: BLE001
            try:
                (folder / MANIFEST).unlink(missing_ok=True)
            except OSError:
                pass  # the folder is removed below, or stays without a trusted manifest
            code, unexpected = write_error_code(e, folder)
    _agree_or_raise(code, unexpected, run_dir, folder, tag, needed)  # also the barrier before `latest` is read
    if rank == 0:
        space.previous = _tree_bytes(folder)
    return folder


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written; every rank raises it, rank 0 prints it."""


# How torch's zip writer reports a full disk, by where the space runs out: inside a record, or
# while it writes the archive's end (its ofstream's exception, with no path or errno).
TORCH_WRITE_FAILED = ("unexpected pos", "file write failed", "PytorchStreamWriter failed",
                      "basic_ios::clear")


def write_error_code(error: Exception | None, where: Path) -> tuple[int, Exception | None]:
    """(errno, None) for a write error, (0, None) for none. Any other error is a bug, not a full
    disk: (EIO, the error), so that the other ranks still fail the save with this one instead of
    waiting for it, and this rank raises it with its traceback. torch's zip writer reports a
    full disk without an errno ("unexpected pos")."""
    import errno
    if error is None:
        return 0, None
    if isinstance(error, OSError) and error.errno:
        return error.errno, None
    if isinstance(error, RuntimeError) and any(t in str(error) for t in TORCH_WRITE_FAILED):
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
    if remove:  # first: the free space then says what a retry would have
        shutil.rmtree(folder, ignore_errors=True)
    aside = aside_of(folder)
    if aside.exists() and not folder.exists():
        try:
            aside.rename(folder)  # the complete checkpoint this save was to replace
        except OSError:
            pass  # named below
    reason = os.strerror(code)
    if code == errno.ENOSPC:
        free = _free_bytes(run_dir)
        reason += (f" ({needed:,} bytes needed, {free:,} free)" if needed else f" ({free:,} bytes free)")
    elif code == errno.ENOENT:
        reason += " (the directory was deleted while the run was writing to it)"
    partial = (f"; the partial folder {folder.name} has no {MANIFEST} and is never loaded"
               if folder.exists() and not (folder / MANIFEST).exists() else "")
    if aside.exists():
        partial += f"; the complete {folder.name} it was to replace is kept as {aside.name}"
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
    try:
        _set_aside(folder)
    except OSError as e:
        return e.errno or errno.EIO, None
    free = _free_bytes(run_dir)
    if space.previous is not None:
        return (errno.ENOSPC if free < space.previous else 0), space.previous
    if estimate and free < estimate and not space.warned:
        space.warned = True
        print(f"warning: checkpoint {folder.name} needs about {estimate:,} bytes (parameters x bytes per "
              f"parameter), {run_dir} has {free:,} free: the save will likely fail", flush=True)
    return 0, estimate


def aside_of(folder: Path) -> Path:
    return folder.with_name(folder.name + REPLACED)


def _set_aside(folder: Path) -> None:
    """Rank 0, before writing a folder that exists: a complete one (a run resumed from an earlier
    checkpoint reaching this iteration again) is renamed aside until the new one is complete; an
    incomplete one (a save that stopped halfway) is deleted, with no stale file left to load."""
    aside = aside_of(folder)
    if not folder.exists():
        return
    if incomplete_reason(folder) is None:
        if aside.exists():  # left by a save that completed without removing it
            shutil.rmtree(aside)
        folder.rename(aside)
    else:
        shutil.rmtree(folder)


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
    if not isinstance(engine, DataParallelEngine):
        return
    states = layer_states(engine)
    if states is not None:
        for idx, state in states.items():
            atomic_write(layer_file(folder, idx), torch_bytes(state))


def prune(run_dir: Path, keep: int) -> tuple[list[Path], list[str]]:
    """Rank 0, after `latest` moved: delete all but the newest `keep` complete checkpoints.
    Returns (the folders removed, a warning for each that could not be: the run goes on).

    Incomplete folders older than the newest complete one go too (a crash's leftovers);
    nothing newer than `latest` is touched.
    """
    newest = read_latest(run_dir)
    kept, removed, failed = 0, [], []
    for folder in checkpoint_folders(run_dir):
        if kept == 0 and folder.name != newest:
            continue  # newer than latest: not ours to judge
        if kept < keep and incomplete_reason(folder) is None:
            kept += 1
            continue
        try:
            shutil.rmtree(folder)
        except OSError as e:
            failed.append(f"warning: could not remove the old checkpoint {folder} ({e.strerror or e}); training "
                          f"goes on, remove it by hand")
            continue
        removed.append(folder)
    return removed, failed


def verify_folder(folder: Path) -> None:
    """Collective, before anything of a checkpoint is read: the ranks check its archives against
    their CRC-32s, each rank a share of them. A rank that finds a damaged file prints its own line
    naming it; every rank stops."""
    rank, world = dist.get_rank(), dist.get_world_size()
    _on_every_rank_or_none(lambda: [verify_archive(f) for f in sorted(folder.glob("*.pt"))[rank::world]], folder)


def load(engine, load_dir: str | Path, tag: str) -> dict:
    """Collective: restore model, optimizer, LR schedule, loss scaler and this rank's RNG (after verify_folder)."""
    return _on_every_rank_or_none(lambda: _load_this_rank(engine, Path(load_dir), tag), Path(load_dir) / tag)


def _load_this_rank(engine, load_dir: Path, tag: str) -> dict:
    folder = load_dir / tag
    try:
        path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
    except FileNotFoundError:
        raise  # past the manifest's check: a file this layout wants that the checkpoint's does not write
    except (EOFError, OSError, pickle.UnpicklingError) as e:  # OSError: DeepSpeed's reader of a layer file
        raise damaged(folder, e) from None
    except RuntimeError as e:  # torch.load's own words for a damaged archive; any other error is not the file's
        if "PytorchStreamReader" not in str(e):
            raise
        raise damaged(folder, e) from None
    if path is None:
        raise CheckpointError(f"checkpoint '{folder}': DeepSpeed could not load it")
    rng_file = folder / f"rng_rank_{dist.get_rank():05d}.pt"
    if rng_file.exists():
        _set_rng_state(read_torch_file(rng_file, weights_only=False))
    return client_state


def _on_every_rank_or_none(step, folder: Path):
    """Collective: step() on every rank. Where it raises a CheckpointError on any rank, every rank
    stops: those that saw it print their own line (only rank 0 prints otherwise), the others say
    another rank did, instead of going on into a collective that the failed rank never joins."""
    error, result = None, None
    try:
        result = step()
    except CheckpointError as e:
        error = e
    failed = torch.tensor([int(error is not None)], dtype=torch.int64)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        error.every_rank = True
        raise error
    if int(failed.item()):
        raise CheckpointError(f"checkpoint '{folder}': another rank could not read its part (its line names the file)")
    return result
