"""tools/convert.py: a gptx checkpoint to a Hugging Face directory and back."""
from __future__ import annotations

import argparse
from pathlib import Path

from gptx.cli.common import Parser, guarded, no_engine_accelerator
from gptx.errors import ConfigError


def convert_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tools/convert.py",
               description="gptx checkpoint <-> Hugging Face GPT-2 directory (config.json, "
                           "model.safetensors and, for GPT-2's vocabulary, its tokenizer files)")
    p.add_argument("--load", help="gptx run directory or checkpoint folder to export")
    p.add_argument("--to-hf", help="output directory for the Hugging Face model")
    p.add_argument("--from-hf", help="local Hugging Face GPT-2 or Llama directory to import")
    p.add_argument("--save", help="output gptx run directory (a weights-only checkpoint)")
    p.add_argument("--master-weights", action="store_true",
                   help="take a fp16/bf16 run's weights from the optimizer's fp32 master copies")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="precision of the exported weights; auto: the precision the run trained in "
                        "(float32 with --master-weights)")
    p.add_argument("--max-shard-size", type=shard_size,
                   help="largest weight file of the export, e.g. 500MB, 2GiB or bytes (default 5GB); above it the "
                        "weights are sharded with model.safetensors.index.json, as transformers does")
    return p


def shard_size(text: str) -> int:
    """'5GB' (powers of 1000, as transformers reads them), '2GiB' (powers of 1024) or a byte count."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = text.strip().upper()
    unit = next((u for u in units if upper.endswith(u)), "")
    try:
        size = float(upper[:len(upper) - len(unit)]) * units.get(unit, 1)
    except ValueError:
        size = 0
    if not 1 <= size < float("inf"):  # NaN too
        raise argparse.ArgumentTypeError(f"{text!r}: give a size such as 500MB, 2GiB or a byte count")
    return int(size)


def check_export_dir(out: Path) -> None:
    """Hugging Face files go to a directory of their own: an earlier export may be written over;
    a gptx run or checkpoint, or any other files (a downloaded model whose config.json and
    weights the export would replace), may not."""
    from gptx.interop.hf import EXPORT_MARKER, is_leftover
    from gptx.training.checkpoint_files import META, checkpoint_folders
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--to-hf '{out}': exists and is not a directory")
    if out.is_dir() and ((out / META).exists() or (out / "metrics.jsonl").exists() or checkpoint_folders(out)):
        raise ConfigError(f"--to-hf '{out}' holds a gptx run or checkpoint; choose another directory for the "
                          f"Hugging Face files (nothing was written)")
    others = (sorted(p.name for p in out.iterdir() if not is_leftover(p.name))  # a killed export's: removed
              if out.is_dir() and not (out / EXPORT_MARKER).exists() else [])
    if others:
        raise ConfigError(f"--to-hf '{out}' holds files no gptx export wrote ({others[0]}"
                          f"{f' and {len(others) - 1} more' if len(others) > 1 else ''}); choose a new or empty "
                          f"directory (nothing was written)")


def check_import_args(args) -> None:
    """Refuse, before anything is written, flags an import would ignore and a --save that would put a
    gptx run into the Hugging Face directory it reads."""
    ignored = [flag for flag, given in (("--dtype", args.dtype != "auto"), ("--master-weights", args.master_weights),
                                        ("--max-shard-size", args.max_shard_size is not None)) if given]
    if ignored:
        raise ConfigError(f"{ignored[0]} applies to --to-hf exports only; drop it from the --from-hf import "
                          f"(nothing was written)")
    src, save = Path(args.from_hf).resolve(), Path(args.save).resolve()
    if save == src or src in save.parents:
        raise ConfigError(f"--save '{args.save}' is inside the --from-hf directory '{args.from_hf}'; choose a "
                          f"--save outside it (nothing was written)")


def run_convert(argv: list[str] | None = None) -> int:
    no_engine_accelerator()

    def main():
        from gptx.data.tokens import GPT2_VOCAB_SIZE, reads_gpt2_bpe
        from gptx.interop.hf import DEFAULT_MAX_SHARD_BYTES, from_hf, to_hf
        from gptx.training.consolidate import load_plain_model, save_weights_only, trained_precision
        from gptx.training.resume import check_save_dir
        args = convert_parser().parse_args(argv)
        if args.load and args.to_hf and not (args.from_hf or args.save):
            check_export_dir(Path(args.to_hf))
            model, cfg = load_plain_model(args.load, master_weights=args.master_weights)
            trained = "fp32" if args.master_weights else trained_precision(args.load)
            dtype = args.dtype if args.dtype != "auto" else {"fp32": "float32", "bf16": "bfloat16",
                                                             "fp16": "float16"}[trained]
            files, kept = to_hf(model, cfg, args.to_hf, dtype, args.max_shard_size or DEFAULT_MAX_SHARD_BYTES)
            V = cfg.model.vocab_size
            tokenizer = ("with GPT-2's tokenizer files" if reads_gpt2_bpe(V) else
                         f"without tokenizer files (its {V}-token vocabulary is not GPT-2's: add your tokenizer's)")
            if kept:
                tokenizer += f"; kept {', '.join(kept)}, which no export wrote or which changed since"
            weights = "one weight file" if files == 1 else f"{files} weight shards and their index"
            print(f"wrote {args.to_hf} ({dtype}, {weights}) {tokenizer}")
            if V > GPT2_VOCAB_SIZE and reads_gpt2_bpe(V):
                print(f"warning: rows {GPT2_VOCAB_SIZE}..{V - 1} of the vocabulary are hand padding, no token; "
                      f"under Hugging Face they stay live logits that sampling can pick")
        elif args.from_hf and args.save and not (args.load or args.to_hf):
            check_import_args(args)
            check_save_dir(args.save, None)
            layers, cfg, stored = from_hf(args.from_hf)
            folder = save_weights_only(layers, cfg, args.save, source=str(args.from_hf), stored_precision=stored)
            print(f"wrote {folder}")
        else:
            raise ConfigError("use either --load DIR --to-hf OUT, or --from-hf SRC --save DIR")
    return guarded(main)
