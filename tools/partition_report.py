"""Plan a pipeline before launch: python tools/partition_report.py --model gpt2-xl --pipe-parallel-size 4"""
import sys

from gptx.cli.partition_report import run_partition_report

if __name__ == "__main__":
    sys.exit(run_partition_report())
