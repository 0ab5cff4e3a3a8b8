"""ZB-H1, the zero-bubble pipeline schedule of Qi et al. (2024), on DeepSpeed's pipeline engine.

Under 1F1B (DeepSpeed's TrainSchedule) a stage runs each micro-batch's backward in one piece, and
the stage before it waits for all of it. ZB-H1 splits the backward of the decoder blocks' linear
layers (and of the untied head): B, the gradient with respect to the layer's input, which the
previous stage waits for, runs where 1F1B runs the backward; W, the gradient with respect to the
weight, which nobody waits for, runs later, in time the stage would otherwise spend waiting.
Norms, biases, embeddings and a tied head keep their gradients in B.

The schedule is DeepSpeed's TrainSchedule unchanged (the same forwards, backwards and messages in
the same order, so the same buffers and no new deadlock) with W instructions added: stage s
leaves its first s W's for later, then runs one W after each backward (in the next step, after its
sends and before its receives), and the rest before the gradient reduction. Its sends do not wait
for the receiver, unlike DeepSpeed's (`use_zero_bubble`). With F, B and W
of equal length the step takes m(F + B + W) + (p - 1)(F + B - W) for every m >= p, the paper's
bubble (`step_time` simulates it; tests/unit/parallel/test_zero_bubble.py checks it). Stage s
holds at most p - s micro-batches' activations, as under 1F1B, plus the inputs and output
gradients of its linear layers for at most s micro-batches whose W has not run when a backward
starts (s + 1 just after it, when that micro-batch's other activations are gone).
"""
from __future__ import annotations

from collections import deque
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.runtime.pipe import p2p
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.schedule import (BackwardPass, ForwardPass, OptimizerStep, PipeInstruction, ReduceTiedGrads,
                                             SendActivation, SendGrad, TrainSchedule)

from gptx.model.layers import Block, LMHead

SCHEDULES = ("1f1b", "zb-h1")


class WeightGradStore:
    """One stage's deferred weight gradients: what each backward (B) left for its W, oldest first."""

    def __init__(self):
        self.deferring = False  # True only inside a training backward under ZB-H1
        self._current: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []
        self._waiting: deque[list] = deque()
        self._reused: set[int] = set()

    def reused_buffers(self, tensors) -> None:
        """Storage that will be overwritten before the W runs: the pipeline engine receives every
        micro-batch's output gradient into the same buffer, which a block's last linear layer
        can get as its own output gradient. What the store keeps from it, it copies."""
        self._reused = {t.untyped_storage().data_ptr() for t in tensors or () if isinstance(t, torch.Tensor)}

    def put(self, weight: nn.Parameter, x: torch.Tensor, grad_y: torch.Tensor) -> None:
        x, grad_y = (t.clone() if t.untyped_storage().data_ptr() in self._reused else t for t in (x, grad_y))
        self._current.append((weight, x, grad_y))

    def end_micro_batch(self) -> None:
        self._waiting.append(self._current)
        self._current = []

    def pending(self) -> int:
        return len(self._waiting)

    def oldest(self):
        """(weight, its gradient) for each linear layer of the oldest waiting micro-batch, computed one
        at a time, so that only one layer's weight gradient exists before it is accumulated."""
        for weight, x, grad_y in self._waiting.popleft():
            yield weight, weight_grad(x, grad_y)


