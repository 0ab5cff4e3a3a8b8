"""metrics.jsonl (and wandb, when asked for) from rank 0, and the console line of each step."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch.distributed as dist

from gptx.config import Config


def log(msg: str) -> None:
    """Console output, from global rank 0 only (before torch.distributed starts too)."""
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            print(msg, flush=True)
        except BrokenPipeError:
            # The reader went away (Ctrl-C also ends a `| tee`): the run goes on to its checkpoint;
            # what it prints from here on is dropped, also by DeepSpeed and Python at exit.
            drop_console_output()


class Metrics:
    """metrics.jsonl in the run directory, one JSON object per line, written by rank 0."""

    def __init__(self, run_dir: Path, cfg: Config):
        self.file = None
        self.wandb = None
        if dist.get_rank() != 0:
            return
        self.path = run_dir / "metrics.jsonl"
        drop_cut_last_line(self.path)
        self.file = open(self.path, "a", buffering=1)
        if cfg.train.wandb_project:
            import wandb

            # WANDB_MODE, when set, is the user's choice (offline on an air-gapped node, a self-hosted
            # server's key in .netrc); otherwise online only where a key for wandb.ai is found.
            has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _netrc_text()
            mode = None if os.environ.get("WANDB_MODE") else "online" if has_key else "offline"
            self.wandb = wandb.init(project=cfg.train.wandb_project, dir=str(run_dir), config=cfg.to_dict(),
                                    mode=mode, name=run_dir.name)

    def write(self, record: dict) -> None:
        if self.file:
            try:
                self.file.write(json.dumps(finite_or_null(record), allow_nan=False) + "\n")
            except OSError as e:
                # Metrics are a record, not the run: a full or vanished disk stops the file, not training
                # (the next checkpoint save says in one line whether it can be written).
                self.file = None
                print(f"warning: could not write {self.path}: {e.strerror or e}; the rest of this run's metrics "
                      f"go to the console only", flush=True)
        if self.wandb:
            # Not the mixture line: a list of sources (wandb logs numbers, text and dicts of them).
            self.wandb.log({k: v for k, v in record.items() if k not in ("iter", "data") and v is not None},
                           step=record["iter"])

    def close(self) -> None:
        if self.file:
            try:
                self.file.close()
            except OSError:
                pass  # already said by write, or nothing left to flush that could be written
        if self.wandb:
            self.wandb.finish()


def drop_console_output(stderr_too: bool = True) -> None:
    """Send stdout to /dev/null, and stderr too when it went to the same pipe or file (2>&1)."""
    out = sys.stdout.fileno()
    fds = [out]
    try:
        err = sys.stderr.fileno()
        same = os.fstat(out)[1:3] == os.fstat(err)[1:3]  # (inode, device)
        fds += [err] if stderr_too and same and err != out else []
    except (AttributeError, OSError, ValueError):  # a stderr that is no file
        pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in fds:
        os.dup2(devnull, fd)
    os.close(devnull)


def finite_or_null(value):
    """A record as strict JSON: NaN and infinities (a skipped step's grad norm, a diverged loss)
    become null, which every JSON reader takes; Python's NaN and Infinity tokens are not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_null(v) for v in value]
    return value


def drop_cut_last_line(path: Path) -> None:
    """Remove a last line without its newline (a run killed, or its disk full, mid-write): the
    next record would be glued onto it, making one line no JSON reader takes."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - (1 << 20))  # a record is far shorter than this
            f.seek(start)
            tail = f.read()
            if not tail or tail.endswith(b"\n"):
                return
            cut = tail.rfind(b"\n")
            if cut >= 0 or start == 0:
                f.truncate(start + cut + 1)
    except FileNotFoundError:
        return


def _netrc_text() -> str:
    try:
        return (Path.home() / ".netrc").read_text()
    except OSError:
        return ""


def console_line(r: dict) -> str:
    parts = [f"iter {r['iter']:6d}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.3e}"]
    if r["grad_norm"] is not None:
        parts.append(f"grad norm {r['grad_norm']:.3f}")
    if r["loss_scale"] is not None:
        parts.append(f"loss scale {r['loss_scale']:.0f} (skipped {r['skipped_steps']})")
    elif r.get("skipped_steps"):  # bf16 skips a step whose gradients are not finite
        parts.append(f"skipped {r['skipped_steps']}")
    parts.append(f"{r['tokens_per_sec']:,.0f} tok/s")
    if r["mfu"] is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    parts.append(f"{r['elapsed']:.0f} s")
    if r.get("eta_s") is not None:
        parts.append(f"ETA {duration(r['eta_s'])}")
    return " | ".join(parts)


def duration(seconds: float) -> str:
    """A length of time as a person reads it: 45 s, 12 min, 3 h 05 min, 9 d 4 h."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


class RunClock:
    """The time left in a run at its current pace.

    The pace is wall time per iteration since the end of the first iteration this process ran (which holds
    the compile and warm-up), so evaluations and saves are counted at their share. No estimate before
    `settle` iterations have been timed.
    """

    def __init__(self, last_iteration: int, settle: int = 3):
        self.last = last_iteration
        self.settle = settle
        self.start: tuple[int, float] | None = None  # (iteration, time) at the end of the first step

    def eta(self, iteration: int, now: float) -> float | None:
        if self.start is None:
            self.start = (iteration, now)
            return None
        done = iteration - self.start[0]
        if done < self.settle:
            return None
        return (now - self.start[1]) / done * (self.last - iteration)

    def first_estimate(self, iteration: int) -> bool:
        """True at the one iteration where the estimate for the whole run is printed."""
        return self.start is not None and iteration - self.start[0] == self.settle
