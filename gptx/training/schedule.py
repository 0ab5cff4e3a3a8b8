"""GPT-3's schedules: the learning rate (linear warmup, cosine decay to a floor, then flat)
and the batch-size ramp.

DeepSpeed calls step() only after an optimizer step that was applied: an fp16 step skipped
for overflow does not advance the schedule, so the LR follows the updates actually made.
"""
from __future__ import annotations

import math

from gptx.errors import ConfigError


def schedule_of(train: dict) -> dict:
    """The schedule a training config (as a dict, e.g. from a checkpoint) resolves to, defaults filled in."""
    min_lr = train.get("min_lr")
    decay = train.get("lr_decay_iters") or train["train_iters"]
    # A run no longer than its warmup (lr_decay_iters defaults to train_iters) decays nowhere: any
    # decay_iters up to warmup_iters gives the same LRs (min_lr from the warmup's end), so one value.
    return {"lr": train["lr"], "min_lr": min_lr if min_lr is not None else train["lr"] / 10,
            "warmup_iters": train["warmup_iters"], "decay_iters": max(decay, train["warmup_iters"])}


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


class BatchRamp:
    """GPT-3's batch-size ramp, in Megatron-LM's terms: the global batch starts at `start`
    sequences and grows by `increment` every `samples / ((full - start) / increment)` samples
    consumed, reaching `full` (the DeepSpeed JSON's train_batch_size) after `samples`. A
    function of the samples consumed, so a resume continues on it exactly."""

    def __init__(self, start: int, increment: int, samples: int, full: int, stride: int):
        where = "train.rampup_batch_size"
        if not 0 < start < full:
            raise ConfigError(f"{where}: the start batch must be between 0 and the full batch {full} "
                              f"(the DeepSpeed JSON's train_batch_size), got {start}")
        for name, value in (("start", start), ("increment", increment)):
            if value % stride:
                raise ConfigError(f"{where}: the {name} {value} must be a multiple of micro-batch x data-parallel "
                                  f"size ({stride})")
        if increment < 1 or (full - start) % increment:
            raise ConfigError(f"{where}: full batch {full} - start {start} must be a multiple of the increment "
                              f"{increment}")
        if samples < 1:
            raise ConfigError(f"{where}: the ramp's samples must be positive, got {samples}")
        self.start, self.increment, self.samples, self.full = start, increment, samples, full
        self.steps = (full - start) // increment

    @classmethod
    def parse(cls, text: str, full: int, stride: int) -> "BatchRamp":
        try:
            start, increment, samples = (int(x) for x in text.replace(",", " ").split())
        except ValueError:
            raise ConfigError(f"train.rampup_batch_size: expected 'START,INCREMENT,SAMPLES' (three integers, in "
                              f"sequences), got {text!r}") from None
        return cls(start, increment, samples, full, stride)

    def size_at(self, consumed: int) -> int:
        grown = min(self.steps, consumed * self.steps // self.samples)
        return self.start + grown * self.increment

    def samples_over(self, iterations: int, consumed: int = 0) -> int:
        """Samples consumed after `iterations` more optimizer steps from `consumed`."""
        for _ in range(iterations):
            consumed += self.size_at(consumed)
        return consumed


class SeqLenWarmup:
    """GPT*'s sequence-length warmup: 'ITER:LEN,ITER:LEN,...', training from optimizer step ITER
    (0-based) on windows of LEN tokens, cut from the start of each full-length sample, until
    the next entry. The first entry starts at 0; the last holds to the end."""

    def __init__(self, stages: list[tuple[int, int]]):
        self.stages = stages

    @classmethod
    def parse(cls, text: str, seq_len: int) -> "SeqLenWarmup":
        where = "train.seq_len_warmup"
        try:
            stages = [(int(a), int(b)) for a, b in (item.split(":") for item in text.replace(" ", "").split(","))]
        except ValueError:
            raise ConfigError(f"{where}: expected 'ITER:LEN,ITER:LEN,...' (e.g. 0:128,3750:256,7500:{seq_len}), "
                              f"got {text!r}") from None
        if stages[0][0] != 0 or any(b[0] <= a[0] for a, b in zip(stages, stages[1:])):
            raise ConfigError(f"{where}: the iterations must start at 0 and increase, got {text!r}")
        bad = [length for _, length in stages if not 1 <= length <= seq_len]
        if bad:
            raise ConfigError(f"{where}: length {bad[0]} is outside 1..{seq_len} (model.seq_len, the longest)")
        return cls(stages)

    def length_at(self, step: int) -> int:
        length = self.stages[0][1]
        for start, stage_length in self.stages:
            if step >= start:
                length = stage_length
        return length
