"""Generate from a checkpoint: python tools/sample.py --load RUN_DIR --prompt "Python is" --max-new-tokens 50"""
import sys

from gptx.cli.sample import run_sample

if __name__ == "__main__":
    sys.exit(run_sample())
