"""tools/partition_report.py: a pipeline's stage layout, memory and bubble, or (--fit) the layouts
that fit a cluster."""
from __future__ import annotations

import argparse
import os
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
    fit.add_argument("--gpus", type=int, default=None, help="GPUs in all (default 8)")
    fit.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU (default 80)")
    fit.add_argument("--host-memory", type=float, default=None, help="GiB of host memory per node (default 1024)")
    fit.add_argument("--gpus-per-node", type=int, default=None, help="default 8")
    fit.add_argument("--micro-batch", type=int, default=None, help="sequences per GPU per micro-batch "
                                                                     "(default: the JSON's)")
    fit.add_argument("--accum", type=int, default=None,
                     help="micro-batches per step without a pipeline (a pipeline of p stages runs p times as "
                          "many on p times fewer replicas; default: the JSON's train_batch_size split over each "
                          "layout's replicas, else its gradient_accumulation_steps)")
    fit.add_argument("--top", type=int, default=None, help="rows to print (default 12)")
    fit.add_argument("--write-plan", default=None, metavar="FILE",
                     help="write the chosen layout's DeepSpeed JSON to FILE, a new file (an existing one is "
                          "refused), which its printed command names (default: print it; nothing is written)")
    return p


FIT_DEFAULTS = {"gpus": 8, "gpu_memory": 80.0, "host_memory": 1024.0, "gpus_per_node": 8, "top": 12,
                "micro_batch": None, "accum": None, "write_plan": None}
"""The flags of --fit alone, and their defaults there."""


