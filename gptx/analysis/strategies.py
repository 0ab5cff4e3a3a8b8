"""One model under each memory strategy, side by side: time per iteration, measured peak memory
per rank, and the planner's prediction for the same layout (tools/strategies.py).

The strategies are the minGPT-DeepSpeed table's, in gptx's terms: the pipeline with ZeRO-1,
the same with the optimizer offloaded, no pipeline with ZeRO-2, ZeRO-3, and ZeRO-3 with
optimizer and parameter offload, each with and without activation checkpointing. Each runs
in its own launch of the real DeepSpeed launcher (`measure_strategy` on every rank), on
random tokens, so that one strategy's memory never counts in another's.

Memory is what the strategy adds, the peak of bytes allocated: on a GPU the allocator's
(torch.cuda.max_memory_allocated), on a CPU the profiler's count over the engine's build and
the warmup iterations (AllocatedPeak). Both count an empty buffer whole. The prediction to
compare it with is the partition report's device bytes for that layout, plus its host bytes
on a CPU, where the "device" and the host are the same memory. A CPU run also gives the
growth of its peak RSS over its RSS just before the engine is built, beside the prediction of
the tensors' resident bytes: an empty buffer's pages count only once written (touched_only).
What RSS holds beyond that is the process's own memory (libraries, DeepSpeed's communication
buffers, the profiler's records).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from gptx.analysis.benchmark import AllocatedPeak, current_rss, peak_memory, random_batches, sync_device
from gptx.analysis.partition_report import GiB
from gptx.analysis.planner import Layout, layout_ds_config, predict
from gptx.analysis.precision_check import release
from gptx.config import Config
from gptx.errors import ConfigError
from gptx.parallel.engine import build_engine, check_step
from gptx.parallel.host import return_freed_memory
from gptx.parallel.launching import deepspeed_launcher, free_port


@dataclass(frozen=True)
class Strategy:
    name: str
    pipe: int
    zero: int
    offload_optimizer: bool = False
    offload_param: bool = False
    checkpoint: int = 0


def strategies(pipe_stages: int) -> list[Strategy]:
    base = [Strategy("pipeline, ZeRO-1", pipe_stages, 1),
            Strategy("pipeline, ZeRO-1, optimizer offload", pipe_stages, 1, offload_optimizer=True),
            Strategy("no pipeline, ZeRO-2", 0, 2),
            Strategy("no pipeline, ZeRO-3", 0, 3),
            Strategy("no pipeline, ZeRO-3, optimizer + parameter offload", 0, 3, True, True)]
    return [s for b in base for s in (b, Strategy(b.name + ", checkpointing", b.pipe, b.zero, b.offload_optimizer,
                                                  b.offload_param, 1))]


def measure_strategy(cfg: Config, ds_config: dict, iters: int, warmup: int, out: Path) -> None:
    """On every rank, under the launcher: build the engine, train on random tokens, write this rank's numbers.

    On a CPU the engine's build and the warmup iterations run under AllocatedPeak, and freed
    memory goes back to the OS at once (return_freed_memory), so their peak RSS follows the
    live tensors rather than glibc's heap; the timed iterations run with blocks over 32 MiB
    mapped on their own, where glibc's own (dynamic) threshold ends up."""
    import contextlib

    from deepspeed.accelerator import get_accelerator

    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu and not return_freed_memory():
        raise ConfigError("tools/strategies.py measures resident memory on a CPU through glibc's mallopt, "
                          "which this system's C library lacks")
    before = current_rss()
    with AllocatedPeak() if on_cpu else contextlib.nullcontext() as allocated:
        engine = build_engine(cfg, ds_config)
        micro = ds_config["train_micro_batch_size_per_gpu"]
        batches = random_batches(cfg, micro, seed=cfg.train.seed + engine.grid.get_data_parallel_rank())
        for _ in range(warmup):
            engine.train_batch(batches)
            check_step(engine)
    sync_device(engine.device)
    record = {"rank": dist.get_rank(), "device": engine.device.type}
    if on_cpu:  # the peak is in the warmup (ZeRO-3 keeps layers gathered from its second step)
        record.update(allocated_bytes=allocated.bytes, rss_growth_bytes=peak_memory(engine.device)[1] - before)
        return_freed_memory(promptly=False)
    start = time.perf_counter()
    for _ in range(iters):
        loss = float(engine.train_batch(batches))
        check_step(engine)
    record.update(seconds_per_iteration=(time.perf_counter() - start) / iters, loss=loss)
    if not on_cpu:
        record["allocated_bytes"] = peak_memory(engine.device)[1]
    release(engine)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))


def strategy_ds_config(base: dict, strategy: Strategy, micro: int, accum: int) -> dict:
    layout = Layout(strategy.pipe, strategy.zero, strategy.offload_optimizer, strategy.offload_param,
                    strategy.checkpoint)
    return layout_ds_config(base, layout, micro, accum)


def predicted_bytes(cfg: Config, strategy: Strategy, ds: dict, world: int, on_cpu: bool,
                    touched_only: bool = False) -> int:
    """The partition report's largest rank: device bytes, plus host bytes where both are one memory."""
    layout = Layout(strategy.pipe, strategy.zero, strategy.offload_optimizer, strategy.offload_param,
                    strategy.checkpoint)
    dp = world // strategy.pipe if strategy.pipe else world
    pred = predict(cfg, layout, ds, ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], dp,
                   touched_only=touched_only)
    return pred["gpu_bytes"] + (pred["host_bytes_per_rank"] if on_cpu else 0)


