"""Precisions side by side: train the same model on the same batches under several DeepSpeed
configs (fp32, fp16, bf16) and record what each step did.

Used by tools/gpu_check.py on a GPU and by the tests on CPU (fp16 there with GPTX_CPU_FP16=1).
Every engine starts from the same seeded weights and reads the same samples, so any
difference between the traces comes from the precision and the optimizer's arithmetic.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from gptx.analysis.benchmark import peak_memory
from gptx.config import Config
from gptx.data.tokens import TokenWindows
from gptx.model.flops import mfu, peak_flops
from gptx.parallel.ds_config import check_ds_config, precision
from gptx.parallel.engine import build_engine, check_step, loss_scale


@dataclass
class Trace:
    """Per iteration: loss, logged grad norm, loss scale (fp16), skipped steps so far, learning rate."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float | None] = field(default_factory=list)
    scales: list[float | None] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def record(self, engine, loss: float, seconds: float = 0.0) -> None:
        norm = engine.get_global_grad_norm()
        self.losses.append(loss)
        self.grad_norms.append(float(norm) if norm is not None else None)
        self.scales.append(loss_scale(engine))
        self.skipped.append(int(engine.skipped_steps))
        self.lrs.append(float(engine.get_lr()[0]))
        self.seconds.append(seconds)


def batches_for(engine, cfg: Config, ds_config: dict, tokens: np.ndarray, skip_batches: int = 0) -> TokenWindows:
    """This rank's training samples after `skip_batches` global batches, as launch/pretrain.py reads them."""
    grid = engine.grid
    # Only the batch layout is wanted here ("cuda": the engine exists, its precision was accepted).
    layout = check_ds_config(ds_config, grid.get_data_parallel_world_size(), cfg.train.pipe_parallel_size,
                             "cuda")
    return TokenWindows(tokens, cfg.model.seq_len, layout.micro_batch, grid.get_data_parallel_rank(),
                        layout.dp_size, seed=cfg.train.seed, start_sample=skip_batches * layout.global_batch)


def train_trace(cfg: Config, ds_config: dict, tokens: np.ndarray, iters: int, before_step=None,
                skip_batches: int = 0, on_done=None) -> Trace:
    """Collective: build an engine for `ds_config`, train `iters` iterations, return what each did.

    `before_step(engine, iteration)` runs before each iteration (tests use it to inject an
    overflow). `skip_batches` starts that many global batches into the data. `on_done(engine)`
    runs after the last iteration, before the engine is released.
    """
    engine = build_engine(cfg, ds_config)
    windows = batches_for(engine, cfg, ds_config, tokens, skip_batches)
    trace = Trace()
    for it in range(1, iters + 1):
        if before_step:
            before_step(engine, it)
        start = time.perf_counter()
        loss = float(engine.train_batch(windows))  # a host copy: the step has finished
        check_step(engine)
        trace.record(engine, loss, time.perf_counter() - start)
    if on_done:
        on_done(engine)
    release(engine)
    return trace


def release(engine) -> None:
    """Let the next engine of the same process start clean (gradients, buffers, groups' tensors)."""
    dist.barrier()
    engine.destroy()
    del engine
    gc.collect()


def max_loss_diff(reference: Trace, other: Trace) -> float:
    return max(abs(a - b) for a, b in zip(reference.losses, other.losses))


def max_norm_rel_diff(reference: Trace, other: Trace) -> float:
    """Largest relative difference between logged grad norms, over the steps both applied."""
    pairs = [(a, b) for a, b in zip(reference.grad_norms, other.grad_norms) if a and b is not None]
    return max(abs(a - b) / a for a, b in pairs)


# --- the GPU check: fp32/TF32, fp16 and bf16 of one model on the same batches ------------------------

def flash_attention_available(cfg: Config, device, dtype) -> bool:
    """Whether torch's flash-attention kernel runs for this model's causal attention shape.

    gptx calls scaled_dot_product_attention with is_causal=True and no mask for plain and
    rotary attention; torch picks flash when this succeeds (ALiBi's additive mask cannot use it).
    """
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    m = cfg.model
    q = torch.randn(1, m.n_head, m.seq_len, m.head_dim, device=device, dtype=dtype)
    kv = torch.randn(1, m.kv_heads, m.seq_len, m.head_dim, device=device, dtype=dtype)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=m.kv_heads != m.n_head)
        return True
    except RuntimeError:
        return False


