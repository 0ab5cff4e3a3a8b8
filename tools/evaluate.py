"""Loss, perplexity, bits per byte: python tools/evaluate.py --load RUN_DIR --data FILE_OR_DIR [--seq-len N]"""
import sys

from gptx.cli.evaluate import run_evaluate

if __name__ == "__main__":
    sys.exit(run_evaluate())
