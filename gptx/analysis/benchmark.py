"""Throughput of the real engine, where its time goes, and the same training in a plain loop.

`benchmark()` runs on every rank (under the launcher, or alone as one rank). It trains a
model on random tokens through DeepSpeed's pipeline engine and reports tokens/s, MFU,
peak memory per stage and a per-stage time breakdown next to the schedule's theoretical
bubble. With `plain=True` (one rank only) it also trains the same layers with a plain
PyTorch loop, and with `references` other projects' models of the same shape in that loop
(gptx.analysis.references), same optimizer settings, batches and thread count, alternating one
iteration of each so that drift in the machine's speed hits all alike.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import dataclass
from functools import partial
from types import MethodType

import torch
import torch.distributed as dist

from gptx.analysis.references import load_reference
from gptx.config import Config
from gptx.model.flops import flops_per_token, mfu, peak_flops
from gptx.model.fused_loss import FusedLMLoss, hidden_and_head_weight, linear_cross_entropy
from gptx.model.gpt import GPT, lm_loss
from gptx.model.layers import vocab_logits
from gptx.parallel.ds_config import BatchLayout, precision
from gptx.parallel.engine import build_engine, check_step, param_groups
from gptx.parallel.pipeline import compile_blocks
from gptx.parallel.zero_bubble import bubble_fraction

# Where each pipeline instruction's time is booked. Receives block until the peer has
# sent, so "send/recv" holds the waiting too: that is where the bubble shows up.
CATEGORIES = {
    "ForwardPass": "forward", "BackwardPass": "backward", "OptimizerStep": "optimizer",
    "ReduceGrads": "grad all-reduce", "ReduceTiedGrads": "grad all-reduce", "LoadMicroBatch": "load batch",
    "SendActivation": "send/recv", "RecvActivation": "send/recv", "SendGrad": "send/recv",
    "RecvGrad": "send/recv", "WeightPass": "weight (W)",
}


@dataclass(frozen=True)
class BenchSettings:
    iters: int = 10
    """Timed iterations (optimizer steps) per loop."""
    warmup: int = 2
    """Untimed iterations first (allocator, caches, lazy initialization)."""
    breakdown_iters: int = 2
    """Iterations with per-instruction timers, run after the timed ones."""
    plain: bool = False
    """Also time the plain PyTorch loop (one rank only)."""
    references: tuple[str, ...] = ()
    """Also time other projects' models in the plain loop: "hf", or a nanoGPT-style model.py path."""


