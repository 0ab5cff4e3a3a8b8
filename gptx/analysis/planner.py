"""What fits: every layout of a model on a cluster, its predicted memory and a rough time per step.

`plan_layouts()` tries pipeline stages x data parallel (and no pipeline), ZeRO stage, optimizer
offload (and parameter offload with it under ZeRO-3, to cpu) and activation checkpointing,
predicts each one's GPU memory per rank and host memory per node with the partition report's
model (gptx/analysis/partition_report.py), marks the ones that fit, and orders them, fitting first, by
an estimated time per iteration. The estimate ranks layouts;
it is not a measurement. It adds to the same compute for every layout:

- the pipeline bubble of the schedule (gptx/parallel/zero_bubble.py): (p - 1) / (m + p - 1) of the step
  under 1f1b, (p - 1) / (3m + p - 1) under zb-h1 (for m >= p, with F = B = W);
- recomputation under activation checkpointing: one more forward, a third of the step's compute;
- data-parallel traffic: 2 x the gradient bytes (all-reduce or reduce-scatter), plus under
  ZeRO-3 2 x the weight bytes for every micro-batch (gathered for forward and for backward);
- offload: optimizer offload moves each rank's gradient shard to the host and its updated
  weights back over PCIe, and the host steps Adam; parameter offload brings each rank's
  weight shard over PCIe for every micro-batch's forward and backward.
"""
from __future__ import annotations

import copy
import shlex
from dataclasses import dataclass

from gptx.analysis.partition_report import GiB, partition_report
from gptx.config import Config
from gptx.config_checks import n_pipeline_layers
from gptx.errors import ConfigError
from gptx.model.flops import flops_per_token
from gptx.model.gpt import layer_specs
from gptx.parallel.ds_config import BatchLayout, check_ds_config
from gptx.parallel.ds_config import precision as ds_precision
from gptx.parallel.pipeline import count_layer_params, layer_compute_weights, partition, stage_problem
from gptx.parallel.zero_bubble import bubble_fraction


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpu_memory_gib: float
    host_memory_gib: float
    """Per node."""
    gpus_per_node: int = 8
    gpu_tflops: float = 989.0
    """Dense 16-bit peak per GPU (H100 SXM); fp32 runs use it too, as a ranking only."""
    mfu: float = 0.4
    """The fraction of peak the compute is assumed to reach."""
    interconnect_gbps: float = 100.0
    """Data-parallel bandwidth per GPU, GB/s."""
    pcie_gbps: float = 25.0
    """Host <-> GPU bandwidth per GPU, GB/s."""
    host_adam_params_per_s: float = 2e9
    """Parameters per second the host's CPU Adam updates, per node."""
    reserve_gib: float = 2.0
    """Kept free on each GPU: CUDA context, allocator fragmentation, NCCL buffers."""
    host_reserve_gib: float = 4.0
    """Host memory each rank's process needs besides offloaded tensors (torch, CUDA, DeepSpeed)."""


@dataclass(frozen=True)
class Layout:
    pipe: int
    """Stages; 0 is the no-pipeline mode."""
    zero: int
    offload_optimizer: bool
    offload_param: bool
    checkpoint: int
    """Activation checkpointing interval (0: off)."""

    def describe(self) -> str:
        head = "no pipeline" if self.pipe == 0 else f"{self.pipe} stage(s)"
        off = "+".join(w for w, on in (("optimizer", self.offload_optimizer), ("params", self.offload_param)) if on)
        return f"{head}, ZeRO-{self.zero}" + (f", offload {off}" if off else "") + \
            (f", checkpoint every {self.checkpoint}" if self.checkpoint else "")


def candidate_layouts(cfg: Config, gpus: int, precision: str) -> list[Layout]:
    """The layouts the planner considers for this model on `gpus` ranks (all accepted by gptx;
    offload is to cpu, and parameters are offloaded only together with the optimizer)."""
    stages = [p for p in range(1, min(gpus, n_pipeline_layers(cfg.model)) + 1) if gpus % p == 0]
    if cfg.train.pipeline_schedule == "1f1b":  # a pipeline schedule needs the pipeline (gptx/config.py)
        stages.insert(0, 0)
    out = []
    for pipe in stages:
        zeros = (0, 1, 2, 3) if pipe == 0 else (0, 1)
        for zero in zeros:
            if precision != "fp32" and pipe == 0 and zero == 0:
                continue  # refused: half precision without a pipeline needs ZeRO (gptx/parallel/ds_config.py)
            if precision == "bf16" and pipe > 0 and zero != 1:
                continue  # refused: bf16 through the pipeline needs ZeRO-1
            offloads = [(False, False)]
            if zero >= 1:
                offloads.append((True, False))
            if zero == 3:
                offloads.append((True, True))
            for offload_optimizer, offload_param in offloads:
                for checkpoint in (0, 1):
                    out.append(Layout(pipe, zero, offload_optimizer, offload_param, checkpoint))
    return out


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def plan_batch(base_ds: dict, gpus: int, micro_batch: int | None = None, grad_accum: int | None = None) -> dict:
    """The batch keys of the global batch every layout trains: the JSON's train_batch_size, unless
    `grad_accum` (--accum) is given or the JSON has none; then micro-batch x accumulation x `gpus`,
    the no-pipeline layout's. `micro_batch` (--micro-batch) stands for the JSON's micro-batch."""
    micro = micro_batch if micro_batch is not None else base_ds.get("train_micro_batch_size_per_gpu")
    if grad_accum is None and base_ds.get("train_batch_size") is not None:
        keys = {"train_batch_size": base_ds["train_batch_size"], "train_micro_batch_size_per_gpu": micro}
        if micro is None:  # the micro-batch follows from the accumulation, per layout
            keys["gradient_accumulation_steps"] = base_ds.get("gradient_accumulation_steps")
        return {k: v for k, v in keys.items() if v is not None}
    accum = grad_accum if grad_accum is not None else base_ds.get("gradient_accumulation_steps", 1)
    micro = 1 if micro is None else micro
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"the DeepSpeed JSON's '{key}' must be a positive integer, got {value!r}")
    return {"train_batch_size": micro * accum * gpus, "train_micro_batch_size_per_gpu": micro}