def prepare_launch_folder(work: Path, folder: Path, ds: dict) -> Path:
    """Write a launch's DeepSpeed JSON into its folder and clear the rank records of an earlier launch
    there, which would otherwise be read as this one's (an earlier --gpus 2 leaves rank1.json behind
    a --gpus 1 launch). Returns the JSON's path."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        ds_path = folder / "ds.json"
        ds_path.write_text(json.dumps(ds, indent=2))
        out = folder / "out"
        if out.is_dir():
            for record in out.iterdir():
                if re.fullmatch(r"rank\d+\.json", record.name):  # only what measure_strategy writes
                    record.unlink()
    except OSError as e:
        raise ConfigError(f"--work '{work}': cannot write {folder} there ({e.strerror}); give --work a folder "
                          f"this process can write") from None
    return ds_path


def run_table(cfg: Config, model_args: list[str], base_ds: dict, world: int, micro: int, accum: int, iters: int,
              warmup: int, work: Path, only: list[str] | None = None, log=print) -> list[dict]:
    """Launch every strategy in turn (`world` ranks each); return one row per strategy.

    `model_args` are the --model/--set flags that give `cfg` to the workers."""
    import dataclasses
    launches = []
    for strategy in strategies(world):  # every folder ready before the first launch: a bad --work stops nothing
        if only and strategy.name not in only:
            continue
        # A pipeline gets world times the micro-batches on world times fewer replicas: same global batch.
        accum_here = accum * (strategy.pipe or 1)
        ds = strategy_ds_config(base_ds, strategy, micro, accum_here)
        folder = work / strategy.name.replace(", ", "_").replace(" ", "-").replace("+", "and")
        launches.append((strategy, ds, folder, prepare_launch_folder(work, folder, ds)))
    rows = []
    for strategy, ds, folder, ds_path in launches:
        args = [*model_args, "--pipe-parallel-size", str(strategy.pipe), "--activation-checkpoint-interval",
                str(strategy.checkpoint), "--deepspeed_config", str(ds_path), "--iters", str(iters),
                "--warmup", str(warmup), "--worker-out", str(folder / "out")]
        command = [deepspeed_launcher(), "--num_gpus", str(world), "--master_port", str(free_port()),
                   "--module", "gptx.cli.strategies", *args]
        log(f"{strategy.name}: launching {world} rank(s)")
        result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        ranks = sorted((folder / "out").glob("rank*.json"))
        if result.returncode != 0 or len(ranks) != world:
            tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
            rows.append({"strategy": strategy.name, "error": " / ".join(tail)})
            continue
        records = [json.loads(p.read_text()) for p in ranks]
        on_cpu = records[0]["device"] == "cpu"
        here = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, pipe_parallel_size=strategy.pipe,
                                                                  activation_checkpoint_interval=strategy.checkpoint))
        predicted = predicted_bytes(here, strategy, ds, world, on_cpu)
        measured = max(r["allocated_bytes"] for r in records)
        row = {"strategy": strategy.name, "seconds_per_iteration": max(r["seconds_per_iteration"] for r in records),
               "loss": records[0]["loss"], "device": records[0]["device"],
               "allocated_bytes": measured, "predicted_bytes": predicted,
               "prediction_error": (predicted - measured) / measured if measured else None}
        if on_cpu:
            row["rss_growth_bytes"] = max(r["rss_growth_bytes"] for r in records)
            row["predicted_resident_bytes"] = predicted_bytes(here, strategy, ds, world, on_cpu, touched_only=True)
        rows.append(row)
        log(f"{strategy.name}: {row['seconds_per_iteration']:.3f} s/iteration, allocated {measured / GiB:.3f} GiB "
            f"per rank (predicted {predicted / GiB:.3f})" + (
                f", peak RSS growth {row['rss_growth_bytes'] / GiB:.3f} GiB (resident tensors predicted "
                f"{row['predicted_resident_bytes'] / GiB:.3f})" if on_cpu else ""))
    return rows


def render_table(rows: list[dict], world: int) -> str:
    on_cpu = any(r.get("device") == "cpu" for r in rows)
    lines = [f"{world} rank(s); memory per rank: the peak of bytes allocated (GPU: torch.cuda.max_memory_allocated; "
             f"CPU: the profiler's allocation events), beside the partition report's prediction for that layout"
             + ("; and the growth of peak RSS over RSS before the engine, beside the tensors predicted to be "
                "resident (DeepSpeed's buckets as far as written)" if on_cpu else "") + "; GiB",
             f"  {'strategy':<66} {'s/iter':>8} {'allocated':>10} {'predicted':>10} {'error':>6}"
             + (f" {'RSS growth':>11} {'resident':>9} {'error':>6}" if on_cpu else "")]
    for r in rows:
        if "error" in r:
            lines.append(f"  {r['strategy']:<66} failed: {r['error']}")
            continue
        line = (f"  {r['strategy']:<66} {r['seconds_per_iteration']:>8.3f} {r['allocated_bytes'] / GiB:>10.3f} "
                f"{r['predicted_bytes'] / GiB:>10.3f} {_percent(r['prediction_error']):>6}")
        if "rss_growth_bytes" in r:
            rss, resident = r["rss_growth_bytes"], r["predicted_resident_bytes"]
            line += f" {rss / GiB:>11.3f} {resident / GiB:>9.3f} {_percent((resident - rss) / rss if rss > 0 else None):>6}"
        lines.append(line)
    return "\n".join(lines)


def _percent(error: float | None) -> str:
    return "n/a" if error is None else f"{100 * error:.0f}%"
