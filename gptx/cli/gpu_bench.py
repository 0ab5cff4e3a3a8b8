"""tools/gpu_bench.py: the GPU speed table (each speed lever on and off beside build-nanogpt's loop), written
to docs/benchmarks/."""
from __future__ import annotations

import argparse
import sys

from gptx.cli.common import Parser, guarded, in_process_group, require_at_least
from gptx.errors import ConfigError
from gptx.parallel.launching import single_process_env


def gpu_bench_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tools/gpu_bench.py",
               description="gptx's engine on gpt2 in bf16 and fp16 with each speed lever on and off, the same model "
                           "in build-nanogpt's plain loop, and gpt2-medium and gpt2-xl at gptx's fastest setting: "
                           "one process, rows alternating; writes docs/benchmarks/DATE-DEVICE.md and .json. "
                           "On a CPU it runs the same plan at tiny shapes.")
    p.add_argument("--precisions", default=None, help="comma-separated bf16, fp16, fp32 (default: bf16,fp16 on a GPU, "
                                                      "fp32 on a CPU)")
    p.add_argument("--levers", default="compile,pad,fused,one_stage",
                   help="levers to measure, comma-separated (default: all of compile,pad,fused,one_stage); "
                        "the ones left out stay off in every row")
    p.add_argument("--models", default="", help="only these groups, comma-separated (default: gpt2, gpt2-medium, "
                                                "gpt2-xl on a GPU; gpt2, gpt2-xl at tiny shapes on a CPU)")
    p.add_argument("--reference", default=None, metavar="PATH",
                   help="a nanoGPT-style model.py for the reference loop (default: gptx's own layers as one module)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per row (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations per row first, compilation included "
                                                         "(default 3)")
    p.add_argument("--deadline-s", type=float, default=420.0,
                   help="no model group, row or timing round starts after this many seconds; every built row "
                        "still gets two timed iterations (default 420)")
    p.add_argument("--out-dir", default="docs/benchmarks", help="where the .md and .json go (default docs/benchmarks)")
    return p


def check_out_dir(out_dir) -> None:
    """Make --out-dir and write in it once, so that a file there or a read-only disk is one line now
    rather than a traceback after minutes of measuring."""
    import tempfile
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise ConfigError(f"--out-dir {out_dir}: cannot write there ({e.strerror}); give a folder this process "
                          f"can write") from None


def run_gpu_bench(argv: list[str] | None = None) -> int:
    def main():
        import shlex
        from pathlib import Path

        from gptx.analysis.gpu_bench import LEVERS, ds_config_for, gpu_bench, plan_from_args
        from gptx.analysis.references import build_reference
        from gptx.parallel.ds_config import check_ds_config
        from gptx.parallel.host import accelerator_name, configure_host
        args = gpu_bench_parser().parse_args(argv)
        accelerator = accelerator_name()
        precisions = tuple(x for x in (args.precisions or ("bf16,fp16" if accelerator == "cuda" else "fp32"))
                           .split(",") if x)
        for name in precisions:
            if name not in ("bf16", "fp16", "fp32"):
                raise ConfigError(f"--precisions: expected bf16, fp16 or fp32, got '{name}'")
            check_ds_config(ds_config_for(name, 1, 1), 1, 1, accelerator, f"--precisions {name}")
        levers = tuple(x for x in args.levers.split(",") if x)
        for name in levers:
            if name not in LEVERS:
                raise ConfigError(f"--levers: unknown lever '{name}'; expected some of {', '.join(LEVERS)}")
        models = tuple(x for x in args.models.split(",") if x)
        require_at_least(args, 1, "iters", "warmup")
        plan = plan_from_args(accelerator, precisions, levers, models, reference=args.reference, iters=args.iters,
                              warmup=args.warmup, deadline_s=args.deadline_s)
        known = {g.model for g in plan_from_args(accelerator, precisions, levers, ()).groups}
        if not plan.groups or not set(models) <= known:
            raise ConfigError(f"--models: expected some of {', '.join(sorted(known))}, got '{args.models}'")
        if args.reference:  # a bad reference is one line before anything is built
            import torch

            from gptx.config import load_config
            with torch.device("meta"):
                build_reference(args.reference, load_config("gpt2", {"n_layer": 1}), "--reference")
        check_out_dir(Path(args.out_dir))
        configure_host(accelerator)
        single_process_env()
        command = "python tools/gpu_bench.py" + "".join(" " + shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                                        else argv))
        in_process_group(lambda: print(f"wrote {gpu_bench(plan, accelerator, Path(args.out_dir), command)}"))
    return guarded(main)
