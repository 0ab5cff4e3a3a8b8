"""gptx <-> Hugging Face GPT-2: python tools/convert.py --load RUN --to-hf OUT | --from-hf SRC --save RUN"""
import sys

from gptx.cli.convert import run_convert

if __name__ == "__main__":
    sys.exit(run_convert())
