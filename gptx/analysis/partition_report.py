"""Plan a pipeline before launching it: layout, parameters, memory, bubble and balance per stage.

Nothing is allocated: parameters are counted on the meta device and the rest is arithmetic,
so every preset, 175B included, reports in seconds on a laptop. The layout comes from the
same function and inputs as the engine's partitioning (`gptx.parallel.pipeline.partition`).
"""
from __future__ import annotations

from dataclasses import dataclass

from gptx.config import Config, ModelConfig
from gptx.errors import ConfigError
from gptx.model.flops import layer_flops_per_token
from gptx.model.fused_loss import chunk_positions
from gptx.model.gpt import layer_specs
from gptx.parallel.ds_config import BatchLayout, names_fp32, offload_devices
from gptx.parallel.ds_config import precision as ds_precision
from gptx.parallel.ds_config import zero_stage
from gptx.parallel.pipeline import (CHECKPOINTABLE_LAYERS, checkpoint_chunks, count_layer_params, largest_layer_params,
                                    layer_name, partition, stage_problem)
from gptx.parallel.zero_bubble import bubble_fraction, compute_order

GiB = 1024 ** 3
# Bytes per parameter: (weights, gradients, optimizer states before ZeRO-1 sharding).
# fp32: Adam's two moments. fp16: fp32 master copy + two moments. bf16 (ZeRO-1 with fp32
# gradient accumulation, as gptx requires of the pipeline): the same plus an fp32 gradient buffer.
PARAM_BYTES = {"fp32": (4, 4, 8), "fp16": (2, 2, 12), "bf16": (2, 2 + 4, 12)}


@dataclass(frozen=True)
class MemoryModel:
    precision: str
    layout: BatchLayout
    zero_stage: int
    checkpoint_interval: int
    offload_optimizer: str = "none"
    offload_param: str = "none"
    reduce_bucket_size: int = 500_000_000
    """zero_optimization.reduce_bucket_size (DeepSpeed's default)."""
    pipeline: bool = True
    """The pipeline engine (False: gptx's no-pipeline mode, DeepSpeed's plain engine)."""
    overlap_comm: bool | None = None
    """zero_optimization.overlap_comm; None is DeepSpeed's default (on for ZeRO-3 only)."""
    grad_accum_fp32: bool = False
    """data_types.grad_accum_dtype is fp32."""
    max_reuse_distance: int = 1_000_000_000
    """zero_optimization.stage3_max_reuse_distance (DeepSpeed's default)."""
    prefetch_bucket_size: int = 50_000_000
    """zero_optimization.stage3_prefetch_bucket_size (DeepSpeed's default)."""
    contiguous_gradients: bool = True
    """zero_optimization.contiguous_gradients (DeepSpeed's default); without it, no buckets."""
    touched_only: bool = False
    """Count DeepSpeed's preallocated buckets only as far as they are written: what a CPU's
    resident memory shows. A GPU's allocator (and the bytes allocated) count them whole."""
    fused_loss: bool = False
    """train.fused_loss: the head and the loss in chunks of positions (gptx/model/fused_loss.py)."""
    schedule: str = "1f1b"
    """train.pipeline_schedule: under zb-h1 stage s also keeps what up to s micro-batches' W needs."""
    fused_adam: bool = True
    """DeepSpeed builds its FusedAdam (optimizer Adam or AdamW without torch_adam); fp16 without ZeRO then
    runs FP16_Optimizer, other optimizers FP16_UnfusedOptimizer."""

    @property
    def act_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2


def head_loss_bytes(positions: int, C: int, V: int, act_bytes: int, fused: bool, held_logits: int = 0) -> int:
    """The most the head and the loss hold at once for one micro-batch on the last stage (1F1B runs
    its backward right after its forward). Unfused, the peak is in the loss's backward: 4 bytes per
    logit each for cross_entropy's fp32 log-probabilities (saved for backward), the gradient nll_loss
    gives them and the one log_softmax's backward makes from it; forward's peak is lower (in 16 bits
    the logits' fp32 copy is freed once the log-probabilities exist). The logits themselves are
    freed after forward unless something keeps them: `held_logits` micro-batches' of them, in the
    model's dtype (see held_logits). Fused (gptx/model/fused_loss.py): one chunk's fp32 logits and,
    in 16-bit, its gradient's copy, plus the fp32 gradients of the table and the hidden states, all
    made in forward."""
    if not fused:
        return positions * V * (4 + 4 + 4 + held_logits * act_bytes)
    rows = min(positions, chunk_positions(V))
    return rows * V * (4 + (act_bytes if act_bytes != 4 else 0)) + V * C * 4 + positions * C * 4


