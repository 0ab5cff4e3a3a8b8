"""Memory strategies side by side (pipeline ZeRO-1, + offload, no pipeline ZeRO-2, ZeRO-3, ZeRO-3 + offload,
each with and without activation checkpointing): python tools/strategies.py [--model M] [--gpus 2]."""
import sys

from gptx.cli.strategies import run_strategies

if __name__ == "__main__":
    sys.exit(run_strategies())
