"""Train architecture variants on the same budget and print a table:
python tools/compare_variants.py [--model tiny] [--iters 60] [--variants gpt2 alibi ...]"""
import argparse
import sys
from pathlib import Path

from gptx.analysis.variants import VARIANTS, compare, markdown_table
from gptx.errors import GptxError

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="tiny")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--num-gpus", type=int, default=2, help="processes per run (pipeline stages)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default="runs/compare")
    args, extra = p.parse_known_args()
    rows = compare(args.variants, args.model, args.iters, args.num_gpus, Path(args.out), extra)
    print(markdown_table(rows))
    try:
        from gptx.analysis.plots import plot_runs
        print(f"curves: {plot_runs([Path(args.out) / r['variant'] for r in rows], Path(args.out) / 'variants.png')}")
    except GptxError as e:
        print(f"no plot: {e}")
    sys.exit(0)
