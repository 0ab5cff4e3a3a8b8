"""tools/schedule_bench.py: 1F1B against ZB-H1 on the same pipeline, side by side, against the theory."""
from __future__ import annotations

import argparse
import sys

from gptx.cli.common import Parser, guarded, in_process_group, require_at_least, stdout_for_json, tool_config
from gptx.errors import ConfigError


def schedule_bench_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tools/schedule_bench.py",
               description="Step time, idle time per stage and peak memory per stage of the 1f1b and zb-h1 "
                           "pipeline schedules, alternated on the same model and batches, beside the theory. "
                           "Run with one rank per stage: deepspeed --num_gpus 2 tools/schedule_bench.py")
    p.add_argument("--model", default=None, help="preset name (default: tiny) or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON (default: ds_configs/cpu_fp32.json on CPU, gpu_fp16.json on GPU); "
                        "its gradient_accumulation_steps is replaced by each --micro-batches value")
    p.add_argument("--pipe-parallel-size", type=int, default=None, help="stages (default: as many as ranks)")
    p.add_argument("--partition-method", default=None)
    p.add_argument("--micro-batches", default="2,4,8", help="numbers of micro-batches per step, comma-separated")
    p.add_argument("--iters", type=int, default=10,
                   help="timed rounds (one iteration of each schedule) per micro-batch count; 6 or more give "
                        "the speedup a 95%% interval")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations of each first")
    p.add_argument("--breakdown-iters", type=int, default=2, help="iterations with per-instruction timers")
    p.add_argument("--no-trace", action="store_true", help="leave out the timelines")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def micro_batch_counts(text: str) -> list[int]:
    parts = text.replace(",", " ").split()
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--micro-batches: expected positive integers separated by commas, got {text!r}")
    return [int(p) for p in parts]


def run_schedule_bench(argv: list[str] | None = None) -> int:
    out = sys.stdout

    def main():
        import json

        from gptx.analysis.schedule_bench import compare_schedules, render_text
        from gptx.parallel.ds_config import check_ds_config, default_ds_config_path, precision, read_ds_config
        from gptx.parallel.host import accelerator_name, configure_host
        args = schedule_bench_parser().parse_args(argv)
        cfg, world = tool_config(args, ("pipe_parallel_size", "partition_method"))
        counts = micro_batch_counts(args.micro_batches)
        require_at_least(args, 1, "iters", "breakdown_iters")
        require_at_least(args, 0, "warmup")
        accelerator = accelerator_name()
        ds_path = args.deepspeed_config or str(default_ds_config_path(accelerator))
        ds = read_ds_config(ds_path)
        pp = cfg.train.pipe_parallel_size
        layout = check_ds_config(ds, world // pp, pp, accelerator, ds_path)
        configure_host(accelerator, cfg.model, layout.micro_batch, precision(ds))

        def work():
            report = compare_schedules(cfg, ds, layout, counts, args.iters, args.warmup, args.breakdown_iters)
            if report is not None:
                print(json.dumps(report) if args.json else render_text(report, not args.no_trace), file=out,
                      flush=True)
        in_process_group(work)
    with stdout_for_json(argv):
        return guarded(main)