def held_logits(mem: MemoryModel) -> int:
    """Micro-batches whose logits the last stage keeps: DeepSpeed's pipeline engine stores each
    forward's outputs in one of max(2, p - s) buffers (2 on the last stage) and, there, never
    clears them after the backward, so they stay until a later micro-batch's forward replaces
    them, through the step and into the next. Without a pipeline nothing keeps them."""
    return min(2, mem.layout.grad_accum) if mem.pipeline and not mem.fused_loss else 0


def block_activation_bytes(model: ModelConfig, act_bytes: int) -> float:
    """Bytes one decoder block keeps for backward per token of a micro-batch (fused attention,
    which keeps no T x T scores; the explicit score path adds those in stage_memory).

    Each norm keeps its input (RMSNorm: its fp32 copy and the normalized values, since it
    normalizes in fp32); each branch keeps its input (the norm's output); attention keeps the
    q/k/v projection (n_embd + 2 x kv heads x head size wide), rotary's rotated q and k and
    its angle tables, its output, the output's copy that the projection reads (a kernel whose
    output is already in that layout spares it) and a log-sum-exp per head; the MLP keeps GELU's
    input and output (2 H), or SwiGLU's gate and up (2 H), silu(gate) and the product (4 H);
    ReZero gates keep their branch's output.
    GPT-2's block: 17 x n_embd values. Not counted: ALiBi's (n_head, T, T) mask and what the
    attention kernel that takes it keeps, and, on a GPU in fp32 or under a mask, grouped-query
    attention's keys and values repeated to n_head heads (gptx.model.layers.shared_kv_kernel)."""
    C, H, kv = model.n_embd, model.ffn_hidden, model.kv_heads * model.head_dim
    rezero = model.norm == "rezero"
    mlps = 2 if model.macaron else 1
    branches = mlps + 1
    norms = 0 if rezero else (1 if model.residual == "parallel" else branches)
    norm = (4 * C + C * act_bytes) if model.norm == "rmsnorm" else C * act_bytes
    inputs = (1 if model.residual == "parallel" else branches) * C * act_bytes
    attention = (C + 2 * kv) * act_bytes + 2 * C * act_bytes + 4 * model.n_head
    if model.position_embedding == "rotary":  # rotated q and k, and cos/sin tables (counted as if batch 1)
        attention += (C + kv) * act_bytes + 2 * model.head_dim * act_bytes
    mlp = (4 if model.mlp == "swiglu" else 2) * H * act_bytes
    gates = branches * C * act_bytes if rezero else 0
    return norms * norm + inputs + attention + mlps * mlp + gates


