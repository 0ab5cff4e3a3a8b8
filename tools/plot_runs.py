"""Plot runs side by side: python tools/plot_runs.py RUN [RUN ...] --out FILE.png"""
import sys

from gptx.cli.plot_runs import run_plot_runs

if __name__ == "__main__":
    sys.exit(run_plot_runs())
