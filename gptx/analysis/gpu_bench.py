"""One command that turns a few minutes of a GPU into a complete, comparable speed table.

`gpu_bench()` runs in one process on one device. For each model group it builds every row
(gptx's engine with a set of speed levers, or the reference loop), warms each up, then times
them one iteration at a time in turn, starting one row further along each round, so that
drift in the device's clocks lands on every row alike. It writes
`docs/benchmarks/<date>-<device>.md` and a JSON beside it after every group, so a run cut
short still leaves what it measured; a later run of other groups on the same day and device
adds its rows to the same files (a device lease's calls are limited in time, so the groups
can be split over calls).

The levers, each measured on and off against the fastest setting:
  compile    torch.compile every decoder block (train.compile_blocks)
  pad        the table padded to a multiple of 64 rows (model.pad_vocab_to_multiple)
  fused      the head and the loss computed together in chunks (train.fused_loss)
  one_stage  one stage trained by DeepSpeed's plain engine with ZeRO-1 (pipe_parallel_size 0)
             instead of the pipeline engine's instruction schedule (pipe_parallel_size 1)

The reference is build-nanogpt's recipe in a plain loop: a compiled model, flash attention,
bf16 autocast, TF32, the vocabulary padded to 50,304, fused AdamW, the same micro-batch,
accumulation and batches. Its model is a nanoGPT-style model.py (`--reference PATH`), else
gptx's own layers as one module.

Peak memory of a row is what it holds between steps (measured when it is built) plus the most
its step allocates on top: what the row would peak at alone, though all rows share the device.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptx.analysis.benchmark import random_batches
from gptx.analysis.gpu_bench_report import render_markdown, write_report
from gptx.analysis.references import load_reference
from gptx.config import Config, load_config
from gptx.model.flops import flops_per_token, mfu, peak_flops
from gptx.model.gpt import GPT, lm_loss
from gptx.parallel import pipeline
from gptx.parallel.ds_config import DS_CONFIG_DIR, check_ds_config
from gptx.parallel.ds_config import precision as ds_precision
from gptx.parallel.ds_config import read_ds_config
from gptx.parallel.engine import build_engine, check_step, param_groups

LEVERS = ("compile", "pad", "fused", "one_stage")
GIB = 2 ** 30


@dataclass(frozen=True)
class Group:
    """One model and the rows measured on it side by side."""
    model: str
    micro_batch: int
    precisions: tuple[str, ...]
    ablations: bool
    """Every lever on and off (and no lever at all), plus the reference; else only the fastest setting."""
    overrides: dict = field(default_factory=dict)


def gpu_groups(precisions: tuple[str, ...]) -> list[Group]:
    """The GPU plan: GPT-2 small with every lever and the reference, then the larger models at
    their fastest. Micro-batches are the reference recipe's 16 x 1024 where it fits an 80 GB card."""
    bf16_only = tuple(p for p in precisions if p == "bf16") or precisions[:1]
    return [Group("gpt2", 16, precisions, True),
            Group("gpt2-medium", 16, bf16_only, False),
            Group("gpt2-xl", 8, bf16_only, False)]


def cpu_groups(precisions: tuple[str, ...]) -> list[Group]:
    """The same plan at shapes a CPU runs in seconds (GPT-2's vocabulary kept, so padding matters)."""
    tiny = dict(n_layer=2, n_head=2, n_embd=64, seq_len=32)
    return [Group("gpt2", 2, precisions, True, tiny),
            Group("gpt2-xl", 2, precisions[:1], False, dict(tiny, n_embd=32))]


def setting_name(levers: frozenset, measured: tuple[str, ...]) -> str:
    """Named against the levers this run measures: the others are off in every row."""
    if levers == frozenset(measured):
        return "all levers"
    if not levers:
        return "no levers"
    missing = [lever for lever in measured if lever not in levers]
    if len(missing) == 1:
        return f"all but {missing[0]}"
    return "+".join(lever for lever in LEVERS if lever in levers)


def lever_overrides(levers: frozenset) -> dict:
    return {"compile_blocks": "compile" in levers,
            "pad_vocab_to_multiple": 64 if "pad" in levers else 1,
            "fused_loss": "fused" in levers,
            "pipe_parallel_size": 0 if "one_stage" in levers else 1}


