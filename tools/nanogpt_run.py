"""A nanoGPT model.py trained the way nanoGPT's train.py does, for a side-by-side comparison in
separate processes: python tools/nanogpt_run.py PATH/model.py --set n_layer=4 ..."""
import sys

from gptx.cli import run_nanogpt_run

if __name__ == "__main__":
    sys.exit(run_nanogpt_run())
