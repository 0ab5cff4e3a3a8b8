"""Pipeline assembly: the LayerSpec list partitioned into a DeepSpeed PipelineModule.

Each rank builds only the layers of its own stage. The tied embedding lives on the first
and last stage; DeepSpeed all-reduces its gradient across the two and broadcasts it from
the first stage after a load.
"""
from __future__ import annotations

import inspect
import re

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime import utils as ds_utils

from gptx.config import Config
from gptx.errors import ConfigError
from gptx.model.flops import layer_flops_per_token
from gptx.model.fused_loss import FusedLMLoss
from gptx.model.gpt import layer_specs, lm_loss
from gptx.model.layers import Block
from gptx.parallel.ds_config import precision, zero_stage
from gptx.parallel.zero_bubble import WeightGradStore, defer_weight_grads

# Only blocks are recomputed under activation checkpointing: the embedding's input
# (token ids) has no gradient, and the head is cheap to keep.
CHECKPOINTABLE_LAYERS = ["Block"]


def checkpoint_chunks(is_block: list[bool], interval: int) -> list[tuple[int, int, bool]]:
    """How activation checkpointing runs a stage's layers (or the whole model's): (start, end,
    recomputed in backward) ranges. The blocks alone are cut into chunks of `interval`, from the
    first block; the layers before and after them (embeddings, final norm, head) run as they are."""
    blocks = [i for i, block in enumerate(is_block) if block]
    if not interval or not blocks:
        return [(0, len(is_block), False)]
    first, end = blocks[0], blocks[-1] + 1
    chunks = [(0, first, False)] + [(i, min(i + interval, end), True) for i in range(first, end, interval)]
    return [(start, stop, recomputed) for start, stop, recomputed in chunks + [(end, len(is_block), False)]
            if stop > start]


def recompute_in_backward(function, *args):
    # Non-reentrant checkpointing needs no DeepSpeed RNG tracker set-up and works with
    # inputs that do not require grad.
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


