"""Train architecture variants on the same budget and print a table:
python tools/compare_variants.py [--model tiny] [--iters 60] [--variants gpt2 alibi ...]"""
import sys

from gptx.cli.compare_variants import run_compare_variants

if __name__ == "__main__":
    sys.exit(run_compare_variants())
