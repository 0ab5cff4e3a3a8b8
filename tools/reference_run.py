"""transformers' GPT-2 or a nanoGPT model.py trained the way nanoGPT's train.py does, for a
side-by-side comparison in separate processes: python tools/reference_run.py hf|PATH/model.py --set n_layer=4 ..."""
import sys

from gptx.cli.reference_run import run_reference_run

if __name__ == "__main__":
    sys.exit(run_reference_run())