def peak_memory_per_stage(engine) -> list[int]:
    """Collective: each stage's largest peak (allocated on GPUs, resident set on CPUs), in bytes."""
    device = torch.device(engine.device)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (engine.stage_id, peak_memory(device)[1]))
    per_stage: dict[int, int] = {}
    for stage, peak in gathered:
        per_stage[stage] = max(per_stage.get(stage, 0), peak)
    return [per_stage[s] for s in sorted(per_stage)]


def gpu_check(cfg: Config, ds_configs: dict[str, dict], tokens: np.ndarray, iters: int, accelerator: str,
              log=print) -> dict:
    """Collective: train each config for `iters` iterations from the same weights and batches.

    The first config is the reference. Returns per config: the loss difference to the
    reference (largest, and mean over the last quarter), the logged grad norm's median
    relative difference, the final loss scale and skips, tokens/s, MFU and peak memory
    per stage, and whether flash attention runs for this shape in 16 bits.
    """
    reference_name = next(iter(ds_configs))
    report = {"model": cfg.name, "iters": iters, "accelerator": accelerator, "configs": {}}
    if accelerator == "cuda":
        report["device"] = torch.cuda.get_device_name()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        report["flash_attention"] = flash_attention_available(cfg, torch.device("cuda"), dtype)
    traces = {}
    for name, ds in ds_configs.items():
        if accelerator == "cuda":
            torch.cuda.reset_peak_memory_stats()
        memory = []
        log(f"{name}: {iters} iterations ({precision(ds)})")
        traces[name] = trace = train_trace(cfg, ds, tokens, iters,
                                           on_done=lambda e: memory.extend(peak_memory_per_stage(e)))
        layout = check_ds_config(ds, dist.get_world_size() // cfg.train.pipe_parallel_size,
                                 cfg.train.pipe_parallel_size, "cuda")
        timed = sorted(trace.seconds[min(5, iters - 1):])  # the first steps include warm-up
        step = timed[len(timed) // 2]
        tps = layout.global_batch * cfg.model.seq_len / step
        reference = traces[reference_name]
        tail = max(1, iters // 4)
        norms = sorted(abs(a - b) / a for a, b in zip(reference.grad_norms, trace.grad_norms)
                       if a and b is not None and b != float("inf"))
        report["configs"][name] = {
            "precision": precision(ds), "final_loss": trace.losses[-1],
            "max_loss_diff": max_loss_diff(reference, trace),
            "mean_loss_diff_last_quarter": sum(abs(a - b) for a, b in zip(reference.losses[-tail:],
                                                                          trace.losses[-tail:])) / tail,
            "grad_norm_median_rel_diff": norms[len(norms) // 2] if norms else None,
            "final_loss_scale": trace.scales[-1], "skipped_steps": trace.skipped[-1],
            "tokens_per_sec": tps,
            "mfu": mfu(tps, cfg.model, peak_flops(accelerator, precision(ds)), dist.get_world_size()),
            "peak_memory_per_stage_gib": [m / 2 ** 30 for m in memory],
            "losses": trace.losses, "loss_scales": trace.scales,
        }
    return report


def render_gpu_check(report: dict) -> str:
    lines = [f"{report['model']}, {report['iters']} iterations on the same batches, "
             f"{report.get('device', report['accelerator'])}"]
    if "flash_attention" in report:
        lines.append(f"flash attention for this shape: {'yes' if report['flash_attention'] else 'NO'}")
    lines.append(f"{'config':12s} {'final loss':>10s} {'max |dloss|':>11s} {'last 1/4':>9s} {'norm diff':>9s} "
                 f"{'scale':>8s} {'skips':>5s} {'tok/s':>9s} {'MFU':>6s}  peak memory per stage (GiB)")
    for name, r in report["configs"].items():
        scale = f"{r['final_loss_scale']:g}" if r["final_loss_scale"] else "-"
        norm = f"{100 * r['grad_norm_median_rel_diff']:.2f}%" if r["grad_norm_median_rel_diff"] is not None else "-"
        mfu_text = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        memory = " / ".join(f"{m:.2f}" for m in r["peak_memory_per_stage_gib"])
        lines.append(f"{name:12s} {r['final_loss']:10.4f} {r['max_loss_diff']:11.4f} "
                     f"{r['mean_loss_diff_last_quarter']:9.4f} {norm:>9s} {scale:>8s} {r['skipped_steps']:5d} "
                     f"{r['tokens_per_sec']:9,.0f} {mfu_text:>6s}  {memory}")
    if report["accelerator"] != "cuda":  # the resident set's high-water mark, which no config can reset
        lines.append("(on a CPU, peak memory is each process's largest resident set so far: it includes the "
                     "configs above)")
    return "\n".join(lines)
