"""tools/reference_run.py: another project's model trained the way nanoGPT's train.py does, for speed."""
from __future__ import annotations

import argparse
import sys

from gptx.cli.common import Parser, config_overrides, guarded, require_at_least, stdout_for_json
from gptx.errors import ConfigError


def reference_run_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tools/reference_run.py",
               description="Train transformers' GPT2LMHeadModel or a nanoGPT-style model.py of a gptx model's shape "
                           "the way nanoGPT's train.py does (one process, fp32, no compile) and print its tokens/s: "
                           "the reference side of a separate-process comparison with launch/pretrain.py")
    p.add_argument("reference", metavar="hf|PATH",
                   help="hf (transformers' GPT2LMHeadModel) or the path of a nanoGPT-style model.py "
                        "(GPTConfig; GPT(config)(idx, targets))")
    p.add_argument("--model", default=None, help="gptx preset name (default: tiny) or a YAML file, for the shape")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model key")
    p.add_argument("--data", default=None, help="prepared data directory (default: the embedded corpus)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--iters", type=int, default=30, help="iterations (default 30)")
    p.add_argument("--skip", type=int, default=5, help="first iterations left out of tokens/s (default 5)")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--fused-adamw", action="store_true",
                   help="PyTorch's fused AdamW (nanoGPT uses it on GPUs only), as ds_configs/cpu_fp32.json does")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="keep freed host memory as gptx does for large tensors (see docs/performance.md)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def run_reference_run(argv: list[str] | None = None) -> int:
    out = sys.stdout

    def main():
        import json
        from pathlib import Path

        import torch

        from gptx.analysis.references import reference_run
        from gptx.config import load_config
        from gptx.data.default_corpus import default_data_dir
        from gptx.parallel.host import keep_freed_memory
        args = reference_run_parser().parse_args(argv)
        require_at_least(args, 1, "batch_size", "iters")
        if not 0 <= args.skip < args.iters:
            raise ConfigError(f"--skip: must be at least 0 and less than --iters ({args.iters}), got {args.skip}")
        cfg = load_config(args.model, config_overrides(args, ()))
        data = Path(args.data) if args.data else default_data_dir()
        kept = keep_freed_memory() if args.keep_freed_memory else False
        log = (lambda msg: None) if args.json else print
        r = reference_run(args.reference, cfg, data, args.batch_size, args.iters, args.lr, args.weight_decay,
                          args.fused_adamw, log=log)
        timed = r["seconds"][args.skip:]
        r.update(reference=args.reference, tokens_per_sec=r["tokens_per_iteration"] * len(timed) / sum(timed),
                 skip=args.skip, kept_freed_memory=kept, torch=torch.__version__)
        adamw = "fused AdamW" if args.fused_adamw else "for-loop AdamW"
        print(json.dumps(r) if args.json else
              f"{r['tokens_per_sec']:,.0f} tokens/s over iterations {args.skip + 1}-{args.iters} "
              f"({r['device']}, {r['threads']} threads, {adamw}, freed memory {'kept' if kept else 'returned'})",
              file=out)
    with stdout_for_json(argv):  # the model file's own prints go to stderr
        return guarded(main)