class GPTPipe(PipelineModule):
    """PipelineModule with allocation-free parameter counting, a 'compute' partition, and activation
    checkpointing of blocks alone (forward).

    DeepSpeed's 'parameters' partitioning builds every layer of the whole model, one at a
    time, on every rank just to count parameters. Building on the meta device gives the
    same counts with no memory, so a 175B model partitions instantly. DeepSpeed has no hook
    for other splits, so 'compute' replaces the partitioning step; the other methods stay
    DeepSpeed's own. The class name must not be 'GPT2ModelPipe': DeepSpeed's engine takes
    that name to mean "inputs carry an attention mask".
    """

    def __init__(self, *args, compute_weights: list[float] | None = None, **kwargs):
        self._compute_weights = compute_weights
        super().__init__(*args, **kwargs)

    def forward(self, forward_input):
        """DeepSpeed's forward, with activation checkpointing cut as checkpoint_chunks says. DeepSpeed
        cuts all of a stage's layers from its first one, and runs a chunk that holds an embedding, the
        final norm or the head without recomputation: the blocks in it kept all their activations
        (defect 11, gptx/parallel/engine.py)."""
        if not self.activation_checkpoint_interval:
            return super().forward(forward_input)
        self.micro_offset += 1  # as DeepSpeed's forward counts micro-batches
        funcs = self.forward_funcs
        x = forward_input
        for start, end, recomputed in checkpoint_chunks([type(f).__name__ in CHECKPOINTABLE_LAYERS for f in funcs],
                                                         self.activation_checkpoint_interval):
            run = run_layers(funcs[start:end])
            x = self.activation_checkpoint_func(run, x) if recomputed else run(x)
        return x

    def _count_layer_params(self):
        return count_layer_params(self._layer_specs)

    def _partition_layers(self, method="uniform"):
        if method.lower() != "compute":
            return super()._partition_layers(method=method)
        self.parts = ds_utils.partition_balanced(weights=self._compute_weights, num_parts=self.num_stages)
        if self.global_rank == 0:
            print_layout(self._layer_specs, self.parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


def run_layers(layers):
    """One function that runs `layers` in order (a chunk to recompute in backward)."""
    def run(x):
        for layer in layers:
            x = layer(x)
        return x
    return run


def layer_name(spec: LayerSpec) -> str:
    return spec.typename.__name__


def print_layout(specs: list[LayerSpec], parts: list[int]) -> None:
    """The layout in the shape of DeepSpeed's own start-up print."""
    for stage in range(len(parts) - 1):
        print(f"stage={stage} layers={parts[stage + 1] - parts[stage]}")
        for idx in range(parts[stage], parts[stage + 1]):
            print(f"    {idx:2d}: {layer_name(specs[idx])}")


def partition(specs: list[LayerSpec], method: str, num_stages: int, compute_weights: list[float]) -> list[int]:
    """Stage boundaries, by the same algorithm and inputs as PipelineModule (plus 'compute')."""
    return [int(x) for x in _partition(specs, method.lower(), num_stages, compute_weights)]


def _partition(specs, method, num_stages, compute_weights):
    if method == "uniform":
        return ds_utils.partition_uniform(num_items=len(specs), num_parts=num_stages)
    if method == "parameters":
        return ds_utils.partition_balanced(weights=count_layer_params(specs), num_parts=num_stages)
    if method == "compute":
        return ds_utils.partition_balanced(weights=compute_weights, num_parts=num_stages)
    if method.startswith("type:"):  # as DeepSpeed reads it: lower-cased, cut at a second ':', ignoring case
        if method.count(":") > 1:
            raise ConfigError(f"--partition-method '{method}': DeepSpeed cuts the regex at ':'; write it without one")
        try:
            pattern = re.compile(method.split(":")[1], re.IGNORECASE)
        except re.error as e:
            raise ConfigError(f"--partition-method '{method}': not a regular expression ({e})") from None
        binary = [1 if pattern.search(layer_name(spec)) else 0 for spec in specs]
        if not any(binary):
            raise ConfigError(f"--partition-method '{method}': no layer class matches; classes are "
                              + ", ".join(sorted({layer_name(s) for s in specs})))
        return ds_utils.partition_balanced(weights=binary, num_parts=num_stages)
    raise ConfigError(f"--partition-method '{method}': expected parameters, uniform, compute or type:REGEX")


def count_layer_params(specs: list[LayerSpec]) -> list[int]:
    return [_count_spec(spec)[0] for spec in specs]


def largest_layer_params(specs: list[LayerSpec]) -> list[int]:
    """Each layer's largest single parameter (numel): DeepSpeed sizes some buffers by it."""
    return [_count_spec(spec)[1] for spec in specs]


def unique_param_count(cfg) -> int:
    """The model's parameters, a tied embedding counted once (ModelConfig in, meta device builds)."""
    tied_copy = cfg.padded_vocab_size * cfg.n_embd if cfg.tie_embeddings else 0
    return sum(count_layer_params(layer_specs(cfg, seed=0))) - tied_copy


_SPEC_COUNTS: dict = {}


def _count_spec(spec: LayerSpec) -> tuple[int, int, int, int]:
    """(parameters, largest parameter, matrices, vectors) of one spec, built on the meta device;
    equal specs (every block) are built once."""
    try:
        key = (spec.typename, spec.module_args, tuple(sorted(spec.module_kwargs.items())))
        hash(key)
    except TypeError:
        key = None
    if key is not None and key in _SPEC_COUNTS:
        return _SPEC_COUNTS[key]
    with torch.device("meta"):
        module = spec.build()
    params = [p for p in module.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    matrices = sum(p.dim() >= 2 for p in params)
    counts = (sum(sizes), max(sizes, default=0), matrices, len(params) - matrices)
    if key is not None:
        _SPEC_COUNTS[key] = counts
    return counts


SPLIT_BY_BLOCKS = "use --partition-method type:block, or fewer stages"
"""What a layout stage_problem finds fault with takes instead: the embedding and the head beside blocks."""


def stage_problem(specs: list[LayerSpec], parts: list[int], ds_config: dict) -> str | None:
    """Why DeepSpeed's optimizer cannot step one of these stages (defect 13 in gptx/parallel/engine.py).

    ZeRO-1 (fp32 or fp16) and fp16's unfused optimizer (torch_adam, no ZeRO) all-reduce a gradient
    norm per optimizer group with parameters: a stage without a matrix or without a vector (gptx's
    two groups, engine.param_groups) takes part in fewer, and the stages wait on each other forever.
    DeepSpeed's bf16 optimizer leaves the tied head's copy out of its norm and stops on a stage that
    holds nothing else. No optimizer steps a stage without parameters.
    """
    kind = precision(ds_config)
    torch_adam = ((ds_config.get("optimizer") or {}).get("params") or {}).get("torch_adam")
    per_group = (zero_stage(ds_config) >= 1 and kind != "bf16") or (kind == "fp16" and torch_adam
                                                                    and not zero_stage(ds_config))
    for stage in range(len(parts) - 1) if len(parts) > 2 else ():
        layers = specs[parts[stage]:parts[stage + 1]]
        counts = [_count_spec(spec) for spec in layers]
        held = f"stage {stage} would hold only {', '.join(layer_name(spec) for spec in layers)}"
        own = sum(c[0] for spec, c in zip(layers, counts) if stage == 0 or not isinstance(spec, TiedLayerSpec))
        if not sum(c[0] for c in counts):
            return f"{held}, which has no parameters for an optimizer to step"
        if kind == "bf16" and not own:
            return f"{held}, the tied head, which DeepSpeed's bf16 optimizer leaves out of its norm and stops on"
        if per_group and not (sum(c[2] for c in counts) and sum(c[3] for c in counts)):
            return (f"{held}: no {'vector (bias, norm gain)' if sum(c[2] for c in counts) else 'matrix'}, "
                    f"and DeepSpeed's {'ZeRO' if zero_stage(ds_config) else 'fp16'} optimizer would then wait "
                    f"forever at the gradient norm")
    return None


def layer_compute_weights(cfg: Config, specs: list[LayerSpec]) -> list[float]:
    """Per-layer weights of the 'compute' partition: model FLOPs per token."""
    return [layer_flops_per_token(spec, cfg.model) for spec in specs]


def build_pipeline(cfg: Config, seed: int | None = None, ds_config: dict | None = None) -> GPTPipe:
    """The PipelineModule for this rank (torch.distributed must be initialized); with the run's
    DeepSpeed JSON, a layout its optimizer cannot step is refused first (stage_problem)."""
    t = cfg.train
    # Fused: the head hands (hidden, weight) to the loss, which DeepSpeed calls on the last stage
    # with the last layer's outputs; those are never sent to another stage.
    specs = layer_specs(cfg.model, t.seed if seed is None else seed, fused_loss=t.fused_loss)
    # Also one line when a type: regex matches no layer, not DeepSpeed's RuntimeError.
    parts = partition(specs, t.partition_method, t.pipe_parallel_size, layer_compute_weights(cfg, specs))
    problem = stage_problem(specs, parts, ds_config) if ds_config is not None else None
    if problem:
        raise ConfigError(f"--partition-method {t.partition_method} on {t.pipe_parallel_size} stages: {problem}; "
                          f"{SPLIT_BY_BLOCKS}")
    pipe = GPTPipe(
        layers=specs,
        compute_weights=layer_compute_weights(cfg, specs),
        num_stages=t.pipe_parallel_size,
        loss_fn=FusedLMLoss(cfg.model.vocab_size) if t.fused_loss else lm_loss,
        partition_method=t.partition_method,
        activation_checkpoint_interval=t.activation_checkpoint_interval,
        activation_checkpoint_func=recompute_in_backward,
    )
    if t.compile_blocks:
        # ZB-H1's split linear layers run between the graphs (zero_bubble.deferred_linear).
        compile_blocks(pipe.forward_funcs, whole=t.pipeline_schedule != "zb-h1")
    if t.pipeline_schedule == "zb-h1":
        pipe.weight_grad_store = WeightGradStore()
        defer_weight_grads(pipe.forward_funcs, pipe.weight_grad_store)
    return pipe


# The compiler compile_blocks uses: tests that only count graphs or check plumbing swap in a
# backend that runs dynamo's graphs as captured, with the same tracing and guards, no codegen.
COMPILE_BACKEND = "inductor"
# Compiled entries are cached per code object, and every Block of every model in the process
# shares Block.forward's. The guards do not tell two blocks of one model apart, so a run needs
# only a handful of entries (docs/performance.md); the margin is for processes that build many
# models (tests, notebooks, a benchmark's several engines) before dynamo would stop compiling.
COMPILE_RECOMPILE_LIMIT = 64


def compile_blocks(layers, backend=None, whole: bool = True) -> int:
    """torch.compile every Block's forward in place; returns how many. The other layers stay
    eager (small, or tied across stages).

    The forward, not the module call, is compiled, so module hooks (ZeRO-3's parameter
    gathering) run eagerly around the graph. `whole` (fullgraph): a block that does not trace
    whole, or that would need more entries than the limit, raises instead of running eager
    unnoticed. Without it a block compiles into the graphs between the calls that stay eager.
    """
    options = dict(backend=backend or COMPILE_BACKEND, fullgraph=whole)
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        options["recompile_limit"] = COMPILE_RECOMPILE_LIMIT
    else:  # where torch.compile takes no recompile_limit, only the process-wide setting exists
        dynamo = torch._dynamo.config
        name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        setattr(dynamo, name, max(getattr(dynamo, name), COMPILE_RECOMPILE_LIMIT))
    count = 0
    for layer in layers:
        if isinstance(layer, Block):
            layer.forward = torch.compile(layer.forward, **options)
            count += 1
    return count


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process so far (every torch.compile, not only blocks')."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def stage_param_counts(module: PipelineModule) -> list[int]:
    """Parameters held by each stage (a tied embedding counts on both end stages)."""
    mine = sum(p.numel() for p in module.parameters())
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, (module.stage_id, mine))
    per_stage: dict[int, int] = {}
    for stage, n in counts:
        per_stage[stage] = n
    return [per_stage[s] for s in sorted(per_stage)]


def tied_weight_max_diff(module: PipelineModule) -> float:
    """Largest elementwise difference between the copies of each tied weight (0 when in sync)."""
    worst = torch.zeros(1)
    for weight, group in module.get_tied_weights_and_groups():
        reference = weight.detach().clone()
        ranks = dist.get_process_group_ranks(group)
        dist.broadcast(reference, src=min(ranks), group=group)
        worst = torch.maximum(worst, (weight.detach() - reference).abs().max().float().cpu().reshape(1))
    worst = worst.to(next(module.parameters()).device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()
