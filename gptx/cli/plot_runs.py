"""tools/plot_runs.py: plot runs from their metrics.jsonl."""
from __future__ import annotations

import argparse

from gptx.cli.common import Parser, guarded
from gptx.errors import ConfigError


def plot_runs_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tools/plot_runs.py",
               description="Plot runs from their metrics.jsonl: loss, val loss, LR, grad norm, loss scale and "
                           "skipped steps, tokens/s and MFU against tokens seen, runs overlaid")
    p.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--smoothing", type=float, default=0.9,
                   help="weight of the exponential moving average of the train loss (0: none)")
    return p


def run_plot_runs(argv: list[str] | None = None) -> int:
    def main():
        from gptx.analysis.plots import plot_runs
        args = plot_runs_parser().parse_args(argv)
        if not 0 <= args.smoothing < 1:
            raise ConfigError(f"--smoothing: must be in [0, 1), got {args.smoothing}")
        print(f"wrote {plot_runs(args.runs, args.out, args.smoothing)}")
    return guarded(main)
