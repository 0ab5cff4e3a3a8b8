"""Faults injected into real runs: signals, kill -9, crashes, damaged checkpoints, numerical trouble."""
import errno
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from gptx.cli.pretrain import run_pretrain
from gptx.config import load_config
from gptx.errors import TrainingStopped
from gptx.training.checkpoint import write_error_code
from gptx.training.checkpoint_files import MANIFEST, incomplete_reason
from gptx.training.guards import NumericsGuard
from gptx.training.resume import find_latest
from tests.helpers.runs import (mount_tmpfs, one_error_line, pretrain_args, read_metrics, run_files, train_losses,
                                unmount)

# --- the numerics guard on its own ---------------------------------------------------------------

def guard(fp16=False, **train):
    return NumericsGuard(load_config("tiny", train), fp16=fp16, min_scale=1.0 if fp16 else None)


def test_non_finite_loss_stops_fp32_and_bf16():
    g = guard()
    assert g.check(1, 5.0, 0, None) is None
    with pytest.raises(TrainingStopped, match="iteration 2: the loss is nan"):
        g.check(2, float("nan"), 0, None)


def test_a_step_applied_with_a_non_finite_gradient_stops_the_run():
    g = guard()
    assert g.check(1, 5.0, 0, None, grad_norm=2.0) is None
    with pytest.raises(TrainingStopped, match="iteration 2: the gradient norm is nan and the step was applied"):
        g.check(2, 5.0, 0, None, grad_norm=float("nan"))  # fp32 stepped: the loss was fine, the weights are not
    skipped = guard()
    assert skipped.check(1, 5.0, 1, None, grad_norm=float("inf")) is None  # bf16 skipped it: nothing was written


def test_bf16_stops_on_a_streak_of_skipped_steps():
    g = guard(max_skipped_at_min_scale=3)
    g.check(1, 5.0, 1, None, grad_norm=float("inf"))
    g.check(2, 5.0, 1, None, grad_norm=1.0)  # a step that went through resets the streak
    g.check(3, 5.0, 2, None, grad_norm=float("inf"))
    g.check(4, 5.0, 3, None, grad_norm=float("inf"))
    with pytest.raises(TrainingStopped, match="iteration 5: 3 steps in a row had non-finite gradients and were "
                                              "skipped, so the model is no longer training"):
        g.check(5, 5.0, 4, None, grad_norm=float("inf"))


def test_fp16_stops_only_on_a_streak_of_skips_at_the_minimum_scale():
    g = guard(fp16=True, max_skipped_at_min_scale=3)
    skipped = 0
    for it in range(1, 6):  # overflows while the scale is still coming down: not a streak
        skipped += 1
        g.check(it, float("inf"), skipped, 2.0 ** (6 - it))
    g.check(6, float("inf"), skipped + 1, 1.0)
    g.check(7, float("inf"), skipped + 2, 1.0)
    g.check(8, 4.0, skipped + 2, 1.0)  # a step that went through resets the streak
    g.check(9, float("inf"), skipped + 3, 1.0)
    g.check(10, float("inf"), skipped + 4, 1.0)
    with pytest.raises(TrainingStopped, match="3 fp16 steps in a row overflowed at the minimum loss scale 1"):
        g.check(11, float("inf"), skipped + 5, 1.0)


def test_spikes_are_reported_against_the_running_mean():
    g = guard(spike_factor=2.0)
    assert all(g.check(i, 3.0, 0, None) is None for i in range(1, 12))
    assert "loss spike 9.0000, 3.0x its running mean 3.0000" in g.check(12, 9.0, 0, None)
    off = guard()  # the default: no spike reports
    assert all(off.check(i, 3.0, 0, None) is None for i in range(1, 12)) and off.check(12, 9.0, 0, None) is None


def test_deepspeeds_zero_fp16_give_up_becomes_one_line():
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from gptx.training.guards import known_failure
    scaler = DynamicLossScaler(init_scale=1, scale_window=1000, min_scale=1, delayed_shift=1,
                               consecutive_hysteresis=False)
    with pytest.raises(Exception) as raised:
        scaler.update_scale(True)  # an overflow at the minimum scale
    failure = known_failure(raised.value, rank=0, timeout=60)
    assert isinstance(failure, TrainingStopped) and "use bf16" in str(failure)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return run_files(tmp_path_factory.mktemp("faults"))


def args(work, save, pipe, iters, *extra):
    return pretrain_args(*work[1:], save, pipe, iters, "--eval-interval", "0", "--log-interval", "1", *extra)