def stage_memory(model: ModelConfig, specs, parts: list[int], stage: int, params: int, mem: MemoryModel,
                 layer_params: list[int] | None = None, largest_params: list[int] | None = None) -> dict:
    """Estimated bytes one rank of `stage` holds at its peak under the 1F1B schedule.

    The buffers are DeepSpeed 0.19.8's (runtime/zero/stage_1_and_2.py, stage3.py), read from
    its source and checked against the bytes a CPU run allocates (gptx/analysis/strategies.py)."""
    p = len(parts) - 1
    w, g, opt = PARAM_BYTES[mem.precision]
    if mem.precision == "bf16" and not mem.grad_accum_fp32:
        g = 2  # gradients accumulate in bf16: no fp32 buffer
    dp = mem.layout.dp_size
    # ZeRO-1 shards the optimizer states over the data-parallel ranks, ZeRO-2 also the
    # gradients, ZeRO-3 also the weights (gathering each layer's in full while it runs).
    opt = opt / dp if mem.zero_stage >= 1 else opt
    g = g / dp if mem.zero_stage >= 2 else g
    w_held = w / dp if mem.zero_stage >= 3 else w
    in_flight, full, ckpt, recompute = stage_activations(model, specs, parts, stage, mem)
    counts = layer_params or count_layer_params(specs)
    largest = max((largest_params or largest_layer_params(specs))[parts[stage]:parts[stage + 1]], default=0)
    gathered = zero3_gathered_bytes(specs, parts, stage, counts, mem, w) if mem.zero_stage >= 3 else 0
    # The logits are as wide as the table (padding columns included).
    positions, V = mem.layout.micro_batch * model.seq_len, model.padded_vocab_size
    last = stage == p - 1
    logits = head_loss_bytes(positions, model.n_embd, V, mem.act_bytes, mem.fused_loss, held_logits(mem)) if last else 0
    held = positions * V * mem.act_bytes * held_logits(mem) if last else 0  # alive at the step too
    weights, grads, states = int(params * w_held), int(params * g), int(params * opt)
    # bf16 with fp32 gradient accumulation under ZeRO-1 runs DeepSpeed's BF16_Optimizer, which
    # keeps its own fp32 gradients (in PARAM_BYTES) and no reduction buckets.
    bf16_optimizer = (mem.precision == "bf16" and mem.zero_stage == 1 and mem.grad_accum_fp32
                      and mem.offload_optimizer == "none")
    if mem.zero_stage >= 1:
        # DeepSpeed's ZeRO optimizers step an fp32 shard of the weights (a copy also when the
        # model is fp32; mixed precision counts it in its 12 bytes) from an fp32 gradient shard
        # (BF16_Optimizer's is a slice of its fp32 accumulation buffer, already in its gradient bytes).
        states += int(params * (4 if mem.precision == "fp32" else 0) / dp)
        states += int(params * 4 / dp) if not bf16_optimizer else 0
    in_backward, at_reduction = reduction_buffer_bytes(mem, params, w, bf16_optimizer)
    if mem.precision == "fp16" and mem.zero_stage == 0:
        # The step's fp32 gradients (runtime/fp16/): FP16_Optimizer casts each parameter's and
        # flattens the casts into one buffer, both alive at once; FP16_UnfusedOptimizer keeps the casts.
        at_reduction += params * (8 if mem.fused_adam else 4)
    host = 0
    if mem.offload_optimizer != "none":
        # The states and the fp32 gradient shard DeepSpeed's CPU Adam reads live on the host.
        host += states
        states = 0
        if mem.zero_stage == 3:  # and its gradient accumulation buffer, a second copy of the shard
            host += grads
            grads = 0
        else:
            # A host copy of the 16-bit weight shard to send back, and two buffers the size of the
            # largest parameter for gradients in transit (one on the device, an unused one on the host).
            host += int(params * w / dp) + largest * w
            in_backward += largest * w
            at_reduction += largest * w
    if mem.offload_param != "none":
        host += weights
        weights = 0
    weights += gathered
    device = weights + grads + states
    deferred = deferred_bytes(model, specs, parts, stage, mem)
    out = {"weights": weights, "gradients": grads, "optimizer_states": states, "buffers": at_reduction,
           "activations": in_flight * full + deferred,
           "activations_checkpointed": in_flight * ckpt + recompute + deferred,
           "logits": logits, "micro_batches_in_flight": in_flight, "host": host}
    # The peak is in a step's backward: at its start (the loss's backward, every activation kept), or,
    # with checkpointing, while a chunk is recomputed; or at the gradient reduction and step, after
    # the activations are freed. The logits the engine keeps are alive at all three.
    at_step = at_reduction + held
    out["total"] = device + max(in_backward + out["activations"] + logits, at_step)
    out["total_checkpointed"] = device + max(in_backward + in_flight * ckpt + deferred + logits,
                                             in_backward + out["activations_checkpointed"] + held, at_step)
    return out


