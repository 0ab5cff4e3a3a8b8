"""tools/benchmark.py: tokens/s, MFU, memory and per-stage time of the real engine on random tokens."""
from __future__ import annotations

import argparse
import sys

from gptx.cli.common import Parser, guarded, in_process_group, require_at_least, stdout_for_json, tool_config
from gptx.errors import ConfigError


def benchmark_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="tools/benchmark.py",
        description="Tokens/s, MFU, memory and per-stage time of the real engine on random tokens. One rank: "
                    "python tools/benchmark.py; a pipeline: deepspeed --num_gpus N tools/benchmark.py")
    p.add_argument("--model", default=None, help="preset name (default: tiny) or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON (default: ds_configs/cpu_fp32.json on CPU, gpu_fp16.json on GPU)")
    p.add_argument("--pipe-parallel-size", type=int, default=None, help="stages (default: as many as ranks)")
    p.add_argument("--partition-method", default=None)
    p.add_argument("--activation-checkpoint-interval", type=int, default=None)
    p.add_argument("--compile-blocks", action="store_const", const=True, default=None,
                   help="torch.compile each decoder block (in both loops)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--breakdown-iters", type=int, default=2, help="iterations with per-instruction timers")
    p.add_argument("--plain", action="store_true",
                   help="also time the same training in a plain PyTorch loop (one rank only)")
    p.add_argument("--reference", action="append", default=[], metavar="hf|PATH",
                   help="also time another project's model of this shape in the plain loop, from gptx's initial "
                        "weights: hf (transformers' GPT2LMHeadModel) or a nanoGPT-style model.py; repeatable "
                        "(one rank only)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def run_benchmark(argv: list[str] | None = None) -> int:
    out = sys.stdout

    def main():
        import json

        from gptx.analysis.benchmark import BenchSettings, benchmark, render_text
        from gptx.parallel.ds_config import check_ds_config, default_ds_config_path, precision, read_ds_config
        from gptx.parallel.host import accelerator_name, configure_host
        args = benchmark_parser().parse_args(argv)
        cfg, world = tool_config(args, ("pipe_parallel_size", "partition_method", "activation_checkpoint_interval",
                                         "compile_blocks"))
        pp = cfg.train.pipe_parallel_size
        # A warm-up step first: the engine's peak memory is read after it (with none, before any step).
        require_at_least(args, 1, "iters", "warmup", "breakdown_iters")
        if (args.plain or args.reference) and world != 1:
            raise ConfigError(f"--{'plain' if args.plain else 'reference'} compares with a single-process loop: "
                              f"run it as one rank (python tools/benchmark.py), not {world}")
        accelerator = accelerator_name()
        ds_path = args.deepspeed_config or str(default_ds_config_path(accelerator))
        ds = read_ds_config(ds_path)
        layout = check_ds_config(ds, world // pp, pp, accelerator, ds_path)
        configure_host(accelerator, cfg.model, layout.micro_batch, precision(ds))
        settings = BenchSettings(iters=args.iters, warmup=args.warmup, breakdown_iters=args.breakdown_iters,
                                 plain=args.plain, references=tuple(args.reference))
        if args.reference:  # a bad reference is one line before the engine is built, not after
            import torch

            from gptx.analysis.references import load_reference
            from gptx.model.gpt import GPT
            for reference in args.reference:
                with torch.device("meta"):
                    load_reference(reference, cfg, GPT(cfg.model, seed=0))

        def work():
            report = benchmark(cfg, ds, layout, settings, accelerator)
            if report is not None:
                print(json.dumps(report) if args.json else render_text(report), file=out, flush=True)
        in_process_group(work)
    with stdout_for_json(argv):
        return guarded(main)
