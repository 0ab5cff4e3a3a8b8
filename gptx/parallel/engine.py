"""The DeepSpeed engine for this model, and the list of DeepSpeed defects gptx works around.

`build_engine()` is the one place a pipeline engine is made. The defects below were found
in DeepSpeed 0.19.8; each workaround says how it was found and which test fails if it is
removed while the defect is still there, so a DeepSpeed upgrade shows which are still needed:

1. fp32 gradient clipping leaves every pipeline stage but the first out of the norm
   (`_fix_fp32_clipping`; tests/integration/test_train.py: 1 vs 2 stages).
2. fp16 without ZeRO never multiplies the loss by the loss scale, yet unscales the
   gradients (`_ensure_loss_is_scaled`; tests/unit/parallel/test_engine.py).
3. FP16_Optimizer and FP16_UnfusedOptimizer run one optimizer step with zero gradients
   when they are built, so Adam starts at step 2 (wrong bias correction) and weight decay
   has already shrunk the fp32 master weights once (`_undo_construction_step`;
   tests/unit/parallel/test_engine.py).
4. Every fp16 optimizer unscales a step's gradients by the scale it has just raised, on
   the steps where the dynamic scale grows; FP16_UnfusedOptimizer also counts the tied
   embedding twice across stages and logs the scaled norm (`_fix_fp16_unscale_and_norm`;
   tests/unit/parallel/test_engine.py).
5. `save_checkpoint` writes `latest` from rank 0 before the other ranks have finished
   (`save_checkpoint`; tests/integration/test_reliability.py: kill -9 during a save).
6. The CPU all-reduce leaves a shared-memory buffer per rank behind every run
   (`release_shared_memory`; tests/unit/parallel/test_engine.py).
7. PipelineModule broadcasts the tied embedding between the end stages (built, loaded) with autograd
   on; torch has no autograd kernel for that in-place c10d::broadcast_ and warns at every rank's first
   backward that it "may lead to silently incorrect behavior". The gradients are right (test_engine.py);
   gptx runs them under no_grad (`_tied_weight_sync_without_autograd`; test_train.py: a 2-stage run's output).
8. The JIT op builder (FusedAdam, the GPU default for "AdamW") cannot parse architecture
   suffixes in TORCH_CUDA_ARCH_LIST ("9.0a", torch's name for sm_90a, as set in the H100
   image gptx was checked on) and fails with "invalid literal for int() with base 10:
   '0a'". While the engine is built, gptx hands it the list without suffixes; its ops use
   no architecture-specific instructions (`_arch_list_deepspeed_can_parse`;
   tests/unit/parallel/test_engine.py).
9. Without a pipeline the engine steps when its count of micro-batches reaches a multiple of
   the accumulation steps, which `set_train_batch_size` (a batch ramp) changes without moving
   the count: the update falls mid-batch (`_count_micro_batches_from_each_batch_change`;
   tests/unit/training/test_checkpoint.py: a batch ramp without a pipeline).
10. ZeRO-3's safe_set_full_fp32_param / safe_set_full_optimizer_state cut the last rank's chunk past
   the end of a parameter the ranks do not divide: a resume onto ZeRO-3 stops with a RuntimeError
   (`set_zero3_fp32` in gptx/parallel/optimizer_state.py; tests/integration/test_checkpoint.py).
11. PipelineModule.forward cuts activation-checkpoint chunks from a stage's first layer, leaving any
   chunk with an embedding, norm or head unrecomputed, blocks included (`GPTPipe.forward`;
   tests/unit/analysis/test_partition_report_engine.py: every block recomputed at interval 4).
12. ZeRO-3's memory-efficient linear (zero.Init's swap for torch's) trains compiled blocks wrongly under
   torch 2.11, not 2.13 (`zero3_init_config`, data_parallel.py; test_compile.py's ZeRO-3 layout, torch 2.11).
13. ZeRO-1 and the unfused fp16 optimizer all-reduce a norm per optimizer group, so a stage without a matrix
   or a vector waits forever; the bf16 optimizer stops on a stage of the tied head alone. Such layouts are
   one line (`stage_problem`, pipeline.py; found on 2 CPU ranks; tests/unit/parallel/test_pipeline.py).

Not a defect: DeepSpeed's CPU accelerator refuses fp16 (slow there); GPTX_CPU_FP16=1 lifts it for tests.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import sys
from functools import cache, partial
from pathlib import Path

import torch
import torch.distributed as dist

from gptx.config import Config
from gptx.errors import GptxError
from gptx.parallel.data_parallel import build_data_parallel_engine
from gptx.parallel.optimizer_state import scale_holder
from gptx.parallel.pipeline import build_pipeline
from gptx.parallel.zero_bubble import use_zero_bubble
from gptx.testing import allow_cpu_fp16
from gptx.training.schedule import WarmupCosine, schedule_of


def param_groups(module: torch.nn.Module) -> list[dict]:
    """Weight decay on matrices and embeddings only, not on biases and norm gains."""
    def is_matrix(p):  # ZeRO-3 leaves an empty shard in p; ds_shape is the parameter's own shape
        return len(getattr(p, "ds_shape", p.shape)) >= 2
    decay = [p for p in module.parameters() if p.requires_grad and is_matrix(p)]
    no_decay = [p for p in module.parameters() if p.requires_grad and not is_matrix(p)]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(cfg: Config, ds_config: dict, show_deepspeed_prints: bool = False):
    """This rank's stage of the pipeline inside DeepSpeed's engine, with gptx's LR schedule;
    with pipe_parallel_size 0, the whole model in DeepSpeed's plain engine (gptx/parallel/data_parallel.py)."""
    import deepspeed

    allow_cpu_fp16()
    _ask_py_cpuinfo_once()
    if cfg.train.pipe_parallel_size == 0:
        return _build_data_parallel_engine(cfg, ds_config, show_deepspeed_prints)
    with deepspeed_prints(show_deepspeed_prints):
        with torch.no_grad():  # defect 7: PipelineModule's constructor broadcasts the tied weights
            model = build_pipeline(cfg, ds_config=ds_config)
        _tied_weight_sync_without_autograd(model)
        schedule = partial(WarmupCosine, **schedule_of(dataclasses.asdict(cfg.train)))
        with _arch_list_deepspeed_can_parse():
            engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model),
                                                   config=ds_config, lr_scheduler=schedule)
    if cfg.train.pipeline_schedule == "zb-h1":
        use_zero_bubble(engine, model.weight_grad_store)
    if engine.fp16_enabled():
        _ensure_loss_is_scaled(engine)
        _undo_construction_step(engine)
        _fix_fp16_unscale_and_norm(engine)
    elif not engine.bfloat16_enabled():
        _fix_fp32_clipping(engine)
    if engine.grid.get_data_parallel_world_size() == 1 and not engine.zero_optimization() \
            and not engine.bfloat16_enabled():
        # With one data-parallel replica the engine's gradient all-reduce only flattens every
        # gradient into buckets and copies it back: 2-3% of a CPU step, for nothing.
        engine.pipeline_enable_backward_allreduce = False
    return engine