def test_keep_checkpoints_and_fall_back_from_a_damaged_one(dist_world1, work, capsys):
    run = work[0] / "keep"
    assert run_pretrain(args(work, run, 1, 5, "--save-interval", "1", "--keep-checkpoints", "2")) == 0
    assert sorted(f.name for f in run.glob("iter_*")) == ["iter_0000004", "iter_0000005"]
    first = train_losses(run)
    layer = run / "iter_0000005" / "layer_02-model_states.pt"
    layer.write_bytes(layer.read_bytes()[:100])  # truncated, as by a full disk or an interrupted copy
    capsys.readouterr()
    assert run_pretrain(args(work, run, 1, 6, "--load", str(run), "--lr-decay-iters", "5")) == 0
    out = capsys.readouterr().out
    assert "warning: 'latest' names 'iter_0000005' but 'iter_0000005': layer_02-model_states.pt has 100 bytes" in out
    assert "resumed from" in out and "iter_0000004: iteration 4" in out
    assert "done: 2 iterations in" in out and "(iterations 5-6)" in out  # this run's, not the total
    redone = [r["loss"] for r in read_metrics(run) if "loss" in r and r["iter"] == 5]
    assert redone == [first[5], first[5]]  # iteration 5 again, from iteration 4's checkpoint: the same loss
    # Resuming the finished run: said, not "done: 0 iterations (iterations 7-6)".
    assert run_pretrain(args(work, run, 1, 6, "--load", str(run), "--lr-decay-iters", "5")) == 0
    out = capsys.readouterr().out
    assert ("note: the checkpoint is at iteration 6 and train.train_iters is 6: nothing left to train; give "
            "--train-iters N above 6 to go on") in out and "done: 0 iterations in" in out and "(iterations" not in out


def test_damaged_bytes_in_a_manifest_or_in_latest_fall_back_to_the_last_complete_checkpoint(dist_world1, work):
    run = work[0] / "damaged"
    assert run_pretrain(args(work, run, 1, 2, "--save-interval", "1")) == 0
    manifest = run / "iter_0000002" / MANIFEST
    for damage in (b"\xff\xfe\x00\x13", b"[]\n", b'{"gptx.json": "12"}\n'):  # not UTF-8; not a dict; no sizes
        manifest.write_bytes(damage)
        warnings = []
        assert find_latest(run, warn=warnings.append)[0] == "iter_0000001", damage
        assert "'iter_0000002'" in warnings[0] and MANIFEST in warnings[0], warnings
    (run / "latest").write_bytes(b"\xff\xfe")
    assert find_latest(run, warn=[].append)[0] == "iter_0000001"


def test_a_folder_without_manifest_is_skipped_unless_it_predates_manifests(dist_world1, work):
    run = work[0] / "manifests"
    assert run_pretrain(args(work, run, 1, 2, "--save-interval", "1")) == 0
    (run / "iter_0000002" / MANIFEST).unlink()  # as if its writing had stopped halfway
    warnings = []
    assert find_latest(run, warn=warnings.append)[0] == "iter_0000001"
    assert "'iter_0000002': no manifest.json (its writing never finished)" in warnings[0]
    meta_file = run / "iter_0000002" / "gptx.json"
    meta = json.loads(meta_file.read_text())
    del meta["checkpoint_format"]  # what a gptx from before manifests wrote
    meta_file.write_text(json.dumps(meta))
    warnings = []
    assert find_latest(run, warn=warnings.append)[0] == "iter_0000002"
    assert "saved by an older gptx" in warnings[0]


def test_a_save_that_fails_to_replace_a_later_checkpoint_keeps_it(dist_world1, work, monkeypatch, capsys):
    """Resumed from iteration 2 into its own run directory, the run writes iteration 4 again: the
    complete folder it replaces stays until the new one is complete (it was deleted before)."""
    run = work[0] / "rewrite"
    assert run_pretrain(args(work, run, 1, 4, "--save-interval", "2")) == 0
    folder = run / "iter_0000004"
    files = lambda: {p.name: p.read_bytes() for p in folder.iterdir()}
    before = files()
    monkeypatch.setenv("GPTX_FAULT", "delete,save,4,0")
    assert run_pretrain(args(work, run, 1, 4, "--save-interval", "2", "--load", str(run / "iter_0000002"))) == 2
    monkeypatch.delenv("GPTX_FAULT")
    assert f"the last complete checkpoint is {folder} (" in one_error_line(capsys)
    assert files() == before and (run / "latest").read_text() == folder.name and not list(run.glob("*.replaced"))
    assert run_pretrain(args(work, run, 1, 4, "--save-interval", "2", "--load", str(run / "iter_0000002"))) == 0
    assert incomplete_reason(folder) is None and not list(run.glob("*.replaced"))


