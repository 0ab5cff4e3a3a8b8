"""Pipeline-parallel GPT pretraining: deepspeed --num_gpus 2 launch/pretrain.py [--help]

Without the launcher, `python launch/pretrain.py --pipe-parallel-size 1` trains in one process.
"""
import os
import sys

from gptx.cli import run_pretrain

if __name__ == "__main__":
    code = run_pretrain(as_script=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is saved and the process group is gone. Skip interpreter teardown: a gloo or
    # DeepSpeed thread still being destroyed there sometimes aborts a finished run
    # ("terminate called without an active exception": a rank of a finished bf16 run, once in
    # five full test-suite runs on the 2-core CI machine).
    os._exit(code)
