"""No host synchronization inside a step: nothing on gptx's micro-batch path (loss, hooks, the
wrappers around DeepSpeed's engine) reads a tensor on the host, and the training loop reads the
loss, grad norm and checks once per step, however many micro-batches the step has.

On a CPU nothing waits, so the tests count the Python calls that would wait for a GPU (item,
tolist, float(tensor), bool(tensor), ...), each attributed to the first caller outside torch:
gptx's own code or DeepSpeed's. Synchronizing kernels inside torch's C++ (nonzero on CUDA, say)
are not seen here.
"""
import collections
import functools
import sys
from pathlib import Path

import pytest
import torch

from gptx.analysis.precision_check import batches_for, release
from gptx.cli.pretrain import run_pretrain
from gptx.config import load_config
from gptx.parallel.engine import build_engine, check_step
from tests.helpers.runs import MICRO_MODEL, REPO, make_token_dir, precision_ds, pretrain_args, write_model_yaml
from tests.unit.parallel.test_engine import cpu_fp16  # noqa: F401 (fixture)

SYNCING = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__float__", "__int__", "__index__",
           "__array__")
TORCH = str(Path(torch.__file__).parent)
GPTX = str(REPO / "gptx")


class SyncCounter:
    """While active, counts host-synchronizing Tensor calls by who made them: 'gptx', 'deepspeed' or
    'other' (the first frame outside torch decides), and by file:line for the failure message."""

    def __init__(self, monkeypatch):
        self.by_owner = collections.Counter()
        self.by_line = collections.Counter()
        self.active = False
        for name in SYNCING:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name, original):
        @functools.wraps(original)
        def counted(tensor, *args, **kwargs):
            if self.active:
                frame = sys._getframe(1)
                while frame is not None and frame.f_code.co_filename.startswith(TORCH):
                    frame = frame.f_back
                file = frame.f_code.co_filename if frame is not None else "?"
                owner = "gptx" if file.startswith(GPTX) else "deepspeed" if "/deepspeed/" in file else "other"
                self.by_owner[owner] += 1
                self.by_line[f"{file.split('site-packages/')[-1]}:{frame.f_lineno if frame else 0} {name}"] += 1
            return original(tensor, *args, **kwargs)
        return counted

    def during(self, fn):
        self.by_owner.clear()
        self.by_line.clear()
        self.active = True
        try:
            fn()
        finally:
            self.active = False
        return dict(self.by_owner), dict(self.by_line)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    from gptx.data.tokens import open_tokens
    return open_tokens(make_token_dir(tmp_path_factory.mktemp("sync") / "data"), "train")


PRECISIONS = ["fp32", "fp16-zero0-torch", "fp16-zero0-fused", "fp16-zero1-torch"]


def syncs_per_train_batch(counter, tokens, name: str, accum: int, steps: int = 2, **overrides):
    cfg = load_config(None, {**MICRO_MODEL, "lr": 3e-3, "warmup_iters": 1, "train_iters": 10, "pipe_parallel_size": 1,
                             **overrides})
    ds = precision_ds(name, micro=2, accum=accum)
    engine = build_engine(cfg, ds)
    try:
        windows = batches_for(engine, cfg, ds, tokens)
        engine.train_batch(windows)  # the first step builds buffers and optimizer state
        check_step(engine)
        inside = counter.during(lambda: [engine.train_batch(windows) for _ in range(steps)])
        after = counter.during(lambda: check_step(engine))
        return inside, after
    finally:
        release(engine)


