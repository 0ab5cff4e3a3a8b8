"""metrics.jsonl (and wandb, when asked for) from rank 0, and the console line of each step."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist

from gptx.config import Config


class Metrics:
    """metrics.jsonl in the run directory, one JSON object per line, written by rank 0."""

    def __init__(self, run_dir: Path, cfg: Config):
        self.file = None
        self.wandb = None
        if dist.get_rank() != 0:
            return
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.train.wandb_project:
            import wandb
            has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _netrc_text()
            self.wandb = wandb.init(project=cfg.train.wandb_project, dir=str(run_dir), config=cfg.to_dict(),
                                    mode="online" if has_key else "offline", name=run_dir.name)

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
        if self.wandb:
            # Not the mixture line: a list of sources (wandb logs numbers, text and dicts of them).
            self.wandb.log({k: v for k, v in record.items() if k not in ("iter", "data") and v is not None},
                           step=record["iter"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.wandb:
            self.wandb.finish()


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
    parts.append(f"{r['tokens_per_sec']:,.0f} tok/s")
    if r["mfu"] is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    parts.append(f"{r['elapsed']:.0f} s")
    return " | ".join(parts)
