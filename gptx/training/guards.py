"""What stops a run early, the same way on every rank: a signal (SIGTERM/SIGINT), numerical
trouble (non-finite loss, an fp16 overflow streak), and errors from inside the engine that
have a one-line explanation (a hung or lost peer, DeepSpeed's ZeRO scaler giving up).
"""
from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

from gptx.config import Config
from gptx.errors import GptxError, PeerFailure, TrainingStopped


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class StopSignal:
    """SIGTERM/SIGINT set a flag; at each iteration boundary the ranks agree (MAX over the world)
    so that all of them stop after the same iteration, save, and exit cleanly.

    DeepSpeed's launcher, when it is signalled itself, sends SIGTERM to one rank at a time and
    SIGKILLs it after 30 s. A save that takes longer is cut off, safely (the folder gets no
    manifest and `latest` keeps naming the previous checkpoint). The same signal a second
    time gets its default behaviour, so a second Ctrl-C interrupts a run that is stuck.
    """

    def __init__(self):
        import signal
        self.received = 0
        self.names = {int(signal.SIGTERM): "SIGTERM", int(signal.SIGINT): "SIGINT"}
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        import signal
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        import signal
        if self.received == signum:  # the same signal again: its default action, as if gptx were not there
            signal.signal(signum, self.previous[signum])
            signal.raise_signal(signum)
            return
        if self.received:
            # The other one: Ctrl-C sends every rank SIGINT, and DeepSpeed's launcher then sends each a
            # SIGTERM of its own; taken as a second stop, it would end the rank before its checkpoint.
            return
        self.received = int(signum)
        try:
            # os.write, not print: a handler that prints while the main code prints can raise.
            os.write(2, f"rank {_rank()}: received {self.names.get(signum, signum)}; stopping after this "
                        f"iteration with a checkpoint\n".encode())
        except OSError:  # Ctrl-C also ends a `| tee` reading the output: the stop and its save still happen
            pass

    def agreed(self, device) -> str | None:
        """Collective: the signal's name if any rank received one."""
        flag = torch.tensor([self.received], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        received = int(flag.item())  # the one host read of this per-step check
        return self.names.get(received, str(received)) if received else None


class NumericsGuard:
    """Watches each step: a non-finite loss (fp32/bf16) stops the run, and so does a step
    applied with a non-finite gradient norm; skipped steps are counted, and a streak of them
    (fp16: at the minimum loss scale) stops it; loss spikes are reported.

    Every rank sees the same loss, gradient norm and skip count, so every rank decides the same.
    """

    def __init__(self, cfg: Config, fp16: bool, min_scale: float | None, skipped_so_far: int = 0):
        self.t = cfg.train
        self.fp16 = fp16
        self.min_scale = min_scale
        self.skipped_seen = skipped_so_far  # a resumed run's engine starts with the saved count
        self.streak = 0
        self.mean = None
        self.seen = 0

    def check(self, iteration: int, loss: float, skipped_total: int, scale: float | None,
              grad_norm: float | None = None) -> str | None:
        """Raise TrainingStopped, or return a warning line (a spike) or None."""
        skipped_now = skipped_total > self.skipped_seen
        self.skipped_seen = skipped_total
        if not self.fp16 and not math.isfinite(loss):
            raise TrainingStopped(f"iteration {iteration}: the loss is {loss} (non-finite); lower train.lr, "
                                  f"raise train.warmup_iters or check the data")
        if grad_norm is not None and not math.isfinite(grad_norm) and not skipped_now:
            # fp32 steps whatever the gradient holds (bf16 and fp16 skip such a step): the weights
            # this step wrote are not finite, and the next save would keep them.
            raise TrainingStopped(f"iteration {iteration}: the gradient norm is {grad_norm} and the step was "
                                  f"applied, so the weights are no longer finite; lower train.lr, raise "
                                  f"train.warmup_iters or check the data")
        # bf16 and fp32 have no loss scale to lower: every skip counts towards the streak.
        at_min = not self.fp16 or (scale is not None and self.min_scale is not None and scale <= self.min_scale)
        self.streak = self.streak + 1 if skipped_now and at_min else 0
        limit = self.t.max_skipped_at_min_scale
        if limit and self.streak >= limit:
            where = f"overflowed at the minimum loss scale {scale:g}" if self.fp16 else "had non-finite gradients"
            raise TrainingStopped(
                f"iteration {iteration}: {self.streak} {'fp16 ' if self.fp16 else ''}steps in a row {where} and "
                f"were skipped, so the model is "
                f"no longer training; " + ("use bf16 (ds_configs/gpu_bf16.json), lower train.lr, or lower "
                                           "min_loss_scale (a static loss_scale) in the DeepSpeed JSON"
                                           if self.fp16 else "lower train.lr, raise train.warmup_iters or check "
                                                             "the data"))
        if skipped_now and self.fp16:
            return None  # an overflowed step's loss says nothing about the trend
        warning = None
        if self.t.spike_factor and self.seen >= 10 and loss > self.t.spike_factor * self.mean:
            warning = (f"iter {iteration:6d} | warning: loss spike {loss:.4f}, {loss / self.mean:.1f}x its running "
                       f"mean {self.mean:.4f}")
        if math.isfinite(loss):
            self.mean = loss if self.mean is None else 0.95 * self.mean + 0.05 * loss
            self.seen += 1
        return warning


def known_failure(error: Exception, rank: int, timeout: int) -> GptxError | None:
    """Errors raised inside the engine that have a one-line explanation.

    The collective timeouts and lost peers are gloo's (CPU). On GPUs NCCL's watchdog aborts
    the process after train.dist_timeout instead, which still ends the run in bounded time.
    """
    text = str(error).lower()
    if "loss scale already at minimum" in text:  # DeepSpeed's ZeRO fp16 scaler gives up
        return TrainingStopped("fp16 steps keep overflowing at the minimum loss scale (DeepSpeed's ZeRO "
                               "optimizer stopped); use bf16 (ds_configs/gpu_bf16.json), lower train.lr, or "
                               "lower min_loss_scale in the DeepSpeed JSON")
    if not isinstance(error, RuntimeError):
        return None
    if "timed out" in text:
        return PeerFailure(f"rank {rank}: a collective waited train.dist_timeout = {timeout} s for the other "
                           f"ranks and gave up: one of them hung; its own output says where")
    if "connection closed by peer" in text or "connection reset by peer" in text:
        return PeerFailure(f"rank {rank}: another rank went away in the middle of a collective; its own output "
                           f"says why")
    return None