def random_batches(cfg: Config, micro_batch: int, seed: int):
    """Endless (inputs, labels) micro-batches of random token ids, the same sequence for every caller."""
    gen = torch.Generator().manual_seed(seed)
    T, V = cfg.model.seq_len, cfg.model.vocab_size
    while True:
        tokens = torch.randint(0, V, (micro_batch, T + 1), generator=gen)
        yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # as a data loader's windows are


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> tuple[str, int]:
    if device.type == "cuda":
        return "peak allocated", torch.cuda.max_memory_allocated(device)
    return "peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class AllocatedPeak:
    """The most bytes that CPU tensors allocated inside the block held at once: on a CPU, what
    torch.cuda.max_memory_allocated is on a GPU. An empty tensor counts whole, pages never
    written included, as on a GPU. Tensors from before the block do not count (the profiler
    reports no frees of blocks it did not see allocated).

        with AllocatedPeak() as peak:
            ...
        peak.bytes
    """

    bytes = 0

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        from torch._C._autograd import DeviceType
        self._profile.__exit__(*exc)
        # Each allocation and each free is a "[memory]" event with its signed size.
        events = sorted((e.start_ns(), e.nbytes()) for e in self._profile.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
        live = 0
        for _, change in events:
            live += change
            self.bytes = max(self.bytes, live)
        return False


def head_loss_peak(batch: int, seq_len: int, n_embd: int, vocab_rows: int, fused: bool, rows: int | None = None,
                   seed: int = 0) -> int:
    """Peak bytes (AllocatedPeak) of the head and the loss alone, forward and backward, fp32, on
    random hidden states: the logits path unfused (vocab_logits, lm_loss) or gptx.model.fused_loss
    with `rows` positions per chunk. The hidden states and the table are allocated before and do
    not count; their gradients do."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, n_embd, generator=gen).requires_grad_()
    weight = (torch.randn(vocab_rows, n_embd, generator=gen) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab_rows, (batch, seq_len), generator=gen)
    with AllocatedPeak() as peak:
        if fused:
            loss = linear_cross_entropy(x, weight, labels, rows=rows)
        else:
            loss = lm_loss(vocab_logits(x, weight, vocab_rows), labels)
        loss.backward()
    return peak.bytes


def current_rss() -> int:
    """This process's resident memory now (Linux), else its peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class InstructionTimer:
    """Wraps the engine's pipeline instructions to add up their wall time per category."""

    def __init__(self, engine):
        self.engine = engine
        self.totals = {c: 0.0 for c in sorted(set(CATEGORIES.values()))}
        self.original = engine._INSTRUCTION_MAP
        engine._INSTRUCTION_MAP = {cls: self._timed(fn, CATEGORIES[cls.__name__])
                                   for cls, fn in self.original.items()}

    def _timed(self, fn, category):
        device = self.engine.device
        totals = self.totals

        def timed(engine, **kwargs):
            sync_device(device)
            start = time.perf_counter()
            MethodType(fn, engine)(**kwargs)
            sync_device(device)
            totals[category] += time.perf_counter() - start
        return timed

    def remove(self) -> None:
        self.engine._INSTRUCTION_MAP = self.original


def plain_optimizer(model: torch.nn.Module, ds_config: dict, lr: float) -> torch.optim.Optimizer:
    """torch AdamW with the DeepSpeed config's settings, as its `torch_adam` path builds it."""
    params = dict(ds_config.get("optimizer", {}).get("params", {}))
    params.pop("torch_adam", None)
    params.pop("adam_w_mode", None)
    return torch.optim.AdamW(param_groups(model), lr=lr, **params)


class PlainLoop:
    """A model trained like the engine trains gptx's: micro-batches, gradient accumulation,
    clipping, AdamW with the DeepSpeed JSON's settings, the engine's precision via autocast,
    and the same batches. `loss_fn(x, y)` is the model's mean next-token loss.

    Gradients are kept between steps (zeroed in place) on CPUs and freed on GPUs: on a CPU a
    fresh allocation every step pays its page faults (docs/performance.md), and freeing is
    PyTorch's default, which spares a GPU a memset per step."""

    def __init__(self, model: torch.nn.Module, loss_fn, cfg: Config, ds_config: dict, layout: BatchLayout,
                 device: torch.device, seed: int):
        self.model, self.loss_fn = model, loss_fn
        self.optimizer = plain_optimizer(self.model, ds_config, cfg.train.lr)
        self.clip = ds_config.get("gradient_clipping", 0.0)
        self.accum = layout.grad_accum
        self.device = device
        self.batches = random_batches(cfg, layout.micro_batch, seed)
        prec = precision(ds_config)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)
        self.scaler = torch.amp.GradScaler(device.type) if prec == "fp16" else None
        self.free_grads = device.type == "cuda"

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for _ in range(self.accum):
            x, y = (t.to(self.device) for t in next(self.batches))
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                loss = self.loss_fn(x, y) / self.accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=self.free_grads)
        return float(total)


def plain_loop(cfg: Config, ds_config: dict, layout: BatchLayout, device: torch.device, seed: int) -> PlainLoop:
    """gptx's own layers as one module, in the plain loop."""
    model = GPT(cfg.model, seed=cfg.train.seed).to(device)
    if cfg.train.compile_blocks:
        compile_blocks(model.layers.values())
    loss_fn = fused_loss_fn(model) if cfg.train.fused_loss else (lambda x, y: lm_loss(model(x), y))
    return PlainLoop(model, loss_fn, cfg, ds_config, layout, device, seed)


def fused_loss_fn(model: GPT):
    """`loss_fn(x, y)` of `model` with train.fused_loss: its layers up to the head, then the head
    and the loss together over chunks of positions (gptx.model.fused_loss)."""
    fns = [*model._forward_fns[:-1], partial(hidden_and_head_weight, model.head())]
    loss = FusedLMLoss(model.cfg.vocab_size)

    def loss_fn(x, y):
        for fn in fns:
            x = fn(x)
        return loss(x, y)
    return loss_fn


def reference_loop(reference: str, cfg: Config, ds_config: dict, layout: BatchLayout, device: torch.device,
                   seed: int) -> PlainLoop:
    """Another project's GPT of the same shape, starting from gptx's initial weights, in the plain
    loop: `hf` (transformers' GPT2LMHeadModel) or the path of a nanoGPT-style model.py."""
    model, loss_fn = load_reference(reference, cfg, GPT(cfg.model, seed=cfg.train.seed))
    return PlainLoop(model.to(device), loss_fn, cfg, ds_config, layout, device, seed)