def _run_fit(args, cfg, ds: dict) -> str:
    import json
    import math

    from gptx.analysis.planner import Cluster, command_for, plan_layouts, render_plan
    for name, default in FIT_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    require_at_least(args, 1, "gpus", "gpus_per_node", "top")
    for name in ("gpu_memory", "host_memory"):
        if not 0 < getattr(args, name) < math.inf:  # nan and inf too
            raise ConfigError(f"--{name.replace('_', '-')}: must be a positive number of GiB, "
                              f"got {getattr(args, name)}")
    for flag, value in (("--micro-batch", args.micro_batch), ("--accum", args.accum)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: must be >= 1, got {value}")
    if args.write_plan and os.path.lexists(args.write_plan):
        # Only ever a new file: the path may be the model's YAML, the JSON this plan starts from, or anything else.
        raise ConfigError(f"--write-plan '{args.write_plan}': it already exists, and --write-plan writes only a new "
                          f"file; name another path or remove this one")
    cluster = Cluster(gpus=args.gpus, gpu_memory_gib=args.gpu_memory, host_memory_gib=args.host_memory,
                      gpus_per_node=args.gpus_per_node)
    # The micro-batch and accumulation of each layout's replicas come from check_ds_config, as the plain report's.
    rows = plan_layouts(cfg, cluster, ds, args.micro_batch, args.accum)
    # The model as the user named it, --set overrides and the partition the predictions used included,
    # so the printed command trains what was planned.
    method = [f"--partition-method {shlex.quote(args.partition_method)}"] if args.partition_method else []
    model_flags = " ".join([f"--model {shlex.quote(args.model or cfg.name)}",
                            *(f"--set {shlex.quote(item)}" for item in args.set), *method])
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


def _bar(value: float, biggest: float, width: int = 30) -> str:
    return "#" * max(1, round(width * value / biggest)) if biggest else ""


def render_text(r: dict) -> str:
    """The report as text (the command's output without --json)."""
    from gptx.analysis.partition_report import GiB
    from gptx.parallel.pipeline import SPLIT_BY_BLOCKS
    from gptx.parallel.zero_bubble import bubble_fraction
    layout = (f"{r['pipe_parallel_size']} stage(s) x {r['data_parallel_size']} data-parallel, partition "
              f"'{r['partition_method']}'" if r["pipe_parallel_size"] else
              f"no pipeline: the whole model x {r['data_parallel_size']} data-parallel")
    offload = "".join(f", {what} offloaded to {r[key]}" for what, key in
                      (("optimizer", "offload_optimizer"), ("parameters", "offload_param")) if r[key] != "none")
    lines = [f"model {r['model']}: {layout}, {r['precision']}, ZeRO {r['zero_stage']}{offload}, "
             f"micro-batch {r['micro_batch_size']} x {r['micro_batches']} micro-batches of {r['seq_len']} tokens", ""]
    if r["engine_refuses"]:  # first, where it is seen
        lines[1:1] = [f"training refuses this layout: {r['engine_refuses']}; {SPLIT_BY_BLOCKS}"]
    for st in r["stages"]:
        lines.append(f"stage={st['stage']} layers={len(st['layers'])}")
        for layer in st["layers"]:
            lines.append(f"    {layer['index']:2d}: {layer['name']:<16} {layer['params']:>16,} params  "
                         f"{layer['flops_per_token'] / 1e6:>12,.1f} MFLOP/token")
    lines.append("")
    biggest_p = max(st["params"] for st in r["stages"])
    biggest_f = max(st["flops_per_token"] for st in r["stages"]) or 1
    lines.append("per stage                params  (bar)                                   compute  (bar)")
    for st in r["stages"]:
        lines.append(f"  stage {st['stage']:<3} {st['params']:>16,}  {_bar(st['params'], biggest_p):<30}  "
                     f"{st['flops_per_token'] / 1e9:>8.2f} GFLOP/token  {_bar(st['flops_per_token'], biggest_f)}")
    # Totals differ only where a tied embedding sits on two stages; an untied head is its own table.
    tied_note = " (a tied embedding counts on both end stages)" if r["total_params"] != r["unique_params"] else ""
    lines.append(f"parameters: total {r['total_params']:,}{tied_note}, unique {r['unique_params']:,}")
    b = r["balance"]
    lines.append(f"balance (max/mean over stages): parameters {b['params_max_over_mean']:.3f}, "
                 f"compute {b['compute_max_over_mean']:.3f}")
    p, m = r["pipe_parallel_size"], r["micro_batches"]
    if p and r["pipeline_schedule"] == "zb-h1":
        lines.append(f"pipeline bubble (zb-h1, F = B = W; gptx/parallel/zero_bubble.py): "
                     f"{100 * r['bubble_fraction']:.1f}% (1f1b: {100 * bubble_fraction('1f1b', p, m):.1f}%); stage s "
                     f"also keeps what up to s micro-batches' weight gradients need")
    elif p:
        lines.append(f"pipeline bubble: (p - 1) / (m + p - 1) = {p - 1}/{m + p - 1} = "
                     f"{100 * r['bubble_fraction']:.1f}%")
    lines.append("")
    ckpt = r["activation_checkpoint_interval"] or 1
    lines.append(f"memory per rank, GiB    weights     grads  optimizer  buffers  activations  (ckpt every {ckpt})"
                 f"    logits     total  (ckpt)")
    for st in r["stages"]:
        mb = st["memory_bytes"]
        lines.append(f"  stage {st['stage']:<3} ({mb['micro_batches_in_flight']} in flight)"
                     f"{mb['weights'] / GiB:>9.2f} {mb['gradients'] / GiB:>9.2f} {mb['optimizer_states'] / GiB:>10.2f}"
                     f" {mb['buffers'] / GiB:>8.2f} {mb['activations'] / GiB:>12.2f}"
                     f" {mb['activations_checkpointed'] / GiB:>18.2f}"
                     f" {mb['logits'] / GiB:>9.2f} {mb['total'] / GiB:>9.2f} {mb['total_checkpointed'] / GiB:>7.2f}"
                     + (f"   host {mb['host'] / GiB:.2f}" if mb["host"] else ""))
    if any(st["memory_bytes"]["buffers"] for st in r["stages"]):
        lines.append("  buffers: DeepSpeed's at the gradient reduction and step (buckets of zero_optimization."
                     "reduce_bucket_size elements, offload transfers, fp16's fp32 gradients without ZeRO), not all "
                     "alive with the activations; total is the peak")
    if any(st["memory_bytes"]["host"] for st in r["stages"]):
        lines.append("  host: offloaded optimizer states, fp32 gradient shards and parameters, per rank")
    if not r["methods"]:
        return "\n".join(lines)
    lines.append("")
    lines.append("partition methods compared (max/mean over stages):")
    for name, alt in r["methods"].items():
        lines.append(f"  {name:<11} stages start at {alt['parts'][:-1]}: parameters {alt['params_max_over_mean']:.3f}, "
                     f"compute {alt['compute_max_over_mean']:.3f}")
    return "\n".join(lines)


def run_partition_report(argv: list[str] | None = None) -> int:
    no_engine_accelerator()

    def main():
        import json

        from gptx.analysis.partition_report import partition_report
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
        given = [name for name in FIT_DEFAULTS if getattr(args, name) is not None]
        if given:  # silently ignored before: the report's batch is the JSON's
            raise ConfigError(f"--{given[0].replace('_', '-')}: only with --fit (it plans the layouts of a cluster; "
                              f"the report of one layout takes its batch from the JSON)")
        layout = check_ds_config(ds, args.data_parallel_size, cfg.train.pipe_parallel_size, "cuda", ds_path)
        report = partition_report(cfg, cfg.train.pipe_parallel_size, cfg.train.partition_method, ds, layout)
        print(json.dumps(report, indent=2) if args.json else render_text(report))
    return guarded(main)