def deferred_micro_batches(stages: int, micro_batches: int, stage: int) -> int:
    """The most micro-batches whose W still waits when a backward starts on `stage` under ZB-H1,
    replayed from the schedule's own instructions: s for stage s with at least as many micro-batches
    as stages (it leaves its first s W's for later), fewer with fewer."""
    waiting = most = 0
    for kind in compute_order("zb-h1", stages, micro_batches, stage):
        if kind == "B":
            most = max(most, waiting)
        waiting += {"B": 1, "W": -1}.get(kind, 0)
    return most


def deferred_bytes(model: ModelConfig, specs, parts: list[int], stage: int, mem: MemoryModel) -> int:
    """What the ZB-H1 store (gptx/parallel/zero_bubble.py) keeps on one rank of `stage` for the Ws
    still waiting: each decoder block linear layer's input and output gradient, and, for an untied
    head without the fused loss, the head's input and its (B, T, V) logits' gradient."""
    if mem.schedule != "zb-h1" or not mem.pipeline:
        return 0
    names = [layer_name(specs[i]) for i in range(parts[stage], parts[stage + 1])]
    tokens = mem.layout.micro_batch * model.seq_len
    per_micro_batch = names.count("Block") * deferred_weight_grad_bytes(model, tokens, mem.act_bytes)
    if "LMHead" in names and not mem.fused_loss:
        per_micro_batch += tokens * (model.n_embd + model.padded_vocab_size) * mem.act_bytes
    return deferred_micro_batches(len(parts) - 1, mem.layout.grad_accum, stage) * per_micro_batch


def deferred_weight_grad_bytes(model: ModelConfig, tokens: int, act_bytes: int) -> int:
    """What one decoder block keeps of a micro-batch for its W under ZB-H1 (gptx/parallel/zero_bubble.py):
    each linear layer's input and output gradient."""
    C, H, kv = model.n_embd, model.ffn_hidden, model.kv_heads * model.head_dim
    fc_out = 2 * H if model.mlp == "swiglu" else H
    per_token = (C + C + 2 * kv) + (C + C) + (1 + model.macaron) * ((C + fc_out) + (H + C))
    return tokens * per_token * act_bytes


def stage_activations(model: ModelConfig, specs, parts: list[int], stage: int,
                      mem: MemoryModel) -> tuple[int, int, int, int]:
    """(micro-batches in flight, activation bytes one keeps without and with checkpointing, the most
    bytes one micro-batch's backward holds above what it keeps checkpointed, while it recomputes a
    chunk) on one rank of `stage` under 1F1B."""
    p = len(parts) - 1
    b, T, C = mem.layout.micro_batch, model.seq_len, model.n_embd
    names = [layer_name(specs[i]) for i in range(parts[stage], parts[stage + 1])]
    in_flight = min(p - stage, mem.layout.grad_accum)  # stage s of p holds up to p - s micro-batches
    btc = b * T * C * mem.act_bytes
    stage_input = b * T * 8 if stage == 0 else btc  # token ids, or the hidden states received
    per_block = int(b * T * block_activation_bytes(model, mem.act_bytes))
    if model.attention_topk is not None or model.residual_attention:
        # The explicit score path keeps T x T per head: fp32 probabilities, their cast, the scores.
        per_block += b * model.n_head * T * T * (4 + 2 * mem.act_bytes)
    if model.residual_attention and stage > 0:
        stage_input += b * model.n_head * T * T * mem.act_bytes  # scores arrive with the hidden states

    def chunk_bytes(chunk: list[str]) -> int:  # other layers keep their input (norms, position add, head)
        return sum(per_block if name == "Block" else btc for name in chunk)
    full = stage_input + chunk_bytes(names)
    # Checkpointed, a chunk keeps only its input. Backward goes through the chunks last to first,
    # freeing each one's activations before it recomputes the one before it, beside its input and
    # its output's gradient.
    ckpt, recompute = stage_input, 0
    for start, end, recomputed in checkpoint_chunks([name in CHECKPOINTABLE_LAYERS for name in names],
                                                     mem.checkpoint_interval or 1):
        chunk = names[start:end]
        if recomputed:
            recompute = max(recompute, ckpt + 2 * btc + chunk_bytes(chunk))
        ckpt += btc if recomputed else chunk_bytes(chunk)
    return in_flight, full, ckpt, max(0, recompute - ckpt)