def _build_data_parallel_engine(cfg: Config, ds_config: dict, show_deepspeed_prints: bool):
    schedule = partial(WarmupCosine, **schedule_of(dataclasses.asdict(cfg.train)))
    with deepspeed_prints(show_deepspeed_prints), _arch_list_deepspeed_can_parse():
        wrapped = build_data_parallel_engine(cfg, ds_config, schedule, param_groups)
    engine = wrapped.engine
    if engine.fp16_enabled():  # always with ZeRO here (gptx/parallel/ds_config.py): defects 2 and 3 do not arise
        _fix_fp16_unscale_and_norm(engine)
    _count_micro_batches_from_each_batch_change(engine)
    return wrapped


def _count_micro_batches_from_each_batch_change(engine) -> None:
    """Defect 9: the count (`micro_steps`) is read only for the boundary, and a batch size changes
    between steps, so the count starts again at 0, as in a resumed run."""
    set_batch_size = engine.set_train_batch_size

    def set_train_batch_size(train_batch_size):
        set_batch_size(train_batch_size)
        engine.micro_steps = 0
    engine.set_train_batch_size = set_train_batch_size


def _tied_weight_sync_without_autograd(module) -> None:
    """Defect 7: PipelineModule._synchronize_tied_weights broadcasts parameters that require
    grad with autograd on; torch then warns at each backward. Under no_grad it does not."""
    sync = module._synchronize_tied_weights

    def sync_without_autograd():
        with torch.no_grad():
            sync()
    module._synchronize_tied_weights = sync_without_autograd


def _ask_py_cpuinfo_once() -> None:
    """Defect 9: py-cpuinfo's answer kept for the process (the CPU does not change under it);
    each caller gets its own copy of the dict."""
    import cpuinfo
    if getattr(cpuinfo.get_cpu_info, "asks_once", False):
        return
    answer = cache(cpuinfo.get_cpu_info)

    def get_cpu_info() -> dict:
        return dict(answer())
    get_cpu_info.asks_once = True
    cpuinfo.get_cpu_info = get_cpu_info


