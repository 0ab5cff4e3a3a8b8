"""No pipeline (--pipe-parallel-size 0): the LayerSpec model as one module under DeepSpeed's
plain engine, data parallel over every rank. This is the mode for ZeRO-2 and ZeRO-3 (with
optimizer and parameter offload), which DeepSpeed's pipeline engine refuses.

The layers are the pipeline's: built from the same specs and seeds, so 1 stage, 2 stages
and this mode start from identical weights, and a checkpoint of this mode holds the same
per-layer files (`layer_XX-model_states.pt`, gathered from ZeRO-3's shards) that every
tool reads. `DataParallelEngine` gives DeepSpeed's plain engine the few pipeline-engine
methods the training loop calls (train_batch, eval_batch, grid, reset_activation_shape),
so the loop, schedule, data, metrics, signals and checkpoints are shared with the pipeline.
"""
from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.distributed as dist

from gptx.config import Config
from gptx.model.fused_loss import FusedLMLoss, hidden_and_head_weight
from gptx.model.gpt import GPT, layer_specs, lm_loss
from gptx.model.layers import Block
from gptx.parallel.ds_config import zero_stage
from gptx.parallel.pipeline import checkpoint_chunks, compile_blocks, recompute_in_backward, run_layers


class SequentialGPT(GPT):
    """The single-device GPT with the pipeline's activation checkpointing: each chunk of
    `checkpoint_interval` blocks keeps only its input and is recomputed in backward. Given
    labels, forward returns the training loss, with train.fused_loss through gptx.model.fused_loss;
    without, logits, as GPT's."""

    def __init__(self, cfg: Config):
        super().__init__(cfg.model, seed=cfg.train.seed)
        self.checkpoint_interval = cfg.train.activation_checkpoint_interval
        self.train_loss = FusedLMLoss(cfg.model.vocab_size) if cfg.train.fused_loss else lm_loss
        self._loss_fns = list(self._forward_fns)
        if cfg.train.fused_loss:
            self._loss_fns[-1] = partial(hidden_and_head_weight, self.head())

    def forward(self, idx: torch.Tensor, caches=None, labels: torch.Tensor | None = None):
        # The loss is taken inside forward: ZeRO-3 holds the head's gathered weight only while the
        # model's forward runs, and the fused loss multiplies by that weight itself.
        if labels is not None:
            return self.train_loss(self._through(self._loss_fns, idx), labels)
        if caches is not None:
            return super().forward(idx, caches)
        return self._through(self._forward_fns, idx)

    def _through(self, fns, idx: torch.Tensor):
        """The layers' functions in order, blocks recomputed in backward as the pipeline's are."""
        n = self.cfg.n_layer
        interval = self.checkpoint_interval if torch.is_grad_enabled() else 0
        x = idx
        for start, end, recomputed in checkpoint_chunks([2 <= i < 2 + n for i in range(len(fns))], interval):
            run = run_layers(fns[start:end])
            x = recompute_in_backward(run, x) if recomputed else run(x)
        return x


class DataParallelGrid:
    """The answers of DeepSpeed's pipeline grid for a world with no pipeline: every rank is a replica."""

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank()

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size()

    def get_data_parallel_group(self):
        return dist.group.WORLD

    def get_pipe_parallel_rank(self) -> int:
        return 0

    def get_pipe_parallel_world_size(self) -> int:
        return 1


class DataParallelEngine:
    """DeepSpeed's plain engine with the pipeline engine's batch interface.

    train_batch() runs one optimizer step over the accumulation steps: forward, loss,
    DeepSpeed's backward (which scales for accumulation and, with ZeRO, for fp16) and step
    (which applies the update at the accumulation boundary). Like the pipeline engine, it
    returns the loss averaged over micro-batches and data-parallel ranks. Everything else
    is the DeepSpeed engine's own.
    """

    def __init__(self, engine):
        self.engine = engine
        self.grid = DataParallelGrid()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def _replica_mean(self, total: torch.Tensor, count: int) -> torch.Tensor:
        mean = total / count
        dist.all_reduce(mean)
        return mean / dist.get_world_size()

    def _micro_batch(self, data_iter):
        inputs, labels = next(data_iter)
        device = self.engine.device
        return inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    def train_batch(self, data_iter) -> torch.Tensor:
        engine = self.engine
        engine.train()
        steps = engine.gradient_accumulation_steps()
        total = torch.zeros((), device=engine.device)
        for _ in range(steps):
            inputs, labels = self._micro_batch(data_iter)
            loss = engine(inputs, labels=labels)
            engine.backward(loss)
            engine.step()
            total += loss.detach().float()
        return self._replica_mean(total, steps)

    @torch.no_grad()
    def eval_batch(self, data_iter, num_micro_batches: int) -> torch.Tensor:
        engine = self.engine
        engine.eval()
        total = torch.zeros((), device=engine.device)
        for _ in range(num_micro_batches):
            inputs, labels = self._micro_batch(data_iter)
            total += engine(inputs, labels=labels).float()
        engine.train()
        return self._replica_mean(total, num_micro_batches)

    def reset_activation_shape(self) -> None:
        """No pipeline buffers to resize: a new sequence length just runs."""