def zero3_gathered_bytes(specs, parts: list[int], stage: int, counts: list[int], mem: MemoryModel, w: float) -> int:
    """Bytes of full weights that ZeRO-3 holds gathered on one rank of `stage`.

    DeepSpeed keeps a parameter gathered when its next use comes within
    stage3_max_reuse_distance elements, so a stage of under half that many stays gathered whole
    from forward to backward; a larger one keeps about that many. With one data-parallel rank
    the shard is the whole parameter and nothing is gathered, unless it is offloaded (copied to
    the device to run, even unsharded)."""
    held, seen = [], set()
    for i in range(parts[stage], parts[stage + 1]):
        key = getattr(specs[i], "key", i)  # a tied module is gathered once
        if key not in seen:
            seen.add(key)
            held.append(counts[i])
    kept = min(sum(held), mem.max_reuse_distance // 2 + sum(sorted(held)[-2:]))
    return int(kept * w) if mem.layout.dp_size > 1 or mem.offload_param != "none" else 0


def reduction_buffer_bytes(mem: MemoryModel, params: int, w: float, bf16_optimizer: bool) -> tuple[int, int]:
    """Bytes of gradient-reduction buffers during backward and at the reduction.

    Buckets are torch.empty(reduce_bucket_size) each, however small the model. ZeRO-1/2
    allocate one at a step's first gradient and free it after the reduction (a second with
    overlap_comm, written only once the first is full); the pipeline engine appends another, in
    the model's type, for the reduction itself. ZeRO-3 keeps one for the whole run. Without
    contiguous_gradients there are none."""
    bucket = min(mem.reduce_bucket_size, params) if mem.touched_only else mem.reduce_bucket_size
    spare = 0 if mem.touched_only else bucket  # allocated, but not written to for a stage below its size
    overlap = mem.overlap_comm if mem.overlap_comm is not None else mem.zero_stage == 3
    in_backward = at_reduction = 0
    if not mem.contiguous_gradients:
        pass
    elif mem.zero_stage in (1, 2) and not bf16_optimizer:
        width = 4 if mem.precision == "fp32" or (mem.zero_stage == 1 and mem.grad_accum_fp32) else 2
        in_backward = bucket * width + (spare * width if overlap and not mem.pipeline else 0)
        at_reduction = in_backward + (spare * mem.act_bytes if mem.pipeline else 0)
    elif mem.zero_stage == 3:
        in_backward = at_reduction = bucket * mem.act_bytes
    if mem.zero_stage == 3 and mem.layout.dp_size > 1:  # a prefetch gathers up to prefetch_bucket_size elements
        in_backward += int(min(mem.prefetch_bucket_size, params) * w)
    return in_backward, at_reduction


def _max_over_mean(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return max(values) / mean if mean else 1.0


def _stage_params(specs, params: list[int], parts: list[int], stage: int) -> int:
    """What one stage holds: a tied module appearing twice in the stage is held once."""
    seen, total = set(), 0
    for i in range(parts[stage], parts[stage + 1]):
        key = getattr(specs[i], "key", None)
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        total += params[i]
    return total


def _stage_sums(weights: list[float], parts: list[int]) -> list[float]:
    return [sum(weights[parts[s]:parts[s + 1]]) for s in range(len(parts) - 1)]


def _count(zero: dict, key: str, default: int) -> int:
    value = zero.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"zero_optimization.{key}: expected a number of elements, got {value!r}")
    return int(value)


def _flag(zero: dict, key: str, default):
    value = zero.get(key, default)
    if value is not default and not isinstance(value, bool):
        raise ConfigError(f"zero_optimization.{key}: expected true or false, got {value!r}")
    return value


def _builds_fused_adam(ds_config: dict) -> bool:
    """DeepSpeed's engine builds FusedAdam for Adam and AdamW unless optimizer.params.torch_adam."""
    optimizer = ds_config.get("optimizer") or {}
    torch_adam = (optimizer.get("params") or {}).get("torch_adam", False)
    return str(optimizer.get("type", "")).lower() in ("adam", "adamw") and not torch_adam


def partition_report(cfg: Config, pipe_size: int, method: str, ds_config: dict, layout: BatchLayout,
                     layer_params: list[int] | None = None, touched_only: bool = False) -> dict:
    """`layer_params`: count_layer_params of the model's specs, when the caller already has them.
    `touched_only`: see MemoryModel (a CPU run's resident memory)."""
    m = cfg.model
    specs = layer_specs(m, seed=0)
    params = layer_params or count_layer_params(specs)
    flops = [layer_flops_per_token(spec, m) for spec in specs]
    pipelined = pipe_size > 0
    # No pipeline: the whole list is one "stage", one micro-batch in flight.
    parts = partition(specs, method, pipe_size, flops) if pipelined else [0, len(specs)]
    n_stages = max(pipe_size, 1)
    zero = zero_stage(ds_config)
    offload_optimizer, offload_param = offload_devices(ds_config)
    zero_section = ds_config.get("zero_optimization") or {}
    mem = MemoryModel(ds_precision(ds_config), layout, zero, cfg.train.activation_checkpoint_interval,
                      offload_optimizer, offload_param,
                      reduce_bucket_size=_count(zero_section, "reduce_bucket_size", 500_000_000),
                      pipeline=pipelined, overlap_comm=_flag(zero_section, "overlap_comm", None),
                      grad_accum_fp32=names_fp32((ds_config.get("data_types") or {}).get("grad_accum_dtype")),
                      max_reuse_distance=_count(zero_section, "stage3_max_reuse_distance", 1_000_000_000),
                      prefetch_bucket_size=_count(zero_section, "stage3_prefetch_bucket_size", 50_000_000),
                      contiguous_gradients=_flag(zero_section, "contiguous_gradients", True),
                      touched_only=touched_only, fused_loss=cfg.train.fused_loss,
                      schedule=cfg.train.pipeline_schedule, fused_adam=_builds_fused_adam(ds_config))
    largest = largest_layer_params(specs)
    stage_params = [_stage_params(specs, params, parts, s) for s in range(n_stages)]
    stages = []
    for s in range(n_stages):
        layers = [{"index": i, "name": layer_name(specs[i]), "params": params[i], "flops_per_token": flops[i]}
                  for i in range(parts[s], parts[s + 1])]
        stages.append({"stage": s, "params": int(stage_params[s]), "layers": layers,
                       "flops_per_token": sum(flops[parts[s]:parts[s + 1]]),
                       "memory_bytes": stage_memory(m, specs, parts, s, int(stage_params[s]), mem, params, largest)})
    micro = layout.grad_accum
    methods = {}
    for name in ("parameters", "compute") if pipelined else ():
        alt = partition(specs, name, pipe_size, flops)
        alt_params = [_stage_params(specs, params, alt, s) for s in range(n_stages)]
        methods[name] = {"parts": alt, "params_max_over_mean": _max_over_mean(alt_params),
                         "compute_max_over_mean": _max_over_mean(_stage_sums(flops, alt))}
    total = sum(stage_params)
    unique = sum(params) - (m.padded_vocab_size * m.n_embd if m.tie_embeddings else 0)
    return {
        "model": cfg.name, "pipe_parallel_size": pipe_size, "data_parallel_size": layout.dp_size,
        "partition_method": method, "precision": mem.precision, "zero_stage": zero,
        "offload_optimizer": offload_optimizer, "offload_param": offload_param,
        "micro_batch_size": layout.micro_batch, "micro_batches": micro, "seq_len": m.seq_len,
        "activation_checkpoint_interval": cfg.train.activation_checkpoint_interval,
        "parts": parts, "total_params": total, "unique_params": unique,
        "stages": stages,
        "pipeline_schedule": cfg.train.pipeline_schedule,
        "bubble_fraction": bubble_fraction(cfg.train.pipeline_schedule, n_stages, micro) if pipelined else 0.0,
        "balance": {"params_max_over_mean": _max_over_mean(stage_params),
                    "compute_max_over_mean": _max_over_mean([st["flops_per_token"] for st in stages])},
        "methods": methods,
        # What build_pipeline would refuse before training (DeepSpeed defect 13), or None.
        "engine_refuses": stage_problem(specs, parts, ds_config) if pipe_size > 1 else None,
    }
