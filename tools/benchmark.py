"""Engine throughput and time breakdown: python tools/benchmark.py --model tiny --plain
(a pipeline: deepspeed --num_gpus 2 tools/benchmark.py --model tiny)"""
import sys

from gptx.cli.benchmark import run_benchmark

if __name__ == "__main__":
    sys.exit(run_benchmark())
