"""Save and load around DeepSpeed's checkpoints (gptx.training.resume: which one --load means and
whether this run may continue it; gptx.training.consolidate: a checkpoint as one plain model).

A run directory holds one folder per checkpoint (`iter_0000200/`, DeepSpeed's layer and
optimizer files plus ours) and a `latest` file naming the newest complete one. DeepSpeed
0.19 writes `latest` from rank 0 before the other ranks have finished, so gptx saves
without it (gptx/parallel/engine.py, defect 5) and moves the pointer itself, atomically, after a
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
import pickle
import random
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

LATEST = "latest"
META = "gptx.json"
MANIFEST = "manifest.json"
CHECKPOINT_FORMAT = 2
"""2: folders are complete only with a manifest. Folders without the key predate manifests."""
TAG_PREFIX = "iter_"


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
    if not isinstance(engine, DataParallelEngine):
        return
    states = layer_states(engine)
    if states is not None:
        for idx, state in states.items():
            atomic_write(layer_file(folder, idx), torch_bytes(state))


def write_manifest(folder: Path) -> None:
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.name != MANIFEST}
    atomic_write(folder / MANIFEST, (json.dumps(files, indent=1) + "\n").encode())


def incomplete_reason(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted, or None when it is complete."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return f"no {MANIFEST} (its writing never finished)"
    try:
        files = json.loads(manifest.read_text())
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        return f"{MANIFEST} cannot be read or is not valid JSON"
    if not isinstance(files, dict) or not all(isinstance(size, int) for size in files.values()):
        return f"{MANIFEST} is not a list of files and sizes"
    for name, size in files.items():
        path = folder / name
        if not path.exists():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def read_latest(run_dir: Path) -> str | None:
    """The folder name `latest` holds, or None when it is missing or unreadable (a damaged disk)."""
    try:
        return (run_dir / LATEST).read_text().strip() or None
    except (OSError, ValueError):
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
    newest = read_latest(run_dir)
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


def torch_bytes(obj) -> bytes:
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


UNREADABLE = (RuntimeError, OSError, EOFError, ValueError, IndexError, pickle.UnpicklingError)
"""What torch.load raises for a file whose bytes are damaged (its size can still match the manifest)."""


def damaged(where: Path, e: Exception) -> CheckpointError:
    why = (str(e) or type(e).__name__).splitlines()[0][:200]  # an empty file's EOFError has no words
    return CheckpointError(f"checkpoint '{where}': a file cannot be read ({why}); the disk "
                           f"or a copy damaged it: --load an earlier checkpoint folder of the run")


def read_torch_file(file: Path, weights_only: bool = True, **kwargs):
    """torch.load on the host, a damaged file as one CheckpointError naming it."""
    try:
        return torch.load(file, map_location="cpu", weights_only=weights_only, **kwargs)
    except UNREADABLE as e:
        raise damaged(file, e) from None


def read_layer_file(folder: Path, idx: int) -> dict:
    """One position's layer file of a checkpoint folder, on the host."""
    file = layer_file(folder, idx)
    if not file.exists():
        raise CheckpointError(f"checkpoint '{folder}': missing {file.name}")
    return read_torch_file(file)


def load(engine, load_dir: str | Path, tag: str) -> dict:
    """Collective: restore model, optimizer, LR schedule, loss scaler and this rank's RNG."""
    folder = Path(load_dir) / tag
    try:
        path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
    except (EOFError, pickle.UnpicklingError) as e:
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


def layer_file(folder: Path, idx: int) -> Path:
    return folder / f"layer_{idx:02d}-model_states.pt"


