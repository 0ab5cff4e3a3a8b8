"""The GPU speed table in one command: python tools/gpu_bench.py --reference PATH/nanoGPT/model.py
(writes docs/benchmarks/DATE-DEVICE.md and .json; on a CPU, the same plan at tiny shapes)."""
import sys

from gptx.cli.gpu_bench import run_gpu_bench

if __name__ == "__main__":
    sys.exit(run_gpu_bench())
