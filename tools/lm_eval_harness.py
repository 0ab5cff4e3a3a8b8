"""lm-evaluation-harness with gptx checkpoints: python tools/lm_eval_harness.py --model gptx --model_args load=RUN --tasks ...

Every argument is lm-eval's own (`lm_eval --help`); this only registers the `gptx` model first.
"""
import sys

from gptx.cli.lm_eval import run_lm_eval

if __name__ == "__main__":
    sys.exit(run_lm_eval())
