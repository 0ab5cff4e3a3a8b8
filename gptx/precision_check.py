"""Precisions side by side: train the same model on the same batches under several DeepSpeed
configs (fp32, fp16, bf16) and record what each step did.

Used by tools/gpu_check.py on a GPU and by the tests on CPU (fp16 there with GPTX_CPU_FP16=1).
Every engine starts from the same seeded weights and reads the same samples, so any
difference between the traces comes from the precision and the optimizer's arithmetic.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field

import numpy as np
import torch.distributed as dist

from gptx.config import Config
from gptx.data import TokenWindows
from gptx.ds_config import check_ds_config
from gptx.engine import build_engine, loss_scale


@dataclass
class Trace:
    """Per iteration: loss, logged grad norm, loss scale (fp16), skipped steps so far, learning rate."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float | None] = field(default_factory=list)
    scales: list[float | None] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)

    def record(self, engine, loss: float) -> None:
        norm = engine.get_global_grad_norm()
        self.losses.append(loss)
        self.grad_norms.append(float(norm) if norm is not None else None)
        self.scales.append(loss_scale(engine))
        self.skipped.append(int(engine.skipped_steps))
        self.lrs.append(float(engine.get_lr()[0]))


def batches_for(engine, cfg: Config, ds_config: dict, tokens: np.ndarray, skip_batches: int = 0) -> TokenWindows:
    """The run's training samples after `skip_batches` global batches, for this rank, as launch/pretrain.py reads them."""
    grid = engine.grid
    layout = check_ds_config(ds_config, grid.get_data_parallel_world_size(), cfg.train.pipe_parallel_size,
                             "cuda")
    return TokenWindows(tokens, cfg.model.seq_len, layout.micro_batch, grid.get_data_parallel_rank(),
                        layout.dp_size, seed=cfg.train.seed, start_sample=skip_batches * layout.global_batch)


def train_trace(cfg: Config, ds_config: dict, tokens: np.ndarray, iters: int, before_step=None,
                skip_batches: int = 0) -> Trace:
    """Collective: build an engine for `ds_config`, train `iters` iterations, return what each did.

    `before_step(engine, iteration)` runs before each iteration (tests use it to inject an
    overflow). `skip_batches` starts that many global batches into the data.
    """
    engine = build_engine(cfg, ds_config)
    windows = batches_for(engine, cfg, ds_config, tokens, skip_batches)
    trace = Trace()
    for it in range(1, iters + 1):
        if before_step:
            before_step(engine, it)
        trace.record(engine, float(engine.train_batch(windows)))
    release(engine)
    return trace


def release(engine) -> None:
    """Let the next engine of the same process start clean (gradients, buffers, groups' tensors)."""
    dist.barrier()
    engine.destroy() if hasattr(engine, "destroy") else None
    del engine
    gc.collect()


def max_loss_diff(reference: Trace, other: Trace) -> float:
    return max(abs(a - b) for a, b in zip(reference.losses, other.losses))


def max_norm_rel_diff(reference: Trace, other: Trace) -> float:
    """Largest relative difference between logged grad norms, over the steps both applied."""
    pairs = [(a, b) for a, b in zip(reference.grad_norms, other.grad_norms) if a and b is not None]
    return max(abs(a - b) / a for a, b in pairs)
