"""Pipeline-parallel GPT pretraining: deepspeed --num_gpus 2 launch/pretrain.py [--help]"""
import sys

from gptx.cli import run_pretrain

if __name__ == "__main__":
    sys.exit(run_pretrain())