ARCH_LIST_ENV = "TORCH_CUDA_ARCH_LIST"


@contextlib.contextmanager
def _arch_list_deepspeed_can_parse():
    """Defect 8: TORCH_CUDA_ARCH_LIST without the "a"/"f" family suffixes ("9.0a" -> "9.0")
    while DeepSpeed JIT-builds its ops; the user's value is back afterwards."""
    before = os.environ.get(ARCH_LIST_ENV)
    if before is None:
        yield
        return
    entries = before.replace(";", " ").split()
    os.environ[ARCH_LIST_ENV] = ";".join(_without_family_suffix(e) for e in entries)
    try:
        yield
    finally:
        os.environ[ARCH_LIST_ENV] = before


def _without_family_suffix(arch: str) -> str:
    number, plus, ptx = arch.partition("+")
    return number.rstrip("af") + plus + ptx


@contextlib.contextmanager
def deepspeed_prints(show: bool):
    """DeepSpeed prints start-up details from every rank with print() (its CPU all-reduce op
    build, SEED_LAYERS, the topology, each stage's layer names); gptx's own start-up lines
    say the same with parameter counts. Hidden unless `show`; replayed on stderr on failure."""
    if show:
        yield
        return
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise


def loss_scale(engine) -> float | None:
    if not engine.fp16_enabled():
        return None
    scale = getattr(scale_holder(engine.optimizer), "cur_scale", None)
    return float(scale) if scale is not None else None


def _pipeline_sq_norm(engine, grads: list[torch.Tensor]) -> torch.Tensor:
    """Collective over this pipeline's stages: the sum of squares of every stage's `grads`.

    Accumulated in fp32 (a scaled fp16 gradient's norm can exceed fp16's range). The
    caller leaves out the non-owning copy of a tied weight, so it is counted once.
    """
    if grads:
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)  # one fused kernel, not a loop
        sq = torch.stack(norms).pow(2).sum().reshape(1)
    else:
        sq = torch.zeros(1, device=engine.device)
    dist.all_reduce(sq, group=engine.grid.get_model_parallel_group())
    return sq


def _owned(param) -> bool:
    """False for the copy of a tied weight that another stage owns (DeepSpeed marks it)."""
    return not getattr(param, "ds_pipe_replicated", False)


def _fix_fp32_clipping(engine) -> None:
    """Defect 1: replace DeepSpeed's fp32 gradient clipping, which is wrong under pipeline parallelism.

    DeepSpeed 0.19's fp32 path (runtime.utils.clip_grad_norm_) counts a gradient only on
    model-parallel rank 0 and the pipeline grid reports the stage as that rank, so every
    stage but the first is left out of the norm: 2 stages clip differently from 1. Here:
    the squares of every stage's gradients, the tied copy counted once, summed over the
    stages of this pipeline. It also keeps the norm for the log, which DeepSpeed discards
    in fp32.
    """
    def clip():
        params = [p for p in engine.module.parameters() if p.grad is not None]
        norm = _pipeline_sq_norm(engine, [p.grad for p in params if _owned(p)]).sqrt()
        coef = torch.clamp(engine.gradient_clipping() / (norm + 1e-6), max=1.0)
        if params:
            torch._foreach_mul_([p.grad for p in params], coef.reshape(()))
        engine._global_grad_norm = norm.reshape(())  # a device tensor: the loop reads it once per step
    engine.clip_fp32_gradients = clip


class LossScalingError(GptxError):
    """DeepSpeed's loss gradient is neither unscaled nor scaled: gptx cannot tell what it did."""