def benchmark(cfg: Config, ds_config: dict, layout: BatchLayout, settings: BenchSettings, accelerator: str,
              seed: int = 0) -> dict | None:
    """Collective. Returns the report on global rank 0, None elsewhere."""

    # On a CPU, RSS includes the interpreter and torch's libraries (more with a CUDA build of
    # torch than with the CPU wheel: docs/performance.md): the growth from here is the training's own.
    before_engine = current_rss() if accelerator == "cpu" else 0
    engine = build_engine(cfg, ds_config)
    device = engine.device if isinstance(engine.device, torch.device) else torch.device(engine.device)
    batches = random_batches(cfg, layout.micro_batch, seed + engine.grid.get_data_parallel_rank())

    def engine_step() -> float:
        loss = float(engine.train_batch(batches))
        check_step(engine)  # what the fp16 workaround saw: a wrongly scaled loss stops here, not timed
        return loss

    warmup_lrs = []
    for _ in range(settings.warmup):
        warmup_lrs.append(engine.get_lr()[0])
        engine_step()
    memory_kind, memory = peak_memory(device)  # before any plain model exists in this process

    loops: dict[str, PlainLoop] = {}
    if settings.plain:
        loops["plain"] = plain_loop(cfg, ds_config, layout, device, seed)
    for reference in settings.references:
        loops[reference] = reference_loop(reference, cfg, ds_config, layout, device, seed)
    for loop in loops.values():
        for lr in warmup_lrs:  # the engine's schedule, so every loop stays on the same trajectory
            loop.step(lr)
    runs = timed_rounds(engine, engine_step, loops, settings.iters, device)
    step_times, iteration = instruction_breakdown(engine, engine_step, settings.breakdown_iters, device)

    mine = {"stage": engine.stage_id, "dp_rank": engine.grid.get_data_parallel_rank(), "memory": memory,
            "memory_before_engine": before_engine, "times": step_times, "iteration": iteration}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() != 0:
        return None
    report = {"model": cfg.name, "seq_len": cfg.model.seq_len, "accelerator": accelerator,
              "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "memory_kind": memory_kind, "stages": stage_rows(gathered, engine.num_stages)}
    return add_speeds(report, cfg, ds_config, layout, settings, engine.num_stages, runs)


Run = tuple[list[float], list[float]]
"""(seconds of each timed iteration, its loss)"""


def timed_rounds(engine, engine_step, loops: dict[str, PlainLoop], iters: int, device) -> dict[str, Run]:
    """`iters` rounds of one iteration of the engine and of each loop, all at the engine's LR."""
    runs: dict[str, Run] = {name: ([], []) for name in ["engine", *loops]}
    # One iteration of each in turn, so that drift in the machine's speed hits all alike, starting
    # one further along each round: on a CPU the loop that runs right after another model's
    # iteration is slower (its memory is cold), so no loop may always come second.
    names = list(runs)
    for i in range(iters):
        lr = engine.get_lr()[0]
        for name in names[i % len(names):] + names[:i % len(names)]:
            sync_device(device)
            t0 = time.perf_counter()
            loss = engine_step() if name == "engine" else loops[name].step(lr)
            sync_device(device)
            runs[name][0].append(time.perf_counter() - t0)
            runs[name][1].append(loss)
    return runs


def instruction_breakdown(engine, engine_step, iters: int, device) -> tuple[dict[str, float], float]:
    """Seconds per iteration in each pipeline instruction, and the whole iteration, over `iters` steps."""
    timer = InstructionTimer(engine)
    sync_device(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        engine_step()
    sync_device(device)
    wall = time.perf_counter() - t0
    timer.remove()
    return {k: v / max(iters, 1) for k, v in timer.totals.items()}, wall / max(iters, 1)


def stage_rows(gathered: list[dict], stages: int) -> list[dict]:
    """Each stage's peak memory (its largest replica) and its first replica's time breakdown."""
    rows = []
    for s in range(stages):
        ranks = [g for g in gathered if g["stage"] == s]
        first = min(ranks, key=lambda g: g["dp_rank"])
        other = first["iteration"] - sum(first["times"].values())
        rows.append({"stage": s, "memory_bytes": max(g["memory"] for g in ranks),
                     "memory_growth_bytes": max(g["memory"] - g["memory_before_engine"] for g in ranks),
                     "iteration_s": first["iteration"], "seconds": {**first["times"], "other": max(other, 0.0)}})
    return rows


def add_speeds(report: dict, cfg: Config, ds_config: dict, layout: BatchLayout, settings: BenchSettings, pp: int,
               runs: dict[str, Run]) -> dict:
    """The batch layout, and tokens/s and MFU of the engine and of each loop beside it."""
    prec = precision(ds_config)
    peak = peak_flops(report["accelerator"], prec)
    tokens_per_iter = layout.global_batch * cfg.model.seq_len

    def speed(name: str, devices: int) -> dict:
        times, losses = runs[name]
        # From the median iteration, as iteration_s and the engine/plain ratio: one hiccup can double an iteration.
        tps = tokens_per_iter / statistics.median(times)
        return {"tokens_per_sec": tps, "iteration_s": statistics.median(times),
                "mfu": mfu(tps, cfg.model, peak, devices), "losses": losses}

    report.update({
        "precision": prec, "pipe_parallel_size": pp, "data_parallel_size": layout.dp_size,
        "micro_batch": layout.micro_batch, "grad_accum": layout.grad_accum, "global_batch": layout.global_batch,
        "threads_per_rank": torch.get_num_threads(), "iters": settings.iters, "warmup": settings.warmup,
        "flops_per_token": flops_per_token(cfg.model), "peak_flops_per_device": peak,
        "peak_source": "datasheet" if report["accelerator"] == "cuda" else "measured fp32 matmul",
        "engine": speed("engine", dist.get_world_size()),
        "pipeline_schedule": cfg.train.pipeline_schedule,
        "theoretical_bubble": bubble_fraction(cfg.train.pipeline_schedule, pp, layout.grad_accum)})
    engine_median = report["engine"]["iteration_s"]
    for name in runs:
        if name == "engine":
            continue
        entry = speed(name, 1)
        if name == "plain":
            report["plain"] = entry
            # Medians: a hiccup of the host lands on whichever loop was running and would move a
            # ratio of sums by itself (on a busy host one iteration can take twice as long as the rest).
            report["engine_over_plain_time"] = engine_median / entry["iteration_s"]
        else:
            report.setdefault("references", {})[name] = {**entry, "engine_speedup": entry["iteration_s"] / engine_median}
    return report


def render_text(r: dict) -> str:
    gib = 2 ** 30
    lines = [f"{r['model']}: {r['pipe_parallel_size']} stage(s) x {r['data_parallel_size']} data-parallel, "
             f"{r['precision']}, {r['device_name']}, {r['threads_per_rank']} thread(s)/rank; batch "
             f"{r['micro_batch']} x {r['grad_accum']} micro-batches x {r['data_parallel_size']} = "
             f"{r['global_batch']} x {r['seq_len']} tokens; {r['iters']} timed iterations after {r['warmup']}",
             f"model FLOPs/token {r['flops_per_token'] / 1e9:.3f} G; peak/device "
             + (f"{r['peak_flops_per_device'] / 1e12:.3f} TFLOP/s ({r['peak_source']})"
                if r["peak_flops_per_device"] else "unknown (no MFU)")]

    def loop_line(name, x):
        mfu_text = f", MFU {100 * x['mfu']:.1f}%" if x["mfu"] is not None else ""
        return f"{name}: {x['tokens_per_sec']:,.0f} tokens/s, {x['iteration_s'] * 1e3:.1f} ms/iteration{mfu_text}"
    lines.append(loop_line("engine", r["engine"]))
    if "plain" in r:
        lines.append(loop_line("plain PyTorch loop", r["plain"]))
        lines.append(f"engine time / plain time: {r['engine_over_plain_time']:.3f}")
    for name, x in r.get("references", {}).items():
        lines.append(loop_line(f"reference {name} (plain loop)", x) + f"; engine {x['engine_speedup']:.3f}x its speed")
    lines.append(f"per stage ({r['memory_kind']}; seconds per iteration from the instruction timers; "
                 f"theoretical bubble of the {r['pipeline_schedule']} schedule with F, B and W equally long = "
                 f"{100 * r['theoretical_bubble']:.1f}%):")
    for s in r["stages"]:
        parts = ", ".join(f"{k} {v * 1e3:.1f} ms ({100 * v / s['iteration_s']:.0f}%)"
                          for k, v in s["seconds"].items() if v > 0)
        growth = (f" ({s['memory_growth_bytes'] / gib:.2f} GiB above the process before the engine)"
                  if s["memory_growth_bytes"] != s["memory_bytes"] else "")
        lines.append(f"  stage {s['stage']}: {s['memory_bytes'] / gib:.2f} GiB{growth}; {s['iteration_s'] * 1e3:.1f} ms: "
                     f"{parts}")
    return "\n".join(lines)
