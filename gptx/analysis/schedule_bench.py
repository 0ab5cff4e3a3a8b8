"""1F1B against ZB-H1 on the same pipeline, measured side by side in one process group.

For each number of micro-batches m, `compare_schedules()` builds the same model twice (same
seeds, same random batches), once per schedule, and times their iterations alternately, each
round starting with the other one, so that drift in the machine's speed hits both alike. An
iteration's time is the slowest rank's (every rank starts it together). Then, per schedule and
stage: the time in each pipeline instruction (idle is the time spent in send/recv, which holds
the wait for the neighbour), and the most bytes the step allocated (AllocatedPeak on a CPU,
torch's peak allocated on a GPU).

The speedup is the median, over rounds, of 1F1B's iteration time over ZB-H1's in the same round,
with a distribution-free 95% interval for that median: a machine whose speed drifts by more than
the schedules differ (a shared VM can) moves both iterations of a round alike, and the interval
says whether a run could tell the two apart. The theory beside each schedule is
`gptx.parallel.zero_bubble.step_time` with that schedule's own measured times per micro-batch
(means over stages): F and the whole backward under 1F1B, F, B and W under ZB-H1, so it carries
what splitting the backward costs (W run apart from its B reads its inputs again), plus the
optimizer and reduction time both schedules share.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time

import torch
import torch.distributed as dist

from gptx.analysis.benchmark import AllocatedPeak, instruction_breakdown, random_batches, sync_device
from gptx.analysis.precision_check import release
from gptx.config import Config
from gptx.parallel.ds_config import BatchLayout
from gptx.parallel.engine import build_engine, check_step
from gptx.parallel.zero_bubble import SCHEDULES, bubble_fraction, step_time, trace

SHARED = ("optimizer", "grad all-reduce")  # per step, the same work under either schedule


def compare_schedules(cfg: Config, ds_config: dict, layout: BatchLayout, micro_batches: list[int], iters: int,
                      warmup: int, breakdown_iters: int, seed: int = 0) -> dict | None:
    """Collective. Returns the report on global rank 0, None elsewhere."""
    results = []
    for m in micro_batches:
        ds = dict(ds_config, gradient_accumulation_steps=m, train_batch_size=layout.micro_batch * layout.dp_size * m)
        engines, steps = {}, {}
        for schedule in SCHEDULES:
            c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, pipeline_schedule=schedule))
            engine = engines[schedule] = build_engine(c, ds)
            steps[schedule] = _stepper(engine, random_batches(cfg, layout.micro_batch,
                                                              seed + engine.grid.get_data_parallel_rank()))
        device = _device(engines["1f1b"])
        for schedule in SCHEDULES:
            for _ in range(warmup):
                steps[schedule]()
        times, losses = {s: [] for s in SCHEDULES}, {s: [] for s in SCHEDULES}
        for i in range(iters):
            for schedule in (SCHEDULES if i % 2 == 0 else SCHEDULES[::-1]):
                dist.barrier()
                sync_device(device)
                start = time.perf_counter()
                losses[schedule].append(steps[schedule]())
                sync_device(device)
                times[schedule].append(time.perf_counter() - start)
        mine = {"stage": engines["1f1b"].stage_id, "dp_rank": engines["1f1b"].grid.get_data_parallel_rank(),
                "times": times, "losses": losses, "seconds": {}, "peak": {}}
        for schedule in SCHEDULES:
            mine["peak"][schedule] = _step_peak(steps[schedule], device)
            dist.barrier()  # the ranks start together: the idle time measured is the schedule's
            seconds, iteration = instruction_breakdown(engines[schedule], steps[schedule], breakdown_iters, device)
            mine["seconds"][schedule] = {**seconds, "iteration": iteration}
        for engine in engines.values():
            release(engine)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        results.append((m, gathered))
    if dist.get_rank() != 0:
        return None
    stages = cfg.train.pipe_parallel_size
    return {"model": cfg.name, "stages": stages, "data_parallel_size": layout.dp_size,
            "micro_batch": layout.micro_batch, "seq_len": cfg.model.seq_len, "iters": iters,
            "rows": [_row(m, gathered, stages) for m, gathered in results]}


def _stepper(engine, batches):
    def step() -> float:
        loss = float(engine.train_batch(batches))
        check_step(engine)
        return loss
    return step


def _device(engine) -> torch.device:
    return engine.device if isinstance(engine.device, torch.device) else torch.device(engine.device)


def _step_peak(step, device) -> int:
    """The most bytes one iteration allocated beyond what was held before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return torch.cuda.max_memory_allocated(device) - before
    with AllocatedPeak() as peak:
        step()
    return peak.bytes