def ds_config_for(precision: str, micro_batch: int, pipe_size: int) -> dict:
    """The shipped JSON of this precision with the group's micro-batch. The plain engine needs
    ZeRO for 16-bit training (gptx/parallel/ds_config.py); stage 1 shards nothing on one GPU."""
    name = {"bf16": "gpu_bf16.json", "fp16": "gpu_fp16.json", "fp32": "cpu_fp32.json"}[precision]
    ds = read_ds_config(DS_CONFIG_DIR / name)
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    if pipe_size == 0 and precision != "fp32" and not (ds.get("zero_optimization") or {}).get("stage"):
        ds["zero_optimization"] = {"stage": 1}
    return ds


class Row:
    """One line of the table: how to build it, and what it measured."""

    def __init__(self, group: Group, precision: str, loop: str, levers: frozenset, available: tuple[str, ...]):
        self.group, self.precision, self.loop = group, precision, loop
        self.levers = levers & frozenset(available)
        self.setting = setting_name(self.levers, available) if loop == "gptx" else "build-nanogpt recipe"
        self.micro_batch = group.micro_batch
        self.step = self.owner = None  # owner: the engine or model, kept alive while the row runs
        self.static_bytes = self.transient_bytes = 0
        self.seconds: list[float] = []
        self.build_s = self.warm_step_s = 0.0  # how long the build took, and its last warm-up iteration
        self.losses: list[float] = []
        self.error: str | None = None
        self.cfg: Config | None = None
        self.grad_accum = 0

    def config(self, micro_batch: int) -> tuple[Config, dict]:
        overrides = dict(self.group.overrides, **lever_overrides(self.levers))
        if self.loop == "reference":
            overrides.update(pad_vocab_to_multiple=64, pipe_parallel_size=1, compile_blocks=False, fused_loss=False)
        cfg = load_config(self.group.model, overrides)
        ds = ds_config_for(self.precision, micro_batch, cfg.train.pipe_parallel_size)
        return cfg, ds


def build_engine_step(cfg: Config, ds: dict, accelerator: str, seed: int):
    check_ds_config(ds, 1, cfg.train.pipe_parallel_size, accelerator, "gpu_bench")
    engine = build_engine(cfg, ds)
    batches = random_batches(cfg, ds["train_micro_batch_size_per_gpu"], seed)

    def step() -> float:
        loss = float(engine.train_batch(batches))
        check_step(engine)  # what the fp16 workaround saw: a wrongly scaled loss fails the row
        return loss
    return step, engine


def build_reference_step(cfg: Config, ds: dict, device: torch.device, reference: str | None, compile_model: bool,
                         seed: int):
    """build-nanogpt's loop: bf16 autocast, micro-batches accumulated, clipping, fused AdamW,
    zero_grad(set_to_none=True), the loss read once per step."""
    gptx_model = GPT(cfg.model, seed=cfg.train.seed)
    if reference:
        model, loss_fn = load_reference(reference, cfg, gptx_model)
    else:
        model = gptx_model

        def loss_fn(x, y):
            return lm_loss(model(x), y)
    model.to(device)
    params = dict((ds.get("optimizer") or {}).get("params") or {})
    adamw = dict(betas=tuple(params.get("betas", (0.9, 0.95))), eps=params.get("eps", 1e-8))
    decay = params.get("weight_decay", 0.0)
    groups = [dict(g, weight_decay=g.get("weight_decay", decay)) for g in param_groups(model)]
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, fused=device.type == "cuda", **adamw)
    forward = torch.compile(loss_fn, backend=pipeline.COMPILE_BACKEND) if compile_model else loss_fn
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(ds_precision(ds))
    accum, clip = ds["gradient_accumulation_steps"], ds.get("gradient_clipping", 0.0)
    batches = random_batches(cfg, ds["train_micro_batch_size_per_gpu"], seed)

    def step() -> float:
        total = torch.zeros((), device=device)
        for _ in range(accum):
            x, y = (t.to(device, non_blocking=True) for t in next(batches))
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = forward(x, y) / accum
            loss.backward()
            total += loss.detach()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total)
    return step, model


