"""tools/prepare_data.py: tokenize text into train.bin, val.bin and meta.json."""
from __future__ import annotations

import argparse
import sys
import time

from gptx.cli.common import DefaultsHelpFormatter, Parser, guarded


def prepare_data_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tools/prepare_data.py", formatter_class=DefaultsHelpFormatter,
               description="Tokenize text with GPT-2 BPE into train.bin/val.bin/meta.json, on all cores")
    p.add_argument("inputs", nargs="+", help=".txt files (one document each), JSON lines (.jsonl, .jsonl.gz, "
                                             ".jsonl.zst: a text field per line), .parquet files (a text column), "
                                             "or directories of them")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of tokens held out for val.bin")
    p.add_argument("--text-field", default="text", help="the JSON field or parquet column holding the text")
    p.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: this machine's cores)")
    p.add_argument("--bpe-file", default=None, help="a local copy of r50k_base.tiktoken / whisper's gpt2.tiktoken "
                                                    "(default: the cached copy, else fetched once)")
    p.add_argument("--strict-utf8", action="store_true",
                   help="stop at the first byte that is not UTF-8, naming the file and offset (default: such bytes "
                        "become U+FFFD, counted per file and reported at the end)")
    return p


def run_prepare_data(argv: list[str] | None = None) -> int:
    def main():
        from gptx.data.documents import InputReport, iter_documents
        from gptx.data.prepare import Progress, default_workers, write_token_files
        from gptx.data.tokens import gpt2_encoding
        args = prepare_data_parser().parse_args(argv)
        workers = default_workers() if args.workers is None else args.workers
        start = time.perf_counter()
        progress = Progress()
        report = InputReport(strict_utf8=args.strict_utf8, warn=progress.message)
        meta = write_token_files(iter_documents(args.inputs, args.text_field, report), args.out,
                                 gpt2_encoding(args.bpe_file), args.val_fraction, workers=workers, progress=progress)
        for line in report.summary():
            print(line, file=sys.stderr)
        seconds = time.perf_counter() - start
        print(f"wrote {args.out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
              f"from {meta['documents']:,} documents ({meta['dtype']}); {meta['text_bytes'] / 1e6:,.1f} MB of text "
              f"in {seconds:.1f} s ({meta['text_bytes'] / 1e6 / seconds:,.1f} MB/s, {workers} worker(s))")
    return guarded(main)