def test_an_old_checkpoint_that_cannot_be_removed_is_a_warning_and_the_run_goes_on(dist_world1, work, monkeypatch,
                                                                                  capsys):
    run = work[0] / "unremovable"
    remove = shutil.rmtree

    def refuse(path, *rest, **kwargs):  # what an immutable or foreign-owned file in the folder does
        if Path(path).name == "iter_0000001":
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        return remove(path, *rest, **kwargs)
    monkeypatch.setattr(shutil, "rmtree", refuse)
    assert run_pretrain(args(work, run, 1, 3, "--save-interval", "1", "--keep-checkpoints", "1")) == 0
    out = capsys.readouterr().out
    assert (f"warning: could not remove the old checkpoint {run / 'iter_0000001'} (Operation not permitted); training "
            f"goes on, remove it by hand") in out
    assert sorted(p.name for p in run.glob("iter_*")) == ["iter_0000001", "iter_0000003"]


def test_non_finite_numbers_stop_the_run_and_keep_the_checkpoints_before_them(dist_world1, work, capsys):
    run = work[0] / "nan"
    assert run_pretrain(args(work, run, 1, 6, "--save-interval", "1", "--lr", "1e30")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Stopped without saving" in err
    stopped = int(re.search(r"iteration (\d+): the (loss|gradient norm) is nan", err).group(1))
    losses = train_losses(run)
    assert max(losses) == stopped and all(math.isfinite(losses[i]) for i in range(1, stopped))
    for tag in [p.name for p in run.glob("iter_*")]:  # before: the step that went wrong was saved, weights of nan
        layers = [torch.load(f, weights_only=True) for f in (run / tag).glob("layer_*")]
        assert layers and all(torch.isfinite(t).all() for layer in layers for t in layer.values()), tag
    # The newest checkpoint's weights led to the stop: it is named as such, not as a good one.
    assert (run / "latest").read_text() == f"iter_{stopped - 1:07d}"
    assert f"the newest checkpoint, {run / f'iter_{stopped - 1:07d}'}, holds the weights that led to this" in err


def test_an_fp32_step_with_a_non_finite_gradient_is_never_saved(dist_world1, work, capsys, monkeypatch):
    # A backward that overflows while the forward's loss stays finite: fp32 applies the step.
    import gptx.model.layers
    import gptx.training.trainer

    class Poison(torch.autograd.Function):
        poisoned = False

        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan") if Poison.poisoned else grad
    norm_forward, train_step = gptx.model.layers.FinalNorm.forward, gptx.training.trainer.Trainer.train_step

    def step(trainer):
        Poison.poisoned = trainer.iteration + 1 == 3
        return train_step(trainer)
    monkeypatch.setattr(gptx.model.layers.FinalNorm, "forward", lambda self, x: Poison.apply(norm_forward(self, x)))
    monkeypatch.setattr(gptx.training.trainer.Trainer, "train_step", step)
    run = work[0] / "nan_grad"
    assert run_pretrain(args(work, run, 1, 4, "--save-interval", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: iteration 3: the gradient norm is nan and the step was applied, so the weights are no "
                   f"longer finite; lower train.lr, raise train.warmup_iters or check the data. Stopped without "
                   f"saving; the newest checkpoint, {run / 'iter_0000002'}, holds the weights that led to this: "
                   f"--load an earlier one")
    assert sorted(p.name for p in run.glob("iter_*")) == ["iter_0000001", "iter_0000002"]


def test_a_signal_during_a_long_evaluation_ends_it_after_one_batch_and_the_checkpoint_is_kept(
        dist_world1, work, capsys, monkeypatch):
    import os
    import signal

    import gptx.training.trainer
    evaluate = gptx.training.trainer.validation_loss
    batches = []

    def signalled_in_the_third_batch(engine, splits, plan, rank, stopped):
        def poll():
            batches.append(1)
            if len(batches) == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's preemption, mid-evaluation
            return stopped()
        return evaluate(engine, splits, plan, rank, poll)
    monkeypatch.setattr(gptx.training.trainer, "validation_loss", signalled_in_the_third_batch)
    run = work[0] / "stopped_in_eval"
    # 10,000 evaluation batches: before, the stop waited for all of them.
    assert run_pretrain(args(work, run, 1, 6, "--eval-interval", "2", "--eval-iters", "10000",
                             "--save-interval", "2")) == 0
    out = capsys.readouterr().out
    assert len(batches) == 3 and "iter      2 | evaluation stopped by SIGTERM" in out
    assert f"stopped by SIGTERM at iteration 2; --load {run} continues from here" in out
    records = read_metrics(run)
    # Saved before the evaluation began, and no half evaluation recorded.
    assert [r for r in records if "checkpoint" in r][-1]["iter"] == 2 and not any("val_loss" in r for r in records)
    assert (run / "latest").read_text() == "iter_0000002"


ITERS = 12


# Every launcher run below also goes through a sequence-length warmup (16 tokens, then 32 from
# iteration 7) and a batch ramp (2 sequences, 4 from sample 16, iteration 9): the resumes land
# inside both, on 2 stages, where the warmup needs the pipeline's buffers reset. Dropout is on,
# so each rank's random streams must come back too, and evaluations at iterations 4, 8 and 12
# (dropout off, then on again) come before and after the resume points.
CURRICULUM = ("--seq-len-warmup", "0:16,6:32", "--rampup-batch-size", "2,2,16", "--set", "dropout=0.1",
              "--eval-interval", "4", "--eval-iters", "1")


@pytest.fixture
def small_fs(tmp_path):
    """mount(name, kib, read_only) -> a tmpfs of that size; where mounting is not allowed the test is skipped."""
    mounted = []

    def mount(name, kib, read_only=False):
        path = tmp_path / name
        why_not = mount_tmpfs(path, kib, read_only)
        if why_not:
            pytest.skip(why_not)
        mounted.append(path)
        return path
    yield mount
    for path in mounted:
        unmount(path)


def test_every_way_torch_reports_a_full_disk_is_a_full_disk(small_fs):
    # torch.save fails differently by where the space runs out: inside a tensor's record, or in the
    # archive's end. Sizes around the free space hit both; an unrecognised one would make that rank
    # raise its own traceback while the others print the one line.
    import errno
    import os

    import torch
    disk = small_fs("fill", 256)
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    seen = set()
    for size in range(free - 4096, free + 1024, 64):
        target = disk / "t.pt"
        try:
            torch.save(torch.zeros(size // 4, dtype=torch.float32), target)
        except Exception as e:  # noqa: BLE001 -- each is classified below
            assert write_error_code(e, disk) == (errno.ENOSPC, None), e
            seen.add(str(e)[:40])
        target.unlink(missing_ok=True)
    assert len(seen) >= 2, seen  # both failure points were reached


def test_read_only_save_is_one_line_before_training(dist_world1, work, small_fs, capsys):
    # As root, chmod 0555 does not stop writes; a read-only mount does.
    run = small_fs("ro", 256, read_only=True) / "run"
    assert run_pretrain(args(work, run, 1, 2)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"error: --save '{run}' cannot be written: Read-only file system" in err and "nothing was trained" in err
    assert "iter      1" not in captured.out


def test_a_run_directory_that_cannot_be_made_is_one_line_before_training(dist_world1, work, monkeypatch, capsys):
    monkeypatch.chdir(work[0])
    Path("runs").write_text("a file where the runs folder would go\n")
    argv = args(work, work[0] / "unused", 1, 2)
    assert run_pretrain(argv[:argv.index("--save")] + argv[argv.index("--save") + 2:]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.splitlines() == [f"error: cannot make a run directory in '{work[0] / 'runs'}': File exists; pass --save "
                                f"DIR with a writable directory (nothing was trained)"], err
    assert "iter      1" not in captured.out


def test_a_checkpoint_folder_deleted_while_written_is_one_line_and_resumes(dist_world1, work, monkeypatch, capsys):
    run = work[0] / "deleted"
    monkeypatch.setenv("GPTX_FAULT", "delete,save,2,0")
    assert run_pretrain(args(work, run, 1, 3, "--save-interval", "1")) == 2
    monkeypatch.delenv("GPTX_FAULT")
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert (f"error: could not write checkpoint iter_0000002 to {run}: No such file or directory (the directory was "
            f"deleted while the run was writing to it); the last complete checkpoint is {run / 'iter_0000001'}") in err
    assert not (run / "iter_0000002").exists() and (run / "latest").read_text() == "iter_0000001"
    first = train_losses(run)
    assert run_pretrain(args(work, run, 1, 3, "--save-interval", "1", "--load", str(run))) == 0
    assert "iter_0000001: iteration 1" in capsys.readouterr().out
    assert [r["loss"] for r in read_metrics(run) if r.get("iter") == 2 and "loss" in r] == [first[2], first[2]]


def test_a_checkpoint_that_will_not_fit_stops_before_writing_and_resumes(dist_world1, work, small_fs, capsys):
    # Room for one checkpoint of this model (about 0.8 MB) and the run's small files, not for two.
    run = small_fs("small", 1400) / "run"
    assert run_pretrain(args(work, run, 1, 3, "--save-interval", "1")) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "warning: the next checkpoint will not fit" in captured.out
    assert len(err.splitlines()) == 1, err
    assert f"error: could not write checkpoint iter_0000002 to {run}: No space left on device (" in err
    assert "bytes needed, " in err and f"the last complete checkpoint is {run / 'iter_0000001'}" in err
    assert not (run / "iter_0000002").exists() and (run / "latest").read_text() == "iter_0000001"
    elsewhere = work[0] / "after_full"
    assert run_pretrain(args(work, elsewhere, 1, 3, "--save-interval", "1", "--load", str(run))) == 0
    assert "iter_0000001: iteration 1" in capsys.readouterr().out and (elsewhere / "latest").read_text() == "iter_0000003"