@pytest.mark.parametrize("name", PRECISIONS)
def test_train_batch_reads_nothing_on_the_host_from_gptx_and_no_more_with_more_micro_batches(
        dist_world1, cpu_fp16, tokens, monkeypatch, name):
    counter = SyncCounter(monkeypatch)
    (one, one_lines), after_one = syncs_per_train_batch(counter, tokens, name, accum=1)
    (four, four_lines), after_four = syncs_per_train_batch(counter, tokens, name, accum=4)
    print(f"{name}: 2 steps of 1 micro-batch {one}, of 4 micro-batches {four}; after one step {after_one[0]}")
    assert one.get("gptx", 0) == four.get("gptx", 0) == 0, (one_lines, four_lines)
    # DeepSpeed's own reads are per step too (its overflow check, its optimizer's step counters).
    assert one == four, (one_lines, four_lines)
    # What gptx's workarounds saw is read once per step, after it: the loss-scaling check of the
    # pipeline's fp16 (defect 2) in one call, nothing in fp32.
    expected_after = {"gptx": 1} if name.startswith("fp16") else {}
    assert after_one[0] == after_four[0] == expected_after, (after_one, after_four)


@pytest.mark.parametrize("overrides", [dict(fused_loss=True), dict(fused_loss=True, pipe_parallel_size=0)],
                         ids=["fused loss", "fused loss, no pipeline"])
def test_the_fused_loss_and_the_plain_engine_read_nothing_per_micro_batch(dist_world1, tokens, monkeypatch,
                                                                          overrides):
    counter = SyncCounter(monkeypatch)
    (one, one_lines), _ = syncs_per_train_batch(counter, tokens, "fp32", accum=1, **overrides)
    (four, four_lines), _ = syncs_per_train_batch(counter, tokens, "fp32", accum=4, **overrides)
    assert one.get("gptx", 0) == four.get("gptx", 0) == 0, (one_lines, four_lines)
    assert one == four, (one_lines, four_lines)


def test_the_counter_sees_a_read_made_in_a_micro_batch(dist_world1, tokens, monkeypatch):
    """The counting itself: a loss function that reads its loss on the host shows up once per
    micro-batch, attributed to where it was made."""
    counter = SyncCounter(monkeypatch)
    cfg = load_config(None, dict(MICRO_MODEL, lr=3e-3, warmup_iters=1, train_iters=10, pipe_parallel_size=1))
    ds = precision_ds("fp32", micro=2, accum=3)
    engine = build_engine(cfg, ds)
    try:
        original = engine.module.loss_fn
        def reading_loss(out, labels):
            loss = original(out, labels)
            float(loss.detach())
            return loss
        engine.module.loss_fn = reading_loss
        windows = batches_for(engine, cfg, ds, tokens)
        engine.train_batch(windows)
        counts, lines = counter.during(lambda: engine.train_batch(windows))
    finally:
        release(engine)
    assert counts.get("other", 0) == 3 and counts.get("gptx", 0) == 0, lines


@pytest.mark.parametrize("name", ["fp32", "fp16-zero0-torch"])
def test_the_training_loop_reads_once_per_step_whatever_the_micro_batches(dist_world1, cpu_fp16, tmp_path,
                                                                           monkeypatch, name):
    """launch/pretrain.py's loop, in process: the host reads gptx makes over a run grow with its
    iterations (loss, grad norm, the signal flag, the loss-scaling check) and not with its
    micro-batches."""
    import json
    data = make_token_dir(tmp_path / "data")
    model = write_model_yaml(tmp_path / "model.yaml")
    counter = SyncCounter(monkeypatch)

    def run(accum: int, iters: int) -> int:
        ds = tmp_path / f"ds-{accum}-{iters}.json"
        ds.write_text(json.dumps(precision_ds(name, micro=2, accum=accum)))
        save = tmp_path / f"run-{accum}-{iters}"
        args = pretrain_args(data, model, ds, save, 1, iters, "--eval-interval", "0", "--lr-decay-iters", "10")
        counts, lines = counter.during(lambda: run_pretrain(args))
        return counts.get("gptx", 0), lines

    (short, _), (long, lines) = run(1, 2), run(1, 4)
    (short_four, _), (long_four, lines_four) = run(4, 2), run(4, 4)
    per_step, per_step_four = (long - short) / 2, (long_four - short_four) / 2
    print(f"{name}: gptx's host reads per step: {per_step} with 1 micro-batch, {per_step_four} with 4")
    assert per_step == per_step_four and short == short_four, (lines, lines_four)
    assert 1 <= per_step <= 4, lines  # the loss, the grad norm, the signal flag, the loss-scaling check
