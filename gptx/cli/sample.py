"""tools/sample.py: generate text from a checkpoint."""
from __future__ import annotations

import argparse
import sys

from gptx.cli.common import Parser, device_for, guarded, no_engine_accelerator
from gptx.errors import ConfigError


def sample_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tools/sample.py", description="Generate text from a training checkpoint")
    p.add_argument("--load", required=True, help="run directory (latest checkpoint) or a checkpoint folder")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="text, encoded with GPT-2 BPE")
    prompt.add_argument("--prompt-ids", default=None, help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=100,
                   help="new tokens to generate (fewer when end-of-text comes first; past the model's context, "
                        "a sliding window)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-cache", action="store_true", help="recompute every position each step (slower)")
    p.add_argument("--master-weights", action="store_true",
                   help="take a fp16/bf16 run's weights from the optimizer's fp32 master copies")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print one JSON object with ids and text")
    return p


def run_sample(argv: list[str] | None = None) -> int:
    no_engine_accelerator()

    def main():
        import json

        from gptx.data.tokens import GPT2_EOT, GPT2_VOCAB_SIZE, gpt2_encoding, reads_gpt2_bpe
        from gptx.model.generate import generate
        from gptx.training.consolidate import load_plain_model
        args = sample_parser().parse_args(argv)
        for flag, value, ok, expected in (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 0, ">= 0"),
                                          ("--temperature", args.temperature, args.temperature >= 0, ">= 0"),
                                          ("--top-k", args.top_k, args.top_k is None or args.top_k >= 1, ">= 1"),
                                          ("--top-p", args.top_p, args.top_p is None or 0 < args.top_p <= 1,
                                           "in (0, 1]")):
            if not ok:
                raise ConfigError(f"{flag}: must be {expected}, got {value}")
        model, cfg = load_plain_model(args.load, master_weights=args.master_weights)
        model.to(device_for(args.device))
        gpt2 = reads_gpt2_bpe(cfg.model.vocab_size)  # nanoGPT's 50,304 rows too: only the real 50,257 are sampled
        enc = gpt2_encoding() if gpt2 else None
        if args.prompt_ids is not None:
            try:
                prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
            except ValueError:
                prompt = []
            if not prompt:
                raise ConfigError(f"--prompt-ids '{args.prompt_ids}': expected one or more comma-separated integers")
        elif enc is not None:
            prompt = enc.encode_ordinary(args.prompt or "") or [GPT2_EOT]
        else:
            raise ConfigError(f"--prompt needs GPT-2 BPE but this model has {cfg.model.vocab_size} tokens "
                              f"(another tokenizer's); use --prompt-ids")
        tokens = GPT2_VOCAB_SIZE if enc is not None else cfg.model.vocab_size  # a padded table's rows are no token
        bad = [t for t in prompt if not 0 <= t < tokens]
        if bad:
            raise ConfigError(f"--prompt-ids: {bad[0]} is outside the vocabulary (0..{tokens - 1})")
        ids = generate(model, prompt, args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                       stop_token=GPT2_EOT if gpt2 else None, use_cache=not args.no_cache,
                       vocabulary=GPT2_VOCAB_SIZE if gpt2 else None)
        text = enc.decode(ids) if enc is not None else None
        if cfg.model.position_embedding == "learned" and len(ids) > cfg.model.seq_len:
            print(f"note: the output is longer than the model's context ({cfg.model.seq_len} tokens, learned "
                  f"positions): past it each token was predicted from the last {cfg.model.seq_len}", file=sys.stderr)
        print(json.dumps({"ids": ids, "text": text}) if args.json else (text if text is not None else ids))
    return guarded(main)