class Device:
    """Synchronization and allocator statistics, or nothing of the latter on a CPU."""

    def __init__(self, accelerator: str):
        self.cuda = accelerator == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def allocated(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else 0

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else 0

    def release(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    @staticmethod
    def out_of_memory(e: BaseException) -> bool:
        return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)


@dataclass(frozen=True)
class BenchPlan:
    groups: list[Group]
    levers: tuple[str, ...] = LEVERS
    reference: str | None = None
    iters: int = 10
    warmup: int = 3
    deadline_s: float = 420.0
    """No group or timing round starts after this many seconds, and no row whose build and two
    timed rounds would end after it (time_to_build): a device lease's call is killed at its limit."""
    seed: int = 0


def drop(row: Row) -> None:
    """Let go of a row's engine or model, so the next rows and groups get its memory."""
    owner, row.step, row.owner = row.owner, None, None
    if hasattr(owner, "destroy"):  # a DeepSpeed engine: its buffers and hooks
        owner.destroy()


def failure(e: BaseException) -> str:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def build_row(row: Row, plan: BenchPlan, dev: Device, accelerator: str, log) -> None:
    """Build and warm up a row; on running out of memory, halve its micro-batch (twice at most)."""
    micro_batch, started = row.micro_batch, time.perf_counter()
    while True:
        before = dev.allocated()
        error = out_of_memory = None
        try:
            cfg, ds = row.config(micro_batch)
            row.cfg, row.grad_accum, row.micro_batch = cfg, ds["gradient_accumulation_steps"], micro_batch
            if row.loop == "gptx":
                row.step, row.owner = build_engine_step(cfg, ds, accelerator, plan.seed)
            else:
                row.step, row.owner = build_reference_step(cfg, ds, dev.device, plan.reference,
                                                           "compile" in plan.levers, plan.seed)
            for _ in range(plan.warmup):
                t0 = time.perf_counter()
                row.losses.append(row.step())
                dev.sync()
                row.warm_step_s = time.perf_counter() - t0
        except Exception as e:  # one row's failure must not cost the rest of a short lease
            error, out_of_memory = failure(e), dev.out_of_memory(e)
        if error is None:
            gc.collect()  # the allocator keeps its cache: the first timed round does not grow it again
            row.static_bytes = dev.allocated() - before
            row.build_s = time.perf_counter() - started
            return
        # Outside the except block: its traceback no longer holds the row's tensors.
        drop(row)
        row.losses.clear()
        dev.release()
        if out_of_memory and micro_batch > 1 and micro_batch * 4 > row.group.micro_batch:
            log(f"{row.group.model} {row.precision} {row.setting}: out of memory at micro-batch "
                f"{micro_batch}, trying {micro_batch // 2}")
            micro_batch //= 2
            continue
        row.error = error
        log(f"{row.group.model} {row.precision} {row.setting}: {row.error}")
        return


def time_to_build(rows: list[Row], row: Row, deadline: float) -> bool:
    """Whether `row` can still be built and every built row then timed twice (time_rows' least)
    before the deadline, judged by the longest build so far and each row's warm-up iteration."""
    built = [r for r in rows if r.step is not None]
    longest_build = max((r.build_s for r in built), default=0.0)
    longest_step = max((r.warm_step_s for r in built), default=0.0)
    two_rounds = 2 * (sum(r.warm_step_s for r in built) + longest_step)
    return time.perf_counter() + longest_build + two_rounds <= deadline


def time_rows(rows: list[Row], iters: int, dev: Device, log, after_round=lambda: None,
              deadline: float = float("inf")) -> None:
    """One iteration of each row in turn, starting one further along each round."""
    for i in range(iters):
        live = [r for r in rows if r.step is not None]
        if not live or (i >= 2 and time.perf_counter() > deadline):
            return
        for row in live[i % len(live):] + live[:i % len(live)]:
            error = None
            try:
                dev.sync()
                start_bytes = dev.allocated()
                dev.reset_peak()
                t0 = time.perf_counter()
                loss = row.step()
                dev.sync()
                row.seconds.append(time.perf_counter() - t0)
                row.losses.append(loss)
                row.transient_bytes = max(row.transient_bytes, dev.peak() - start_bytes)
            except Exception as e:
                error = failure(e)
            if error is not None:
                row.error = f"while timing: {error}"
                drop(row)
                dev.release()
                log(f"{row.group.model} {row.precision} {row.setting}: {row.error}")
        after_round()


def row_record(row: Row, peak: float | None, accelerator: str) -> dict:
    record = {"model": row.group.model, "precision": row.precision, "loop": row.loop, "setting": row.setting,
              "levers": sorted(row.levers) if row.loop == "gptx" else None, "micro_batch": row.micro_batch,
              "grad_accum": row.grad_accum, "tokens_per_sec": None, "mfu": None, "peak_memory_gib": None,
              "iteration_s": None, "losses": row.losses, "error": row.error}
    if row.seconds and row.cfg is not None:
        tokens = row.micro_batch * row.grad_accum * row.cfg.model.seq_len
        median = statistics.median(row.seconds)
        tps = tokens / median  # a hiccup of the host lands on one row: medians keep it out of the ratios
        record.update(tokens_per_sec=tps, iteration_s=median, mfu=mfu(tps, row.cfg.model, peak, 1),
                      seq_len=row.cfg.model.seq_len, flops_per_token=flops_per_token(row.cfg.model))
        if accelerator == "cuda":
            record["peak_memory_gib"] = (row.static_bytes + row.transient_bytes) / GIB
    return record


def group_rows(group: Group, levers: tuple[str, ...]) -> list[Row]:
    """The fastest setting in every precision. With ablations: in the first precision also each
    lever off in turn, in the others no lever at all, and in both; then the reference."""
    every = frozenset(levers)
    fastest = [Row(group, precision, "gptx", every, levers) for precision in group.precisions]
    if not group.ablations:
        return fastest
    # The reference right after the fastest row: rows past a deadline are not built, and the
    # comparison with the reference matters most. It runs in bf16, build-nanogpt's precision.
    first = group.precisions[0]
    reference = "bf16" if "bf16" in group.precisions else first
    rows = fastest[:1] + [Row(group, reference, "reference", frozenset(), levers)] + fastest[1:]
    rows += [Row(group, first, "gptx", every - {lever}, levers) for lever in levers]
    if len(levers) > 1:
        rows += [Row(group, precision, "gptx", frozenset(), levers) for precision in group.precisions]
    return rows


def gpu_bench(plan: BenchPlan, accelerator: str, out_dir: Path, command: str, log=print) -> Path:
    """Collective on a world of one. Returns the path of the markdown file written."""
    import deepspeed
    dev = Device(accelerator)
    if dev.cuda:  # build-nanogpt's setting; gptx's 16-bit training sets the first too (gptx/parallel/host.py)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device_name = torch.cuda.get_device_name() if dev.cuda else "cpu"
    peak = peak_flops(accelerator, "bf16")  # every row's MFU against the bf16 dense peak
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    stem = f"{date}-{re.sub(r'[^a-z0-9]+', '-', device_name.lower()).strip('-')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda,
              "deepspeed": deepspeed.__version__, "date": date, "command": command,
              "peak_flops": peak, "levers": list(plan.levers),
              "reference": f"build-nanogpt's recipe ({'compiled' if 'compile' in plan.levers else 'eager'}) with "
                           f"{plan.reference or 'gptx layers as one module'}",
              "iters": plan.iters, "warmup": plan.warmup, "rows": [], "skipped": []}
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    if json_path.exists():  # a later call on the same day and device adds its groups (a rerun replaces them)
        earlier = json.loads(json_path.read_text())
        ours = {g.model for g in plan.groups}
        report["rows"] = [r for r in earlier.get("rows", []) if r["model"] not in ours]
        report["command"] = f"{earlier.get('command')}; {command}"
    start = time.perf_counter()
    deadline = start + plan.deadline_s
    for group in plan.groups:
        if time.perf_counter() > deadline:
            report["skipped"].append(f"{group.model}: the {plan.deadline_s:.0f} s deadline had passed")
            log(report["skipped"][-1])
            continue
        rows = group_rows(group, plan.levers)
        log(f"{group.model}: building {len(rows)} rows")
        done = list(report["rows"])

        def save():  # after every build and round: a run killed at its time limit keeps what it did
            report["rows"] = done + [row_record(row, peak, accelerator) for row in rows]
            write_report(report, json_path, md_path)
        for row in rows:
            if not time_to_build(rows, row, deadline):
                row.error = f"not built: it would leave no time before the {plan.deadline_s:.0f} s deadline to time it"
                continue
            build_row(row, plan, dev, accelerator, log)
            save()
        time_rows(rows, plan.iters, dev, log, save, deadline=deadline)
        save()
        log(render_markdown(report))
        for row in rows:
            drop(row)
        dev.release()
        torch._dynamo.reset()  # the next model's blocks get graphs of their own shapes, not dynamic ones
    if not plan.groups or report["skipped"]:
        write_report(report, json_path, md_path)
    return md_path


def plan_from_args(accelerator: str, precisions: tuple[str, ...], levers: tuple[str, ...], models: tuple[str, ...],
                   **settings) -> BenchPlan:
    groups = (gpu_groups if accelerator == "cuda" else cpu_groups)(precisions)
    if models:
        groups = [g for g in groups if g.model in models]
    return dataclasses.replace(BenchPlan(groups=groups, levers=levers), **settings)
