"""tools/compare_variants.py: architecture variants trained on the same budget, one launch each, and a table."""
from __future__ import annotations

import argparse
from pathlib import Path

from gptx.cli.common import Parser, guarded, require_at_least
from gptx.errors import GptxError


def compare_variants_parser() -> argparse.ArgumentParser:
    from gptx.analysis.variants import VARIANTS
    p = Parser(prog="tools/compare_variants.py",
               description="Train architecture variants on the same budget (data, seed, batch, iterations), each "
                           "in its own launch of launch/pretrain.py, and print a table. Flags it does not know "
                           "go to every run (e.g. --data DIR)")
    p.add_argument("--model", default="tiny", help="preset name or YAML file the variants change (default tiny)")
    p.add_argument("--iters", type=int, default=60, help="iterations per variant (default 60)")
    p.add_argument("--num-gpus", type=int, default=2, help="processes per run (pipeline stages) (default 2)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="which to train (default: all)")
    p.add_argument("--out", default="runs/compare", help="folder of the runs (default runs/compare)")
    return p


def run_compare_variants(argv: list[str] | None = None) -> int:
    def main():
        from gptx.analysis.variants import compare, markdown_table
        from gptx.config import load_config
        args, extra = compare_variants_parser().parse_known_args(argv)
        require_at_least(args, 1, "iters", "num_gpus")
        load_config(args.model, {})  # a wrong name is one line before any launch
        rows = compare(args.variants, args.model, args.iters, args.num_gpus, Path(args.out), extra)
        print(markdown_table(rows))
        try:
            from gptx.analysis.plots import plot_runs
            print(f"curves: {plot_runs([Path(args.out) / r['variant'] for r in rows], Path(args.out) / 'variants.png')}")
        except GptxError as e:  # matplotlib (the `plot` extra) missing: the table stands alone
            print(f"no plot: {e}")
        return 0
    return guarded(main)
