"""fp32/TF32, fp16 and bf16 side by side on the same batches: python tools/gpu_check.py
(a pipeline: deepspeed --num_gpus 2 tools/gpu_check.py). On CPU, fp16 needs GPTX_CPU_FP16=1."""
import sys

from gptx.cli.gpu_check import run_gpu_check

if __name__ == "__main__":
    sys.exit(run_gpu_check())