def _row(m: int, gathered: list[dict], stages: int) -> dict:
    first = {s: min((g for g in gathered if g["stage"] == s), key=lambda g: g["dp_rank"]) for s in range(stages)}

    def per_micro_batch(schedule: str, key: str) -> float:
        return statistics.mean(first[s]["seconds"][schedule][key] for s in range(stages)) / m

    f, b, w = (per_micro_batch("zb-h1", k) for k in ("forward", "backward", "weight (W)"))
    f_1f1b, b_1f1b = per_micro_batch("1f1b", "forward"), per_micro_batch("1f1b", "backward")  # B with its W
    times = {"1f1b": (f_1f1b, b_1f1b, 0.0), "zb-h1": (f, b, w)}
    shared = statistics.mean(sum(first[s]["seconds"]["1f1b"][k] for k in SHARED) for s in range(stages))
    row = {"micro_batches": m, "f_s": f, "b_s": b, "w_s": w, "f_1f1b_s": f_1f1b, "backward_1f1b_s": b_1f1b,
           "shared_s": shared, "schedules": {}}
    slowest = {schedule: [max(g["times"][schedule][i] for g in gathered)
                          for i in range(len(gathered[0]["times"][schedule]))] for schedule in SCHEDULES}
    for schedule in SCHEDULES:
        row["schedules"][schedule] = {
            "step_s": statistics.median(slowest[schedule]),
            "theory_s": step_time(schedule, stages, m, *times[schedule]) + shared,
            "idle": [first[s]["seconds"][schedule]["send/recv"] / first[s]["seconds"][schedule]["iteration"]
                     for s in range(stages)],
            "theory_idle": bubble_fraction(schedule, stages, m, *times[schedule]),
            "peak_bytes": [max(g["peak"][schedule] for g in gathered if g["stage"] == s) for s in range(stages)],
            "losses": first[0]["losses"][schedule]}
    one, zero = row["schedules"]["1f1b"], row["schedules"]["zb-h1"]
    ratios = [a / z for a, z in zip(slowest["1f1b"], slowest["zb-h1"])]  # the two iterations of each round
    row["speedup"] = statistics.median(ratios)
    row["speedup_interval"] = median_interval(ratios)
    row["theory_speedup"] = one["theory_s"] / zero["theory_s"]
    return row


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A confidence interval for the median of independent samples from any distribution: the order
    statistics j and n + 1 - j (1-based) for the largest j whose interval misses the median with
    probability at most 1 - confidence, from the binomial count of samples below it. None when even
    the smallest and largest sample are not enough (fewer than 6 at 95%)."""
    n = len(values)
    miss = 0.0  # P(the interval's end j is above the median) = P(fewer than j samples below it)
    j = 0
    while j < n // 2 and 2 * (miss + math.comb(n, j) / 2 ** n) <= 1 - confidence:
        miss += math.comb(n, j) / 2 ** n
        j += 1
    if j < 1:
        return None
    ordered = sorted(values)
    return ordered[j - 1], ordered[n - j]


def render_text(r: dict, show_trace: bool = True) -> str:
    mib = 2 ** 20
    lines = [f"{r['model']}: {r['stages']} stage(s) x {r['data_parallel_size']} data-parallel, micro-batch "
             f"{r['micro_batch']} x {r['seq_len']} tokens; median of {r['iters']} alternated iterations, the "
             f"slowest rank's; theory: each schedule's own F, B and W (per micro-batch, mean of the stages) + "
             f"optimizer and reductions",
             "   m  schedule  step ms  theory ms  "
             + "  ".join(f"stage {s} idle (theory)  peak MiB" for s in range(r["stages"]))]
    for row in r["rows"]:
        for schedule, x in row["schedules"].items():
            cells = "  ".join(f"{100 * idle:5.1f}% ({100 * x['theory_idle']:4.1f}%)  {peak / mib:8.2f}"
                              for idle, peak in zip(x["idle"], x["peak_bytes"]))
            lines.append(f"{row['micro_batches']:4d}  {schedule:8s}  {x['step_s'] * 1e3:7.1f}  "
                         f"{x['theory_s'] * 1e3:9.1f}  {cells}")
        interval = row["speedup_interval"]
        within = (f", 95% interval {100 * (interval[0] - 1):+.1f}% to {100 * (interval[1] - 1):+.1f}%"
                  if interval else "")
        lines.append(f"      ZB-H1 against 1F1B: {100 * (row['speedup'] - 1):+.1f}% tokens/s (median of the "
                     f"rounds{within}; theory {100 * (row['theory_speedup'] - 1):+.1f}%)")
        lines.append(f"      per micro-batch: F {row['f_s'] * 1e3:.1f} ms, B {row['b_s'] * 1e3:.1f} ms, W "
                     f"{row['w_s'] * 1e3:.1f} ms under ZB-H1; F {row['f_1f1b_s'] * 1e3:.1f} ms, B + W "
                     f"{row['backward_1f1b_s'] * 1e3:.1f} ms under 1F1B")
    if show_trace and r["rows"]:
        row = r["rows"][min(1, len(r["rows"]) - 1)]
        unit = min(row["f_s"], row["b_s"], row["w_s"]) / 2  # halves, so unequal lengths round to their shape
        times = {"1f1b": (row["f_1f1b_s"], row["backward_1f1b_s"], 0.0), "zb-h1": (row["f_s"], row["b_s"], row["w_s"])}
        for schedule in SCHEDULES:
            lines.append(f"{schedule} at m = {row['micro_batches']}, from its measured times "
                         f"(one column per {1e3 * unit:.1f} ms):")
            lines.append(trace(schedule, r["stages"], row["micro_batches"], *times[schedule], unit=unit))
    return "\n".join(lines)
