"""A checkpoint folder's files: their names, the manifest that says a folder is complete, and
reading them with damage as one line naming the file (gptx.training.checkpoint saves and loads).

A run directory holds one folder per checkpoint (`iter_0000200/`) and a `latest` file naming
the newest complete one. A folder is complete when its `manifest.json` lists every file with
its size. torch.save keeps a CRC-32 of every record, which torch.load does not check, so the
files are checked against them before they are read: a flipped bit inside a tensor's bytes is
one line naming the file, not a run that trains on from damaged weights.
"""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch

from gptx.atomic import atomic_write
from gptx.errors import CheckpointError

LATEST = "latest"
META = "gptx.json"
MANIFEST = "manifest.json"
CHECKPOINT_FORMAT = 2
"""2: folders are complete only with a manifest. Folders without the key predate manifests."""
TAG_PREFIX = "iter_"


def tag_for(iteration: int) -> str:
    return f"{TAG_PREFIX}{iteration:07d}"


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


def verify_archive(file: Path) -> None:
    """Check a torch.save archive's records against their CRC-32s (once per file as it is on disk);
    a CheckpointError naming the file for damage. Every file of a checkpoint is such an archive."""
    try:
        stat = file.stat()
        seen = (str(file), stat.st_size, stat.st_mtime_ns)
        if seen in VERIFIED:
            return
        if not zipfile.is_zipfile(file):
            raise ValueError("not a torch archive: its end is missing or overwritten")
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise damaged(file, e) from None
    if bad is not None:
        raise damaged(file, ValueError(f"its record {bad} fails its CRC-32 check"))
    VERIFIED.add(seen)


VERIFIED: set[tuple[str, int, int]] = set()
"""Files already checked (path, size, modification time): the optimizer's readers open some twice."""


def read_torch_file(file: Path, weights_only: bool = True, **kwargs):
    """torch.load on the host, a damaged file as one CheckpointError naming it."""
    verify_archive(file)
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


def layer_file(folder: Path, idx: int) -> Path:
    return folder / f"layer_{idx:02d}-model_states.pt"
