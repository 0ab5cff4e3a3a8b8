"""1F1B against ZB-H1, side by side: deepspeed --num_gpus 2 tools/schedule_bench.py --model tiny"""
import sys

from gptx.cli.schedule_bench import run_schedule_bench

if __name__ == "__main__":
    sys.exit(run_schedule_bench())