def _ensure_loss_is_scaled(engine) -> None:
    """Defect 2: DeepSpeed 0.18.3-0.19.8 does not scale the fp16 loss without ZeRO.

    `DeepSpeedEngine.backward()` multiplies the loss by the loss scale only for ZeRO
    optimizers (since DeepSpeed PR #7665; open PR #8393 describes it). FP16_Optimizer and
    FP16_UnfusedOptimizer still divide every gradient by the scale in step(), so updates
    come from gradients `scale` times too small, and with no overflow ever the scale keeps
    doubling. Detected by behaviour, at every backward: a hook on the loss sees the
    gradient that arrives from the engine's backward, which is loss_scale / accumulation
    steps when DeepSpeed scaled it and 1 / accumulation steps when it did not. Only in the
    second case is it multiplied by the scale, so the loss is scaled exactly once, also
    by a DeepSpeed that fixes this. Anything else skips the step and, at check_step()
    after train_batch, stops the run rather than train wrong.
    """
    module = engine.module
    original = module.loss_fn
    # Per micro-batch nothing is read on the host: the hook chooses its answer on the device and
    # counts what it saw there; check_step() reads the counts once per step.
    state = {"seen": None, "warned": engine.grid.get_data_parallel_rank() != 0}

    def check_grad(grad: torch.Tensor):
        scale = loss_scale(engine)
        arrived = grad.detach().float() * engine.gradient_accumulation_steps()  # a batch ramp changes it
        scaled = (arrived - scale).abs() <= 1e-3 * scale  # DeepSpeed scaled it
        unscaled = (arrived - 1.0).abs() <= 1e-3
        neither = ~(scaled | unscaled)
        seen = torch.stack([unscaled.float(), neither.float(), arrived, torch.full_like(arrived, scale)])
        before = state["seen"]
        if before is not None:  # counts add up; the last odd gradient and its scale are kept for the message
            seen = torch.cat([before[:2] + seen[:2], torch.where(neither, seen[2:], before[2:])])
        state["seen"] = seen
        # Neither: a NaN gradient makes DeepSpeed skip the step as an overflow, so nothing trains
        # on it before check_step() stops the run.
        return torch.where(unscaled, grad * scale, torch.where(scaled, grad, torch.full_like(grad, math.nan)))

    def read_once_per_step():
        seen, state["seen"] = state["seen"], None
        if seen is None:
            return
        n_unscaled, n_neither, arrived, scale = seen.tolist()
        if n_neither:
            raise LossScalingError(f"the fp16 loss received a gradient of {arrived:g} / accumulation steps from "
                                   f"DeepSpeed's backward, neither 1 nor the loss scale {scale:g}; this DeepSpeed "
                                   f"scales losses in a way gptx does not know, so it stopped rather than train "
                                   f"wrong; use bf16 (ds_configs/gpu_bf16.json)")
        if n_unscaled and not state["warned"]:
            state["warned"] = True
            print(f"rank {dist.get_rank()}: note: this DeepSpeed does not multiply the fp16 loss by the loss "
                  f"scale without ZeRO; gptx does (see gptx/parallel/engine.py)", flush=True)
    engine._gptx_step_checks = getattr(engine, "_gptx_step_checks", []) + [read_once_per_step]

    def scaled_loss_fn(outputs, labels):
        loss = original(outputs, labels)
        if loss.requires_grad:
            loss.register_hook(check_grad)
        return loss
    module.loss_fn = scaled_loss_fn


def check_step(engine) -> None:
    """Once per step, after train_batch: what gptx's workarounds saw during the step, read on the
    host here rather than in the micro-batches (raises LossScalingError)."""
    for check in getattr(engine, "_gptx_step_checks", ()):
        check()


def _undo_construction_step(engine) -> None:
    """Defect 3: forget the zero-gradient step DeepSpeed's fp16 optimizers take when built.

    FP16_Optimizer and FP16_UnfusedOptimizer call initialize_optimizer_states(), which
    steps the wrapped optimizer once with zero gradients to create its state. For Adam
    that counts as step 1: the first real update is Adam's step 2, whose bias correction
    makes it 0.74x the size of fp32's, and decoupled weight decay has already multiplied
    the fp32 masters by (1 - lr * weight_decay) at DeepSpeed's default lr. Here the state
    is dropped (Adam creates it again at the first real step) and the masters are copied
    back from the untouched fp16 weights. A checkpoint loaded later replaces both anyway.
    """
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    opt = engine.optimizer
    if not isinstance(opt, (FP16_Optimizer, FP16_UnfusedOptimizer)):
        return  # the ZeRO optimizer creates its state without a step
    opt.optimizer.state.clear()
    for group in opt.optimizer.param_groups:
        group.pop("step", None)  # DeepSpeed's FusedAdam also keeps a count per group
    opt.refresh_fp32_params()