def weight_grad(x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """dL/dW of y = x W^T: (out, ..) x (.., in) summed over every position."""
    return grad_y.reshape(-1, grad_y.size(-1)).t().mm(x.reshape(-1, x.size(-1)))  # (out, in)


class LinearWithDeferredWeightGrad(torch.autograd.Function):
    """F.linear whose backward leaves the weight gradient to the store while it is deferring."""

    @staticmethod
    def forward(ctx, x, weight, bias, store: WeightGradStore):
        ctx.save_for_backward(x, weight)
        # The parameter itself, for W: under activation checkpointing the saved `weight` comes back
        # as another tensor object, and a gradient accumulated into that would never reach it.
        ctx.parameter, ctx.store, ctx.has_bias = weight, store, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x = grad_y.matmul(weight) if ctx.needs_input_grad[0] else None  # (.., out) x (out, in)
        grad_bias = grad_y.reshape(-1, grad_y.size(-1)).sum(0) if ctx.has_bias else None
        if ctx.store.deferring:
            ctx.store.put(ctx.parameter, x, grad_y)
            return grad_x, None, grad_bias, None
        return grad_x, weight_grad(x, grad_y), grad_bias, None


# A compiled block calls this eagerly, between its graphs: traced, the backward's choice between
# deferring W and computing it in B (store.deferring) would be fixed once, at tracing, and W
# would never be deferred. The matmuls run the same kernels either way.
@torch.compiler.disable
def deferred_linear(store: WeightGradStore, x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    return LinearWithDeferredWeightGrad.apply(x, weight, bias, store)


def _deferred_module(linear: nn.Linear, store: WeightGradStore, x: torch.Tensor) -> torch.Tensor:
    return deferred_linear(store, x, linear.weight, linear.bias)


def defer_weight_grads(layers, store: WeightGradStore) -> int:
    """Route every linear layer inside the decoder blocks among `layers`, and the untied head's matmul
    (not the fused loss's), through the store; returns how many. Parameters and their names do not
    change, so checkpoints do not depend on it. A tied head's table lives on two stages and keeps its
    gradient in B."""
    count = 0
    for layer in layers:
        if isinstance(layer, Block):
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    module.forward = partial(_deferred_module, module, store)
                    count += 1
        elif isinstance(layer, LMHead) and not layer.fused:
            layer.linear = partial(deferred_linear, store)
            count += 1
    return count


class WeightPass(PipeInstruction):
    """W: the weight gradients the oldest backward left waiting (ZB-H1)."""


class ZeroBubbleH1(TrainSchedule):
    """DeepSpeed's 1F1B steps with W added (see the module's docstring for where)."""

    def steps(self):
        warmup = min(self.stages - self.stage_id - 1, self.micro_batches)
        backwards = owed = weights = 0
        for cmds in super().steps():
            cmds = list(cmds)
            if cmds and isinstance(cmds[-1], OptimizerStep):  # the last step: every W before the reduction
                at = next(i for i, c in enumerate(cmds) if isinstance(c, ReduceTiedGrads))
                cmds[at:at] = [WeightPass() for _ in range(self.micro_batches - weights)]
                yield cmds
                continue
            if owed:  # the previous step's backward: after this step's sends, before it waits for anything
                at = 0
                while at < len(cmds) and isinstance(cmds[at], (SendGrad, SendActivation)):
                    at += 1
                cmds[at:at] = [WeightPass() for _ in range(owed)]
                weights, owed = weights + owed, 0
            for c in cmds:
                if isinstance(c, BackwardPass):
                    # Stage s leaves its first s W's; in the cool-down (no forwards left) each B has its W.
                    if backwards >= self.stage_id or backwards >= self.micro_batches - warmup:
                        owed += 1
                    backwards += 1
            yield cmds


def schedule_class(name: str) -> type[TrainSchedule]:
    return {"1f1b": TrainSchedule, "zb-h1": ZeroBubbleH1}[name]


def use_zero_bubble(engine: PipelineEngine, store: WeightGradStore) -> None:
    """Train `engine` on ZB-H1: its backward passes defer the store's weight gradients, the W
    instruction computes them, and its sends do not wait for the receiver. The instruction map, the
    schedule and `_exec_schedule` are replaced on this engine only; everything else (reductions,
    clipping, loss scaling, checkpoints) is DeepSpeed's."""
    in_flight: list = []  # (work, tensor) of sends not yet known to be complete

    def backward_input(eng, buffer_id):
        grad_layer = eng.grad_layer
        store.reused_buffers([grad_layer] if isinstance(grad_layer, torch.Tensor) else grad_layer)
        store.deferring = True
        try:
            PipelineEngine._exec_backward_pass(eng, buffer_id)
        finally:
            store.deferring = False
        store.end_micro_batch()

    def weight_pass(eng):
        bf16 = eng.using_bf16_optimizer
        if bf16:  # as DeepSpeed's own backward pass does around the autograd call
            eng.optimizer.clear_lp_grads()
        # Through autograd, so each weight's gradient arrives the way a backward delivers it
        # (accumulated into .grad, DeepSpeed's gradient hooks run).
        eng._running_engine_backward = True
        try:
            for weight, grad in store.oldest():
                torch.autograd.backward(weight, grad)
        finally:
            eng._running_engine_backward = False
        if bf16 and not eng._config.bfloat16_config.immediate_grad_update:
            eng.optimizer.update_hp_grads(clear_lp_grads=False)

    def without_waiting(send):
        # DeepSpeed's p2p.send blocks until the neighbour receives (it refuses async_op): a stage
        # would then wait, instead of running a W, for a neighbour that is still computing. Its send
        # instructions run with p2p.send as an isend; the tensors are held until the sends complete.
        def run(eng, buffer_id):
            blocking = p2p.send

            def isend(tensor, dest_stage, async_op=False):
                in_flight.append((dist.isend(tensor, eng.grid.stage_to_global(dest_stage)), tensor))
            p2p.send = isend
            try:
                send(eng, buffer_id)
            finally:
                p2p.send = blocking
            in_flight[:] = [(work, t) for work, t in in_flight if not work.is_completed()]
        return run

    def exec_schedule(pipe_schedule):
        try:
            PipelineEngine._exec_schedule(engine, pipe_schedule)
        finally:
            for work, _ in in_flight:
                work.wait()
            in_flight.clear()

    engine._INSTRUCTION_MAP = {
        **engine._INSTRUCTION_MAP, BackwardPass: backward_input, WeightPass: weight_pass,
        SendActivation: without_waiting(PipelineEngine._exec_send_activations),
        SendGrad: without_waiting(PipelineEngine._exec_send_grads)}
    engine._exec_schedule = exec_schedule
    engine._train_schedule = lambda: ZeroBubbleH1(micro_batches=engine.micro_batches, stages=engine.num_stages,
                                                  stage_id=engine.stage_id)


def compute_order(schedule: str, stages: int, micro_batches: int, stage: int) -> list[str]:
    """The stage's computations in order: 'F', 'B' (with W inside under 1f1b) and 'W'."""
    names = {ForwardPass: "F", BackwardPass: "B", WeightPass: "W"}
    sched = schedule_class(schedule)(micro_batches=micro_batches, stages=stages, stage_id=stage)
    return [names[type(c)] for step in sched.steps() for c in step if type(c) in names]


def timeline(schedule: str, stages: int, micro_batches: int, f: float, b: float, w: float):
    """When each stage runs each computation, from the schedule's own instructions: a list per stage
    of (kind, micro-batch, start, end), messages taking no time. Under 1f1b a backward lasts b + w."""
    length = {"F": f, "B": b if schedule == "zb-h1" else b + w, "W": w}
    todo = [deque(compute_order(schedule, stages, micro_batches, s)) for s in range(stages)]
    count = [{"F": 0, "B": 0, "W": 0} for _ in range(stages)]
    done: dict[tuple[int, str, int], float] = {}
    free = [0.0] * stages
    runs: list[list[tuple[str, int, float, float]]] = [[] for _ in range(stages)]
    while any(todo):
        moved = False
        for s in range(stages):
            while todo[s]:
                kind = todo[s][0]
                mb = count[s][kind]
                after = {"F": (s - 1, "F", mb) if s > 0 else None,
                         "B": (s + 1, "B", mb) if s < stages - 1 else (s, "F", mb), "W": (s, "B", mb)}[kind]
                if after is not None and after not in done:
                    break
                start = max(free[s], done[after] if after else 0.0)
                free[s] = done[(s, kind, mb)] = start + length[kind]
                runs[s].append((kind, mb, start, free[s]))
                count[s][kind] += 1
                todo[s].popleft()
                moved = True
        if not moved:
            raise RuntimeError(f"{schedule} deadlocks at {stages} stages and {micro_batches} micro-batches")
    return runs


def step_time(schedule: str, stages: int, micro_batches: int, f: float, b: float, w: float) -> float:
    return max(run[-1][3] for run in timeline(schedule, stages, micro_batches, f, b, w))


def bubble_fraction(schedule: str, stages: int, micro_batches: int, f: float = 1, b: float = 1, w: float = 1) -> float:
    """The share of a step each stage spends idle: (p - 1) / (m + p - 1) under 1f1b; under zb-h1 with
    F = B = W, (p - 1) / (3m + p - 1) for m >= p."""
    if stages <= 1:
        return 0.0
    return 1 - micro_batches * (f + b + w) / step_time(schedule, stages, micro_batches, f, b, w)


def trace(schedule: str, stages: int, micro_batches: int, f: float = 1, b: float = 1, w: float = 1,
          unit: float | None = None) -> str:
    """A text timeline, one row per stage, one character per `unit` of time: F, B and W with the
    micro-batch's number below, '.' for idle."""
    runs = timeline(schedule, stages, micro_batches, f, b, w)
    unit = unit or min(x for x in (f, b, w) if x > 0)
    end = max(run[-1][3] for run in runs)
    rows = []
    for s, run in enumerate(runs):
        kinds, numbers = ["."] * round(end / unit), [" "] * round(end / unit)
        for kind, mb, start, stop in run:
            for i in range(round(start / unit), round(stop / unit)):
                kinds[i], numbers[i] = kind, str(mb % 10)
        rows += [f"stage {s}  {''.join(kinds)}", f"         {''.join(numbers)}"]
    return "\n".join(rows)
