"""tools/partition_report.py: a pipeline's stage layout, memory and bubble, or (--fit) the layouts
that fit a cluster."""
from __future__ import annotations

import argparse
import shlex

from gptx.cli.common import Parser, config_overrides, guarded, no_engine_accelerator, require_at_least
from gptx.errors import ConfigError


def partition_report_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tools/partition_report.py",
               description="Stage layout, parameters, memory, bubble and balance of a pipeline, "
                           "before launch (no GPU, no processes, no allocation)")
    p.add_argument("--model", default=None, help="preset name (default: tiny) or a YAML file")
    p.add_argument("--pipe-parallel-size", type=int, default=None, help="stages (default: the config's)")
    p.add_argument("--data-parallel-size", type=int, default=1, help="data-parallel replicas (for batch and ZeRO-1)")
    p.add_argument("--partition-method", default=None, help="parameters, uniform, compute or type:REGEX")
    p.add_argument("--activation-checkpoint-interval", type=int, default=None)
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON for precision, batch and ZeRO (default: ds_configs/gpu_fp16.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model key")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    fit = p.add_argument_group("what fits (--fit): every layout on a cluster, those that fit first, fastest first")
    fit.add_argument("--fit", action="store_true", help="list the layouts that fit instead of reporting one")
    fit.add_argument("--gpus", type=int, default=8, help="GPUs in all (default 8)")
    fit.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    fit.add_argument("--host-memory", type=float, default=1024.0, help="GiB of host memory per node (default 1024)")
    fit.add_argument("--gpus-per-node", type=int, default=8, help="default 8")
    fit.add_argument("--micro-batch", type=int, default=None, help="sequences per GPU per micro-batch "
                                                                     "(default: the JSON's)")
    fit.add_argument("--accum", type=int, default=None,
                     help="micro-batches per step without a pipeline (a pipeline of p stages runs p times as "
                          "many on p times fewer replicas; default: the JSON's)")
    fit.add_argument("--top", type=int, default=12, help="rows to print (default 12)")
    fit.add_argument("--write-plan", default=None, metavar="FILE",
                     help="write the chosen layout's DeepSpeed JSON to FILE, which its printed command names "
                          "(default: print it; nothing is written)")
    return p


def _run_fit(args, cfg, ds: dict) -> str:
    import json

    from gptx.analysis.planner import Cluster, command_for, plan_layouts, render_plan
    require_at_least(args, 1, "gpus", "gpus_per_node", "top")
    for name in ("gpu_memory", "host_memory"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be a positive number of GiB, got {getattr(args, name)}")
    micro = args.micro_batch if args.micro_batch is not None else ds.get("train_micro_batch_size_per_gpu", 1)
    accum = args.accum if args.accum is not None else ds.get("gradient_accumulation_steps", 1)
    for flag, value in (("--micro-batch", micro), ("--accum", accum)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{flag}: must be >= 1, got {value}")
    cluster = Cluster(gpus=args.gpus, gpu_memory_gib=args.gpu_memory, host_memory_gib=args.host_memory,
                      gpus_per_node=args.gpus_per_node)
    rows = plan_layouts(cfg, cluster, ds, micro, accum)
    # The model as the user named it, --set overrides included, so the printed command trains it.
    model_flags = " ".join([f"--model {shlex.quote(args.model or cfg.name)}",
                            *(f"--set {shlex.quote(item)}" for item in args.set)])
    best = next((r for r in rows if r["fits"]), None)
    written = None
    if args.write_plan and best is not None:
        from gptx.atomic import atomic_write
        try:
            atomic_write(args.write_plan, (json.dumps(best["ds_config"], indent=2) + "\n").encode())
        except OSError as e:
            raise ConfigError(f"--write-plan '{args.write_plan}': cannot write it ({e.strerror})") from None
        written = args.write_plan
    if not args.json:
        text = render_plan(model_flags, rows, cluster, args.top, written)
    else:
        text = json.dumps([{**{k: v for k, v in r.items() if k != "layout"}, "layout": r["layout"].__dict__,
                            "command": command_for(model_flags, r, cluster, written if r is best and written
                                                   else "plan.json")} for r in rows], indent=2)
    if args.write_plan and best is None:  # the table still shows how far over the budget each layout is
        print(text)
        raise ConfigError(f"--write-plan '{args.write_plan}': no layout fits, so no plan was written")
    return text


def run_partition_report(argv: list[str] | None = None) -> int:
    no_engine_accelerator()

    def main():
        import json

        from gptx.analysis.partition_report import partition_report, render_text
        from gptx.config import load_config
        from gptx.parallel.ds_config import check_ds_config, default_ds_config_path, read_ds_config
        args = partition_report_parser().parse_args(argv)
        cfg = load_config(args.model, config_overrides(
            args, ("pipe_parallel_size", "partition_method", "activation_checkpoint_interval")))
        require_at_least(args, 1, "data_parallel_size")
        ds_path = args.deepspeed_config or str(default_ds_config_path("cuda"))
        ds = read_ds_config(ds_path)
        if args.fit:
            print(_run_fit(args, cfg, ds))
            return
        if args.write_plan:
            raise ConfigError("--write-plan: only with --fit (it writes the DeepSpeed JSON of the layout --fit chooses)")
        layout = check_ds_config(ds, args.data_parallel_size, cfg.train.pipe_parallel_size, "cuda", ds_path)
        report = partition_report(cfg, cfg.train.pipe_parallel_size, cfg.train.partition_method, ds, layout)
        print(json.dumps(report, indent=2) if args.json else render_text(report))
    return guarded(main)