def build_data_parallel_engine(cfg: Config, ds_config: dict, schedule, param_groups) -> DataParallelEngine:
    import deepspeed
    stage3 = zero_stage(ds_config) == 3
    # ZeRO-3 partitions each layer as it is built, so no rank ever holds the whole model.
    init = (deepspeed.zero.Init(config_dict_or_path=zero3_init_config(ds_config, cfg.train.compile_blocks))
            if stage3 else contextlib.nullcontext())
    with init:
        model = SequentialGPT(cfg)
    if stage3:
        _initialize_under_zero3(model, cfg)
    if cfg.train.compile_blocks:
        if stage3:
            _gather_blocks_whole(model)
        compile_blocks(model.layers.values())
    if stage3 and cfg.model.tie_embeddings:
        # The tied head reads the embedding's weight outside the embedding's forward; ZeRO-3
        # gathers it for the whole model's forward instead of only the embedding's.
        deepspeed.zero.register_external_parameter(model, _embedding(model).wte.weight)
    elif stage3 and cfg.train.fused_loss:
        # The fused loss reads the untied head's weight outside LMHead's forward, likewise.
        deepspeed.zero.register_external_parameter(model, model.head().lm_head.weight)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model),
                                           config=ds_config, lr_scheduler=schedule)
    if not (engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization()):
        _keep_fp32_grad_norm(engine)
    return DataParallelEngine(engine)


def zero3_init_config(ds_config: dict, compiled: bool) -> dict:
    """The JSON zero.Init reads. DeepSpeed defect 12 (gptx/parallel/engine.py): its memory-efficient
    linear, which zero.Init puts in place of torch.nn.functional.linear for the whole process,
    trains compiled blocks wrongly under torch 2.11's compiler (another loss from the second step
    on). Compiled, the blocks keep torch's own linear: the block's parameters are gathered whole
    for the block's graph (_gather_blocks_whole), so the wrapper would save no memory there."""
    if not compiled:
        return ds_config
    zero = dict(ds_config.get("zero_optimization") or {}, memory_efficient_linear=False)
    return dict(ds_config, zero_optimization=zero)


def _gather_blocks_whole(model: SequentialGPT) -> None:
    """ZeRO-3 gathers each compiled block's parameters at the block instead of at each of its
    submodules: DeepSpeed's per-submodule hooks are compiler-disabled, so inside the block they
    would break its graph (compile_blocks compiles whole graphs only). Costs one block's
    parameters gathered at a time instead of one linear layer's."""
    from deepspeed.utils import set_z3_leaf_module

    for layer in model.layers.values():
        if isinstance(layer, Block):
            set_z3_leaf_module(layer, True)


def _initialize_under_zero3(model: SequentialGPT, cfg: Config) -> None:
    """Give each layer the pipeline's initial weights. Under zero.Init a submodule's parameters
    are partitioned as soon as it is built, so the in-place init its parent runs afterwards
    lands on empty shards; here each layer is built again on the host, one at a time, and
    copied in through a gather."""
    specs = layer_specs(cfg.model, cfg.train.seed)
    for name, layer in model.layers.items():
        state = specs[int(name)].build().state_dict()
        with _gathered(layer, modifier_rank=0):
            layer.load_state_dict(state)


def _embedding(model: GPT):
    return model.layers["0"]


def _keep_fp32_grad_norm(engine) -> None:
    """DeepSpeed's fp32 clipping without ZeRO is right without a pipeline but discards the
    norm; the same clip here keeps it for the log, as gptx does for the pipeline."""
    def clip():
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        norm = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).pow(2).sum().sqrt()
        coef = torch.clamp(engine.gradient_clipping() / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
        engine._global_grad_norm = norm  # a device tensor: the loop reads it once per step
    engine.clip_fp32_gradients = clip


def _gathered(module: torch.nn.Module, modifier_rank: int | None = None):
    """ZeRO-3: the module's full parameters for the duration of the block (collective); else nothing to do."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def layer_states(engine) -> dict[int, dict[str, torch.Tensor]] | None:
    """Collective: every layer's state, on the host, at rank 0 (None elsewhere)."""
    model = engine.module
    states = {}
    for name, layer in model.layers.items():
        with _gathered(layer):
            if dist.get_rank() == 0:
                states[int(name)] = {k: v.detach().cpu().clone() for k, v in layer.state_dict().items()}
    return states if dist.get_rank() == 0 else None


def load_layer_states(engine, read_layer) -> None:
    """Collective: each layer from `read_layer(index)` (a state dict). The optimizer's fp32
    copies are the caller's to set (gptx.parallel.masters)."""
    model = engine.module
    for name, layer in model.layers.items():
        state = read_layer(int(name))
        with _gathered(layer, modifier_rank=0):
            layer.load_state_dict(state)


def parameter_count(engine) -> int:
    """Parameters of the whole model (ZeRO-3 keeps only a shard's worth on each rank)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
