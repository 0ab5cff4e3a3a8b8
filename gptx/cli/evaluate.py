"""tools/evaluate.py: loss, perplexity and bits per byte of a checkpoint on text."""
from __future__ import annotations

import argparse
import sys

from gptx.cli.common import Parser, device_for, guarded, no_engine_accelerator
from gptx.errors import ConfigError


def evaluate_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tools/evaluate.py", description="Loss, perplexity and bits per byte")
    p.add_argument("--load", required=True, help="run directory (latest checkpoint) or a checkpoint folder")
    p.add_argument("--data", required=True,
                   help="a .txt file (one document), a .jsonl file (a 'text' field per line), a .bin split, or a "
                        "data directory (its val.bin)")
    p.add_argument("--seq-len", default=None,
                   help="context per window (default: the model's); several, comma-separated (512,1024,2048), "
                        "print one table")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--master-weights", action="store_true",
                   help="take a fp16/bf16 run's weights from the optimizer's fp32 master copies")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    return p


def run_evaluate(argv: list[str] | None = None) -> int:
    no_engine_accelerator()

    def main():
        import json

        from gptx.interop.evaluate import check_checkpoint_path, context_table, evaluate_contexts, load_eval_tokens
        from gptx.training.consolidate import load_plain_model
        args = evaluate_parser().parse_args(argv)
        check_checkpoint_path(args.load)
        try:
            lengths = [int(x) for x in args.seq_len.split(",")] if args.seq_len else []
        except ValueError:
            raise ConfigError(f"--seq-len '{args.seq_len}': expected an integer or comma-separated integers, "
                              f"e.g. 512,1024,2048") from None
        model, cfg = load_plain_model(args.load, master_weights=args.master_weights)
        model.to(device_for(args.device))
        tokens, n_bytes = load_eval_tokens(args.data, cfg.model.vocab_size)
        rows = evaluate_contexts(model, tokens, n_bytes, lengths or [cfg.model.seq_len], args.batch_size,
                                 progress=lambda n: _progress_to_stderr(f"evaluate (context {n})"))
        if len(rows) == 1:
            (result,) = rows
            if args.json:
                print(json.dumps(result))
            else:
                bpb = f", {result['bits_per_byte']:.4f} bits/byte" if result["bits_per_byte"] is not None else ""
                print(f"{result['tokens']:,} tokens at context {result['seq_len']}: loss {result['loss']:.4f}, "
                      f"perplexity {result['perplexity']:.2f}{bpb}")
        else:
            print(json.dumps(rows) if args.json else context_table(rows, cfg.model))
    return guarded(main)


def _progress_to_stderr(what: str):
    """A progress callback printing a line at each tenth done (stdout stays the result's)."""
    shown = [0]

    def report(done: int, total: int) -> None:
        tenth = done * 10 // total
        if tenth > shown[0] and total > 1:
            shown[0] = tenth
            print(f"{what}: {done:,}/{total:,} windows ({done * 100 // total}%)", file=sys.stderr, flush=True)
    return report
