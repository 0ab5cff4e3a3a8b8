"""Pipeline-parallel GPT pretraining: deepspeed --num_gpus 2 launch/pretrain.py [--help]

Without the launcher, `python launch/pretrain.py --pipe-parallel-size 1` trains in one process.
"""
from gptx.cli.pretrain import main

if __name__ == "__main__":
    main()