def layout_batch(base_ds: dict, layout: Layout, batch: dict, dp: int) -> BatchLayout:
    """The micro-batch and accumulation with which `layout` on `dp` replicas trains `batch`, as
    check_ds_config (and so the engine) derives them; a ConfigError if its replicas cannot."""
    ds = {k: v for k, v in layout_ds_config(base_ds, layout, 1, 1).items() if k not in BATCH_KEYS}
    return check_ds_config({**ds, **batch}, dp, layout.pipe, "cuda")


def layout_ds_config(base: dict, layout: Layout, micro_batch: int, grad_accum: int) -> dict:
    """The DeepSpeed JSON for a layout: `base` (precision, optimizer, clipping) with its ZeRO and batch."""
    ds = copy.deepcopy(base)
    ds.pop("train_batch_size", None)
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = grad_accum
    zero = {"stage": layout.zero}
    if layout.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        params = (ds.get("optimizer") or {}).get("params") or {}
        params.pop("torch_adam", None)
        params.pop("fused", None)
    if layout.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    zero.update({k: v for k, v in (base.get("zero_optimization") or {}).items()
                 if k != "stage" and not k.startswith("offload")})
    ds["zero_optimization"] = zero
    return ds


def predict(cfg: Config, layout: Layout, base_ds: dict, micro_batch: int, grad_accum: int, dp: int,
            layer_params: list[int] | None = None, touched_only: bool = False) -> dict:
    """The partition report's memory for one layout: the largest rank's GPU bytes and host bytes
    per rank (`touched_only`: DeepSpeed's buckets as far as written, see MemoryModel)."""
    import dataclasses
    ds = layout_ds_config(base_ds, layout, micro_batch, grad_accum)
    run = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, pipe_parallel_size=layout.pipe,
                                                              activation_checkpoint_interval=layout.checkpoint))
    report = partition_report(run, layout.pipe, run.train.partition_method, ds,
                              BatchLayout(micro_batch, grad_accum, dp), layer_params, touched_only)
    key = "total_checkpointed" if layout.checkpoint else "total"
    gpu = max(st["memory_bytes"][key] for st in report["stages"])
    host = max(st["memory_bytes"]["host"] for st in report["stages"])
    return {"gpu_bytes": gpu, "host_bytes_per_rank": host, "ds_config": ds, "report": report}


def step_seconds(cfg: Config, layout: Layout, cluster: Cluster, precision: str, micro_batch: int,
                 grad_accum: int, dp: int, params: int) -> float:
    """The ranking estimate of one optimizer step's time (see the module docstring)."""
    tokens_per_gpu = micro_batch * grad_accum * dp * cfg.model.seq_len / cluster.gpus
    compute = flops_per_token(cfg.model) * tokens_per_gpu / (cluster.gpu_tflops * 1e12 * cluster.mfu)
    if layout.checkpoint:
        compute *= 4 / 3
    if layout.pipe > 1:
        compute /= 1 - bubble_fraction(cfg.train.pipeline_schedule, layout.pipe, grad_accum)
    stage_params = params / max(layout.pipe, 1)
    half = 4 if precision == "fp32" else 2
    comm = 0.0
    if dp > 1:
        traffic = 2 * stage_params * half
        if layout.zero == 3:
            traffic += 2 * stage_params * half * grad_accum
        comm = traffic * (dp - 1) / dp / (cluster.interconnect_gbps * 1e9)
    offload = 0.0
    shard = stage_params / dp
    if layout.offload_optimizer:
        ranks = min(cluster.gpus_per_node, cluster.gpus)
        offload += 2 * shard * half / (cluster.pcie_gbps * 1e9)
        offload += shard * ranks / cluster.host_adam_params_per_s
    if layout.offload_param:
        offload += 2 * grad_accum * shard * half / (cluster.pcie_gbps * 1e9)
    return compute + comm + offload


