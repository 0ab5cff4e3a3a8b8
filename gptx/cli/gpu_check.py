"""tools/gpu_check.py: fp32, fp16 and bf16 trained side by side from the same weights."""
from __future__ import annotations

import argparse
import sys

from gptx.cli.common import Parser, guarded, in_process_group, stdout_for_json, tool_config
from gptx.errors import ConfigError


def gpu_check_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="tools/gpu_check.py",
        description="fp32 (TF32 on GPUs), the shipped fp16 config and the shipped bf16 config, trained side by "
                    "side from the same weights on the same batches: loss differences, grad norm, loss scale, "
                    "skips, tokens/s, MFU, peak memory per stage, flash attention. One GPU: python "
                    "tools/gpu_check.py; a pipeline: deepspeed --num_gpus N tools/gpu_check.py")
    p.add_argument("--model", default="gpt2", help="preset name or a YAML file (default: gpt2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--data", default=None, help="prepared data directory (default: the embedded corpus)")
    p.add_argument("--iters", type=int, default=300, help="iterations per precision")
    p.add_argument("--micro-batch", type=int, default=None, help="default: ds_configs/gpu_fp16.json's")
    p.add_argument("--accum", type=int, default=None, help="gradient accumulation steps (default: the JSON's)")
    p.add_argument("--pipe-parallel-size", type=int, default=None, help="stages (default: as many as ranks)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def run_gpu_check(argv: list[str] | None = None) -> int:
    out = sys.stdout

    def main():
        import json

        import torch
        import torch.distributed as dist
        from deepspeed.utils.logging import set_log_level_from_string

        from gptx.analysis.precision_check import gpu_check, render_gpu_check
        from gptx.data.default_corpus import default_data_dir
        from gptx.data.tokens import check_data, open_tokens
        from gptx.parallel.ds_config import DS_CONFIG_DIR, check_ds_config, read_ds_config
        from gptx.parallel.host import accelerator_name, configure_host
        from gptx.training.metrics import log
        args = gpu_check_parser().parse_args(argv)
        set_log_level_from_string("warning")
        cfg, world = tool_config(args, ("pipe_parallel_size",))
        pp = cfg.train.pipe_parallel_size
        if args.iters < 2:
            raise ConfigError(f"--iters: must be >= 2, got {args.iters}")
        accelerator = accelerator_name()
        fp16 = read_ds_config(DS_CONFIG_DIR / "gpu_fp16.json")
        bf16 = read_ds_config(DS_CONFIG_DIR / "gpu_bf16.json")
        fp32 = {k: v for k, v in fp16.items() if k != "fp16"}
        configs = {("tf32" if accelerator == "cuda" else "fp32"): fp32, "fp16": fp16, "bf16": bf16}
        for name, ds in configs.items():
            for key, value in (("train_micro_batch_size_per_gpu", args.micro_batch),
                               ("gradient_accumulation_steps", args.accum)):
                if value is not None:
                    ds[key] = value
            check_ds_config(ds, world // pp, pp, accelerator, f"ds_configs ({name}, with the batch flags)")
        data_dir = args.data or default_data_dir()
        check_data(data_dir, cfg.model.vocab_size, cfg.model.seq_len)
        if accelerator == "cuda":  # the fp32 reference as GPUs run it by default in practice
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        configure_host(accelerator)

        def work():
            report = gpu_check(cfg, configs, open_tokens(data_dir, "train"), args.iters, accelerator, log=log)
            if dist.get_rank() == 0:
                print(json.dumps(report) if args.json else render_gpu_check(report), file=out, flush=True)
        in_process_group(work)
    with stdout_for_json(argv):
        return guarded(main)