def _fix_fp16_unscale_and_norm(engine) -> None:
    """Defect 4: unscale each step by the scale its gradients were made with; log the fp32 norm.

    All three fp16 optimizers of DeepSpeed 0.19 (FP16_Optimizer, FP16_UnfusedOptimizer,
    the ZeRO optimizer) update the dynamic loss scale before unscale_and_clip_grads(),
    which divides by the new scale: on each step where the scale grows, the update uses
    gradients half their size and clips against half the norm. FP16_UnfusedOptimizer
    also takes the norm of gradient copies that lost DeepSpeed's tied-weight mark, so the
    tied embedding counts twice with 2 stages, and it logs the scaled norm.

    The scale cannot change between a backward and its step, so the scale at the start
    of step() is the one the gradients carry. During unscale_and_clip_grads() the
    optimizer sees that scale (and, unfused, the right norm); afterwards the new one.
    The logged norm is the unscaled one, counted once.
    """
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    opt = engine.optimizer
    holder = scale_holder(opt)
    original_step, original_unscale = opt.step, opt.unscale_and_clip_grads
    unfused = isinstance(opt, FP16_UnfusedOptimizer)
    step_state = {"scale": None, "norm": None}

    def unfused_scaled_norm() -> torch.Tensor:
        grads = [fp32.grad for group16, group32 in zip(opt.fp16_groups, opt.fp32_groups)
                 for fp16, fp32 in zip(group16, group32) if fp32.grad is not None and _owned(fp16)]
        return _pipeline_sq_norm(engine, grads).sqrt().reshape(())

    def unscale_and_clip(*args, **kwargs):
        args = list(args)
        if unfused:  # (total_norm, apply_scale=True)
            args[0] = unfused_scaled_norm()
        # Kept as it came (a tensor under ZeRO): the loop reads the logged norm once per step.
        step_state["norm"] = args[1] if not unfused else args[0]
        grown, holder.cur_scale = holder.cur_scale, step_state["scale"]
        try:
            return original_unscale(*args, **kwargs)
        finally:
            holder.cur_scale = grown

    def step(*args, **kwargs):
        step_state["scale"], step_state["norm"] = holder.cur_scale, None
        result = original_step(*args, **kwargs)
        if step_state["norm"] is not None and not opt.overflow:
            opt._global_grad_norm = step_state["norm"] / step_state["scale"]
        return result

    opt.unscale_and_clip_grads = unscale_and_clip
    opt.step = step


def save_checkpoint(engine, run_dir: str | Path, tag: str, client_state: dict) -> Exception | None:
    """Defect 5: DeepSpeed 0.19 writes `latest` from rank 0 before the other ranks have
    finished their files; gptx moves its own pointer after a barrier (gptx/training/checkpoint.py).

    Returns this rank's first write error (a full disk, a read-only or vanished directory)
    instead of raising it. DeepSpeed's save has barriers between its writes: a rank raising
    out of it would leave the others waiting in a barrier it never reaches (a "lost peer").
    Recording the error keeps the ranks in step, so that gptx can agree on the failure
    afterwards (gptx/training/checkpoint.py, `save`).
    """
    writer = getattr(engine, "checkpoint_engine", None)
    errors: list[Exception] = []

    def recording(write):
        def wrapper(*args, **kwargs):
            if errors:  # the rest of this folder is lost anyway: no second error on top
                return None
            try:
                return write(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 -- the caller decides which errors are write errors
                errors.append(e)
                return None
        return wrapper

    if writer is None:
        try:
            engine.save_checkpoint(str(run_dir), tag=tag, client_state=client_state, save_latest=False)
        except Exception as e:  # noqa: BLE001
            return e
        return None
    wrapped = [name for name in ("save", "makedirs") if hasattr(writer, name)]
    own = {name: vars(writer)[name] for name in wrapped if name in vars(writer)}  # put back as they were
    for name in wrapped:
        setattr(writer, name, recording(getattr(writer, name)))
    try:
        engine.save_checkpoint(str(run_dir), tag=tag, client_state=client_state, save_latest=False)
    except OSError as e:  # a write outside the checkpoint engine (DeepSpeed's own open())
        errors.append(e)
    finally:
        for name in wrapped:
            if name in own:
                setattr(writer, name, own[name])
            else:
                delattr(writer, name)  # the class's method shows again
    return errors[0] if errors else None


def release_shared_memory(port: str | None = None) -> None:
    """Defect 6: remove the /dev/shm buffers DeepSpeed's CPU all-reduce made for this run.
    DeepSpeed 0.19's CPU backend leaves one per rank, named after the master port, behind
    every run; on a machine that launches many runs they fill shared memory."""
    port = port or os.environ.get("MASTER_PORT")
    if not port or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    for buf in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        buf.unlink(missing_ok=True)