def plan_layouts(cfg: Config, cluster: Cluster, base_ds: dict, micro_batch: int | None = None,
                 grad_accum: int | None = None) -> list[dict]:
    """Every candidate layout with its prediction, fitting ones first, fastest first.

    The global batch is the same for every layout (plan_batch): a pipeline of p stages has
    gpus / p replicas and p times the micro-batches. A layout whose replicas cannot split it
    (train_batch_size not a multiple of micro-batch x replicas) is left out.
    """
    precision = ds_precision(base_ds)
    per_node = min(cluster.gpus_per_node, cluster.gpus)
    specs = layer_specs(cfg.model, seed=0)
    layer_params, flops = count_layer_params(specs), layer_compute_weights(cfg, specs)
    batch = plan_batch(base_ds, cluster.gpus, micro_batch, grad_accum)
    rows, refused = [], []
    for layout in candidate_layouts(cfg, cluster.gpus, precision):
        dp = cluster.gpus // layout.pipe if layout.pipe else cluster.gpus
        try:
            split = layout_batch(base_ds, layout, batch, dp)
        except ConfigError as e:
            refused.append(e)
            continue
        micro, accum = split.micro_batch, split.grad_accum
        parts = partition(specs, cfg.train.partition_method, layout.pipe, flops) if layout.pipe > 1 else []
        if stage_problem(specs, parts, layout_ds_config(base_ds, layout, micro, accum)):
            continue  # the engine would refuse it (DeepSpeed defect 13)
        pred = predict(cfg, layout, base_ds, micro, accum, dp, layer_params)
        gpu_gib = pred["gpu_bytes"] / GiB
        host_gib = per_node * (pred["host_bytes_per_rank"] / GiB + cluster.host_reserve_gib)
        fits = gpu_gib <= cluster.gpu_memory_gib - cluster.reserve_gib and host_gib <= cluster.host_memory_gib
        params = pred["report"]["unique_params"]
        rows.append({"layout": layout, "data_parallel": dp, "micro_batch": micro, "grad_accum": accum,
                     "gpu_gib": gpu_gib, "host_gib_per_node": host_gib, "fits": fits,
                     "seconds": step_seconds(cfg, layout, cluster, precision, micro, accum, dp, params),
                     "ds_config": pred["ds_config"]})
    if not rows and refused:
        raise refused[0]
    rows.sort(key=lambda r: (not r["fits"], round(r["seconds"], 6), r["gpu_gib"]))
    return rows


def command_for(model_flags: str, row: dict, cluster: Cluster, ds_path: str = "plan.json") -> str:
    """The launch line for a planned layout; `model_flags` names the model as the user did (--model, --set)."""
    layout = row["layout"]
    launcher = (f"deepspeed --num_gpus {cluster.gpus}" if cluster.gpus <= cluster.gpus_per_node
                else "deepspeed --hostfile hostfile")
    # The interval always: a planned layout without checkpointing must not take one from the model's flags.
    flags = [model_flags, f"--pipe-parallel-size {layout.pipe}", f"--deepspeed_config {shlex.quote(ds_path)}",
             f"--activation-checkpoint-interval {layout.checkpoint}"]
    return f"{launcher} launch/pretrain.py " + " ".join(flags)


def render_plan(model_flags: str, rows: list[dict], cluster: Cluster, limit: int = 12,
                written: str | None = None) -> str:
    """The table and the chosen layout's command; `written`: where its DeepSpeed JSON was saved
    (None: the JSON is printed, and how to have it written is said)."""
    import json
    fitting = [r for r in rows if r["fits"]]
    lines = [f"{model_flags} on {cluster.gpus} GPU(s) of {cluster.gpu_memory_gib:g} GiB, "
             f"{cluster.host_memory_gib:g} GiB of host memory per node of {min(cluster.gpus_per_node, cluster.gpus)}: "
             f"{len(fitting)} of {len(rows)} layouts fit (GPU: prediction + {cluster.reserve_gib:g} GiB reserve; "
             f"host: offloaded tensors + {cluster.host_reserve_gib:g} GiB per rank)", "",
             f"  {'layout':<58} {'dp':>3} {'batch':>9} {'GPU GiB':>8} {'host GiB':>9} {'est. s/step':>11}"]
    for r in (fitting or rows)[:limit]:
        lines.append(f"  {r['layout'].describe():<58} {r['data_parallel']:>3} "
                     f"{r['micro_batch']:>4} x {r['grad_accum']:<3} {r['gpu_gib']:>8.1f} "
                     f"{r['host_gib_per_node']:>9.1f} "
                     f"{r['seconds']:>11.3f}")
    if not fitting:
        lines += ["", "nothing fits: the rows above are the smallest-time layouts, all over the budget"]
        return "\n".join(lines)
    best = fitting[0]
    lines += ["", f"chosen: {best['layout'].describe()}",
              f"  {command_for(model_flags, best, cluster, written or 'plan.json')}"]
    if written:
        lines.append(f"  wrote its DeepSpeed JSON to {written}")
    else:  # the command names a file: say how to get it, rather than leave the user to copy it out
        lines += ["  plan.json (add --write-plan plan.json to have it written):",
                  "  " + json.dumps(best["ds_config"], indent=2).replace("\n", "\n  ")]
    return "\n".join(lines)
