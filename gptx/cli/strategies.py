"""tools/strategies.py: one model under each memory strategy, each in its own launch."""
from __future__ import annotations

import argparse
import sys

from gptx.cli.common import (Parser, config_overrides, device_for, guarded, in_process_group, require_at_least,
                             tool_config)
from gptx.errors import ConfigError


def strategies_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tools/strategies.py",
               description="One model under each memory strategy (pipeline ZeRO-1, + optimizer offload, no pipeline "
                           "ZeRO-2, ZeRO-3, ZeRO-3 + offload; each with and without activation checkpointing), each "
                           "in its own launch: time per iteration, peak memory per rank and the partition report's "
                           "prediction side by side")
    p.add_argument("--model", default=None, help="preset name (default: tiny) or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model key")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="base JSON: precision, optimizer, clipping (default: cpu_fp32.json on CPU, gpu_fp16.json on GPU)")
    p.add_argument("--gpus", type=int, default=2, help="ranks per launch (default 2); the pipelines use that many stages")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per rank per micro-batch (default 2)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step without a pipeline (default 1)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations (default 3)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed iterations first, whose memory is counted (default 2: ZeRO-3 keeps layers "
                        "gathered from the second step on)")
    p.add_argument("--only", action="append", default=None,
                   help="run only the strategy of this exact name, as the table writes it (repeatable)")
    p.add_argument("--work", default="runs/strategies", help="where each launch writes (default runs/strategies)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    # Set by the driver for each launch.
    p.add_argument("--pipe-parallel-size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--activation-checkpoint-interval", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def run_strategies(argv: list[str] | None = None) -> int:
    def main():
        import json
        from pathlib import Path

        from gptx.config import load_config
        from gptx.parallel.ds_config import default_ds_config_path, read_ds_config
        args = strategies_parser().parse_args(argv)
        if args.worker_out:
            return _strategy_worker(args)
        require_at_least(args, 1, "gpus", "micro_batch", "accum", "iters", "warmup")
        from gptx.analysis.strategies import render_table, run_table, strategies
        names = [s.name for s in strategies(args.gpus)]
        for name in args.only or ():
            if name not in names:
                raise ConfigError(f"--only '{name}': no such strategy; the names are: " + "; ".join(names))
        cfg = load_config(args.model, config_overrides(args, ()))
        accelerator = device_for(None)
        ds = read_ds_config(args.deepspeed_config or default_ds_config_path(accelerator))
        model_args = (["--model", args.model] if args.model else []) + [f for kv in args.set for f in ("--set", kv)]
        rows = run_table(cfg, model_args, ds, args.gpus, args.micro_batch, args.accum, args.iters, args.warmup,
                         Path(args.work), args.only, log=lambda m: print(m, file=sys.stderr, flush=True))
        print(json.dumps(rows, indent=2) if args.json else render_table(rows, args.gpus))
        return 1 if any("error" in r for r in rows) else 0
    return guarded(main)


def _strategy_worker(args) -> int:
    from pathlib import Path

    from gptx.analysis.strategies import measure_strategy
    from gptx.parallel.ds_config import read_ds_config
    from gptx.parallel.host import accelerator_name, configure_host
    cfg, _ = tool_config(args, ("pipe_parallel_size", "activation_checkpoint_interval"), allow_no_pipeline=True)
    ds = read_ds_config(args.deepspeed_config)
    configure_host(accelerator_name())  # no model: the allocator returns freed memory, so RSS is what tensors need
    in_process_group(lambda: measure_strategy(cfg, ds, args.iters, args.warmup, Path(args.worker_out)))
    return 0


if __name__ == "__main__":  # each strategy's launch runs this module on every rank
    sys.exit(run_strategies())
