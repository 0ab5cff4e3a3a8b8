"""GPT-3's learning-rate schedule: linear warmup, cosine decay to a floor, then flat.

DeepSpeed calls step() only after an optimizer step that was applied: an fp16 step skipped
for overflow does not advance the schedule, so the LR follows the updates actually made.
"""
from __future__ import annotations

import math


def schedule_of(train: dict) -> dict:
    """The schedule a training config (as a dict, e.g. from a checkpoint) resolves to, defaults filled in."""
    min_lr = train.get("min_lr")
    return {"lr": train["lr"], "min_lr": min_lr if min_lr is not None else train["lr"] / 10,
            "warmup_iters": train["warmup_iters"], "decay_iters": train.get("lr_decay_iters") or train["train_iters"]}


def lr_at(step: int, lr: float, min_lr: float, warmup_iters: int, decay_iters: int) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    if step < warmup_iters:
        return lr * (step + 1) / (warmup_iters + 1)
    if step >= decay_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


class WarmupCosine:
    """Sets every param group's lr to lr_at(steps taken); checkpointed through DeepSpeed."""

    def __init__(self, optimizer, lr: float, min_lr: float, warmup_iters: int, decay_iters: int):
        self.optimizer = optimizer
        self.lr, self.min_lr = lr, min_lr
        self.warmup_iters, self.decay_iters = warmup_iters, decay_iters
        self.steps = 0
        self._apply()

    def _apply(self) -> None:
        value = lr_at(self.steps, self.lr, self.min_lr, self.warmup_iters, self.decay_iters)
        for group in self.optimizer.param_groups:
            group["lr"] = value
        self.last_lr = [value] * len(self.optimizer.param_groups)

    def step(self, *args, **kwargs) -> None:
        self.steps += 1
        self._apply()

    def get_lr(self) -> list[float]:
        return self.last_lr

    get_last_lr = get_lr

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self._apply()
