"""Tokenize text into train.bin / val.bin: python tools/prepare_data.py INPUT... --out DIR"""
import sys

from gptx.cli.prepare_data import run_prepare_data

if __name__ == "__main__":
    sys.exit(run_prepare_data())
