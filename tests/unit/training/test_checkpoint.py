"""Checkpoints leave the pipeline: the plain model, another stage count, the tools that read them."""
import json
from pathlib import Path

import numpy as np
import pytest

from gptx.cli.evaluate import run_evaluate
from gptx.cli.pretrain import parse_pretrain_args, run_pretrain
from gptx.cli.sample import run_sample
from gptx.data.tokens import open_tokens
from gptx.interop.evaluate import evaluate_tokens
from gptx.testing import CPU_FP16_ENV
from gptx.training.consolidate import load_plain_model
from gptx.training.trainer import Trainer
from tests.helpers.runs import pretrain_args, read_metrics, run_files, train_losses, write_ds_config


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return run_files(tmp_path_factory.mktemp("ckpt"))


def args(work, save, pipe, iters, *extra):
    return pretrain_args(*work[1:], save, pipe, iters, "--eval-interval", "3", "--eval-iters", "2", *extra)


@pytest.fixture(scope="module")
def one_stage_run(dist_world1, work):
    run = work[0] / "one"
    assert run_pretrain(args(work, run, 1, 6)) == 0
    return run


def test_plain_model_reproduces_the_engines_val_loss(work, one_stage_run):
    model, cfg = load_plain_model(one_stage_run)
    val = open_tokens(work[1], "val")
    n = 2 * 2 * 2  # eval_iters x micro-batches x micro-batch size windows, in order
    result = evaluate_tokens(model, val[:n * 32 + 1], 32)
    engine_val = [r["val_loss"] for r in read_metrics(one_stage_run) if "val_loss" in r][-1]
    assert result["loss"] == pytest.approx(engine_val, abs=1e-5)
    assert result["tokens"] == n * 32


def test_evaluate_and_sample_tools(work, one_stage_run, capsys):
    assert run_evaluate(["--load", str(one_stage_run), "--data", str(work[1] / "val.bin"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == len(open_tokens(work[1], "val")) - 1 and result["perplexity"] > 1
    assert run_sample(["--load", str(one_stage_run), "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
                       "--greedy", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ids"][:3] == [1, 2, 3] and len(out["ids"]) == 8 and out["text"] is None  # 256-token vocabulary
    assert run_sample(["--load", str(one_stage_run), "--prompt-ids", "1,999"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err


def test_evaluate_refuses_a_context_beyond_learned_positions(one_stage_run, work, capsys):
    assert run_evaluate(["--load", str(one_stage_run), "--data", str(work[1]), "--seq-len", "64"]) == 2
    assert "learned positions end at 32" in capsys.readouterr().err


def assert_masters_round_to_the_layer_files(run):
    import torch
    half, _ = load_plain_model(run)
    masters, _ = load_plain_model(run, master_weights=True)
    differs = 0
    for (name, h), (_, m) in zip(half.named_parameters(), masters.named_parameters()):
        # The bf16 weights are the rounded fp32 masters, so a wrong slice or order shows here.
        assert torch.equal(m.to(torch.bfloat16).float(), h), name
        differs += int(not torch.equal(m, h))
    assert differs > len(list(half.parameters())) // 2  # the masters hold more than bf16 does


def bf16_config(tmp):
    return write_ds_config(tmp / "bf16.json", micro=2, accum=2, bf16={"enabled": True},
                           zero_optimization={"stage": 1}, data_types={"grad_accum_dtype": "fp32"})


def test_master_weights_of_a_bf16_run(dist_world1, work):
    run = work[0] / "bf16_one"  # ALiBi: position slot 1 holds no parameters, so no master weights either
    assert run_pretrain(args(work, run, 1, 3, "--deepspeed_config", str(bf16_config(work[0])),
                             "--set", "position_embedding=alibi")) == 0
    assert_masters_round_to_the_layer_files(run)


def resume_and_save_at_once(argv: list[str]) -> None:
    """Resume as `argv` says and save straight away, before any step: the new checkpoint holds
    what the resume loaded, written by DeepSpeed's own save of the optimizer."""
    cfg, paths = parse_pretrain_args(argv)
    trainer = Trainer(cfg, paths)
    trainer.setup()
    trainer.save()
    trainer.metrics.close()


def assert_same_masters(run, resaved):
    """The resumed engine's fp32 masters are the checkpoint's to the bit, not its 16-bit weights
    widened again (which differ from them in most tensors)."""
    import torch
    saved, _ = load_plain_model(run, master_weights=True)
    loaded, _ = load_plain_model(resaved, master_weights=True)
    half, _ = load_plain_model(run)
    for (name, a), (_, b) in zip(saved.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name
    assert sum(not torch.equal(a, h) for a, h in zip(saved.parameters(), half.parameters())) > \
        len(list(half.parameters())) // 2


def assert_masters_are_deepspeeds_consolidation(run):
    """gptx's reader of ZeRO-3's shards against DeepSpeed's own (zero_to_fp32)."""
    import contextlib

    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    with contextlib.redirect_stdout(None):
        theirs = get_fp32_state_dict_from_zero_checkpoint(str(run))
    ours, _ = load_plain_model(run, master_weights=True)
    assert theirs.keys() == dict(ours.named_parameters()).keys()
    assert all(torch.equal(theirs[name], p) for name, p in ours.named_parameters())


TORCH_ADAMW = {"optimizer": {"type": "AdamW", "params": {"torch_adam": True, "weight_decay": 0.1}}}  # not fused
DEEPSPEED_ADAMW = {"optimizer": {"type": "AdamW", "params": {"weight_decay": 0.1}}}  # FusedAdam: FP16_Optimizer
ZERO = lambda stage: {"zero_optimization": {"stage": stage}}
AMSGRAD = {"optimizer": {"type": "AdamW", "params": {"torch_adam": True, "amsgrad": True}}}


@pytest.mark.parametrize("name, source, target", [
    ("fp32", (1, {}), (0, {})),  # torch's fused AdamW, state per tensor -> without a pipeline
    ("fp32", (1, DEEPSPEED_ADAMW), (0, DEEPSPEED_ADAMW)),  # FusedAdam: a step count on each group's last tensor
    ("fp32", (1, AMSGRAD), (0, AMSGRAD)),  # amsgrad's largest second moment too
    ("bf16", (1, {}), (0, {})),  # the pipeline's bf16 optimizer -> without a pipeline
    ("bf16", (1, {}), (0, ZERO(3))),  # -> ZeRO-3's shards
    ("bf16", (0, ZERO(3)), (1, {})),  # ZeRO-3's shards -> the pipeline's bf16 optimizer
    ("fp16", (0, ZERO(1)), (1, {})),  # ZeRO-1 -> the pipeline's FP16_UnfusedOptimizer (fused torch AdamW)
    ("fp16", (0, {**TORCH_ADAMW, **ZERO(1)}), (1, TORCH_ADAMW)),  # the same with torch's unfused AdamW
    ("fp16", (1, DEEPSPEED_ADAMW), (0, {**DEEPSPEED_ADAMW, **ZERO(1)})),  # FP16_Optimizer's flat groups -> ZeRO-1
    ("fp32", (0, {"zero_optimization": {"stage": 1, "elastic_checkpoint": True}}), (1, {})),  # a state per group
    # The same stages, another ZeRO stage: DeepSpeed's own load stops (an AttributeError; a missing file).
    ("fp32", (1, ZERO(1)), (1, {})),
    ("fp32", (1, {}), (1, ZERO(1))),
])
def test_a_run_resumed_on_another_layout_keeps_its_fp32_master_weights_and_adams_state(
        dist_world1, work, monkeypatch, capsys, request, name, source, target):
    """Saved after 3 iterations on one layout, resumed on another: the fp32 masters are the
    checkpoint's to the bit, and with Adam's moments and step count the loss goes on as if nothing
    had changed. Restarted moments move it by more than 1e-3 by iteration 6 in every case."""
    monkeypatch.setenv(CPU_FP16_ENV, "1")
    half = {"fp32": {},
            "bf16": {"bf16": {"enabled": True}, **ZERO(1), "data_types": {"grad_accum_dtype": "fp32"}},
            "fp16": {"fp16": {"enabled": True, "initial_scale_power": 8}}}[name]
    (source_pipe, _), (target_pipe, target_extra) = source, target
    case = "relayout_" + request.node.callspec.id
    # The resumed run's JSON starts fp16's dynamic loss scale elsewhere: the checkpoint's must win.
    other_scale = {"fp16": {"enabled": True, "initial_scale_power": 12}} if name == "fp16" else {}
    ds = [write_ds_config(work[0] / f"{case}_{end}.json", micro=2, accum=2, **{**half, **extra})
          for end, extra in (("from", source[1]), ("to", {**target_extra, **other_scale}))]
    run, resaved, full = (work[0] / f"{case}{end}" for end in ("", "_resaved", "_full"))
    schedule = ("--lr-decay-iters", "6")
    # The reference first: a ZeRO-3 engine leaves torch's linear wrapped in the process after it is gone.
    assert run_pretrain(args(work, full, source_pipe, 6, "--deepspeed_config", str(ds[0]), *schedule)) == 0
    assert run_pretrain(args(work, run, source_pipe, 3, "--deepspeed_config", str(ds[0]), *schedule)) == 0
    resume_and_save_at_once(args(work, resaved, target_pipe, 6, "--load", str(run), "--deepspeed_config", str(ds[1]),
                                 *schedule))
    assert ("Adam's moments and step count, the loss scale, iteration" if name == "fp16" else
            "Adam's moments and step count, iteration") in capsys.readouterr().out
    if name != "fp32":
        if name == "bf16":  # the reader of the masters, checked on its own: they round to the saved weights
            assert_masters_round_to_the_layer_files(run)
            assert_masters_round_to_the_layer_files(resaved)
        assert_same_masters(run, resaved)
        for zero3_run in [r for r, extra in ((run, source[1]), (resaved, target_extra)) if extra == ZERO(3)]:
            assert_masters_are_deepspeeds_consolidation(zero3_run)
    assert run_pretrain(args(work, run, target_pipe, 6, "--load", str(run), "--deepspeed_config", str(ds[1]),
                             *schedule)) == 0
    resumed, uninterrupted = train_losses(run), train_losses(full)
    assert resumed.keys() == uninterrupted.keys()
    # Bit-equal in this session's CPU runs. ZeRO-3's own sums differ from the other layouts' by up to about 1e-4.
    tolerance = 3e-4 if ZERO(3) in (source[1], target_extra) else 1e-6
    assert all(abs(resumed[i] - uninterrupted[i]) <= tolerance for i in resumed), (resumed, uninterrupted)
    scales = lambda path: [r["loss_scale"] for r in read_metrics(path) if "loss" in r]
    assert scales(run) == scales(full) == [2.0 ** 8 if name == "fp16" else None] * 6


@pytest.mark.parametrize("source, target", [("bf16", "fp32"), ("fp32", "bf16")])
def test_a_resume_in_another_precision_keeps_the_exact_fp32_weights(dist_world1, work, source, target):
    """bf16 -> fp32: the fp32 run's weights are the checkpoint's masters (before: its bf16-rounded
    weights, while the log said the masters carried over); fp32 -> bf16: the bf16 run's masters are
    the fp32 checkpoint's weights (before: widened back from their bf16 rounding)."""
    import torch
    bf16 = {"bf16": {"enabled": True}, **ZERO(1), "data_types": {"grad_accum_dtype": "fp32"}}
    ds = {end: write_ds_config(work[0] / f"{source}_to_{target}_{end}.json", micro=2, accum=2,
                               **(bf16 if precision == "bf16" else {}))
          for end, precision in (("from", source), ("to", target))}
    run, resaved = work[0] / f"{source}_to_{target}", work[0] / f"{source}_to_{target}_resaved"
    assert run_pretrain(args(work, run, 1, 3, "--deepspeed_config", str(ds["from"]), "--lr-decay-iters", "6")) == 0
    resume_and_save_at_once(args(work, resaved, 1, 6, "--load", str(run), "--deepspeed_config", str(ds["to"]),
                                 "--lr-decay-iters", "6"))
    saved, _ = load_plain_model(run, master_weights=source == "bf16")
    loaded, _ = load_plain_model(resaved, master_weights=target == "bf16")
    for (name, a), (_, b) in zip(saved.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name


def test_another_partition_of_the_same_stages_is_a_layout_change():
    from gptx.training.relayout import layout_change
    meta = {"pipe_parallel_size": 2, "data_parallel_size": 1, "config": {"train": {"partition_method": "parameters"}}}
    # Before: DeepSpeed's own load, whose stage files hold other layers now (a ValueError on every rank).
    assert layout_change(meta, Path("."), 2, 1, {}, "compute") == (
        "the checkpoint's 2 pipeline stage(s) were partitioned by 'parameters' and this run's by 'compute'")
    assert layout_change(meta, Path("."), 2, 1, {}, "Parameters") is None


@pytest.mark.parametrize("source, target", [(1, 0), (0, 1)], ids=["bf16", "elastic-zero1"])
def test_a_checkpoint_of_iteration_0_resumes_on_another_layout_as_a_new_run_there(dist_world1, work, capsys,
                                                                                   source, target):
    """Saved before the first step, the optimizer holds no state yet (DeepSpeed's bf16 optimizer none,
    ZeRO's elastic_checkpoint an empty one per group): the run resumed on the other layout trains as a
    new run there does."""
    ds = str(bf16_config(work[0]) if source else write_ds_config(
        work[0] / "elastic.json", micro=2, accum=2, zero_optimization={"stage": 1, "elastic_checkpoint": True}))
    start, fresh = work[0] / f"iteration_0_{source}", work[0] / f"iteration_0_fresh_{source}"
    cfg, paths = parse_pretrain_args(args(work, start, source, 3, "--deepspeed_config", ds))
    trainer = Trainer(cfg, paths)
    trainer.setup()
    trainer.save()
    trainer.metrics.close()
    assert run_pretrain(args(work, start, target, 3, "--load", str(start), "--deepspeed_config", ds)) == 0
    assert "Adam's moments and step count, iteration" in capsys.readouterr().out
    assert run_pretrain(args(work, fresh, target, 3, "--deepspeed_config", ds)) == 0
    assert train_losses(start) == train_losses(fresh)


def test_master_weights_of_a_fp32_run_are_its_weights(one_stage_run):
    a, _ = load_plain_model(one_stage_run)
    b, _ = load_plain_model(one_stage_run, master_weights=True)
    assert all(np.array_equal(x.detach().numpy(), y.detach().numpy())
               for x, y in zip(a.parameters(), b.parameters()))


def test_training_prints_a_sample_at_each_evaluation(dist_world1, work, capsys):
    run = work[0] / "sampled"
    assert run_pretrain(args(work, run, 1, 4, "--sample-tokens", "5")) == 0
    samples = [r for r in read_metrics(run) if "sample" in r]
    assert [r["iter"] for r in samples] == [3, 4]
    ids = [int(t) for t in samples[0]["sample"].split()]
    assert len(ids) == 6 and ids[0] == 0  # token 0 then 5 new ones (not GPT-2's vocabulary: ids, not text)
    assert "sample: '0 " in capsys.readouterr().out
    # The sample draws from its own generator: training continues exactly as without it.
    plain = work[0] / "unsampled"
    assert run_pretrain(args(work, plain, 1, 4)) == 0
    assert train_losses(run) == train_losses(plain)
    assert run_pretrain(args(work, work[0] / "bad_prompt", 1, 4, "--sample-tokens", "5", "--sample-prompt", "hi")) == 2
    assert "train.sample_prompt is text for GPT-2 BPE" in capsys.readouterr().err
    quiet = work[0] / "no_evaluation"
    assert run_pretrain(args(work, quiet, 1, 1, "--sample-tokens", "5", "--eval-interval", "0")) == 0
    assert "note: train.sample_tokens samples at each evaluation, and train.eval_interval 0 runs none" in \
        capsys.readouterr().out


def test_a_resume_on_another_lr_schedule_is_refused_unless_told_which(dist_world1, work, capsys):
    run = work[0] / "extend"
    assert run_pretrain(args(work, run, 1, 3)) == 0  # the schedule decays over 3 iterations
    capsys.readouterr()
    # Extending the run: lr_decay_iters follows train_iters, so the schedule would jump.
    assert run_pretrain(args(work, run, 1, 5, "--load", str(run))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "decay_iters 3 (checkpoint) vs 5 (now) (lr_decay_iters defaults to train_iters); " \
        "pass --lr-decay-iters 3 to keep the checkpoint's, or --override-lr-schedule" in err[0]
    assert max(train_losses(run)) == 3  # nothing was trained or written
    lrs = lambda: {r["iter"]: r["lr"] for r in read_metrics(run) if "loss" in r}
    # Keeping the checkpoint's schedule: after its end the LR stays at min_lr, no jump.
    assert run_pretrain(args(work, run, 1, 4, "--load", str(run), "--lr-decay-iters", "3")) == 0
    assert lrs()[4] == pytest.approx(3e-4) and lrs()[4] <= lrs()[3]
    # Or the new one, on request, with a warning. The checkpoint now holds --lr-decay-iters 3, which
    # a resume keeps unless given again.
    capsys.readouterr()
    assert run_pretrain(args(work, run, 1, 6, "--load", str(run), "--lr-decay-iters", "6",
                             "--override-lr-schedule")) == 0
    assert "warning: the learning-rate schedule changes at this resume (decay_iters 3 (checkpoint) vs 6 (now))" \
        in capsys.readouterr().out
    assert lrs()[5] > lrs()[4]


def test_a_run_that_ended_within_its_warmup_extends_on_the_same_schedule(dist_world1, work, capsys):
    """Every lr_decay_iters up to warmup_iters gives the same LRs: that resume was refused, and the
    suggested --lr-decay-iters then refused as not beyond warmup_iters."""
    run = work[0] / "in_warmup"
    assert run_pretrain(args(work, run, 1, 2, "--warmup-iters", "4")) == 0
    assert run_pretrain(args(work, run, 1, 3, "--warmup-iters", "4", "--load", str(run))) == 0
    capsys.readouterr()
    assert run_pretrain(args(work, run, 1, 6, "--warmup-iters", "4", "--load", str(run))) == 2
    err = capsys.readouterr().err.strip()
    assert "decay_iters 4 (checkpoint) vs 6 (now)" in err and "ended within its warmup, so pass " \
        "--override-lr-schedule" in err and "--lr-decay-iters 4" not in err, err


@pytest.mark.parametrize("zero", [0, 1])
def test_an_overridden_schedule_sets_the_lr_of_the_first_resumed_step(dist_world1, work, tmp_path, zero):
    from gptx.training.schedule import lr_at
    ds = write_ds_config(tmp_path / "ds.json", micro=2, accum=2, zero_optimization={"stage": zero})
    run = tmp_path / "run"
    flags = lambda iters, *extra: pretrain_args(work[1], work[2], ds, run, 1, iters, "--warmup-iters", "2",
                                                "--lr-decay-iters", "8", "--eval-interval", "0", *extra)
    assert run_pretrain(flags(3, "--lr", "1e-3")) == 0
    assert run_pretrain(flags(5, "--lr", "2e-3", "--load", str(run), "--override-lr-schedule")) == 0
    lrs = {r["iter"]: r["lr"] for r in read_metrics(run) if "loss" in r}
    assert lrs[3] == pytest.approx(lr_at(2, 1e-3, 1e-4, 2, 8))
    # Iteration 4 is optimizer step 3 of the new schedule (ZeRO's optimizer load put the old lr back).
    assert [lrs[4], lrs[5]] == pytest.approx([lr_at(3, 2e-3, 2e-4, 2, 8), lr_at(4, 2e-3, 2e-4, 2, 8)])


def test_evaluate_reports_progress_on_stderr_and_refuses_a_zero_context(work, one_stage_run, capsys):
    assert run_evaluate(["--load", str(one_stage_run), "--data", str(work[1]), "--batch-size", "4", "--json"]) == 0
    captured = capsys.readouterr()
    windows = -(-(len(open_tokens(work[1], "val")) - 1) // 32)
    progress = captured.err.strip().splitlines()
    assert progress[-1] == f"evaluate (context 32): {windows:,}/{windows:,} windows (100%)" and 5 <= len(progress) <= 10
    assert json.loads(captured.out)["seq_len"] == 32  # stdout holds the result alone
    for flag, needle in (("--seq-len", "--seq-len: must be at least 1, got 0"),
                         ("--batch-size", "--batch-size: must be at least 1, got 0")):
        assert run_evaluate(["--load", str(one_stage_run), "--data", str(work[1]), flag, "0"]) == 2
        assert capsys.readouterr().err.strip() == f"error: {needle}"


def test_sample_says_when_the_output_outgrows_the_context(one_stage_run, capsys):
    assert run_sample(["--load", str(one_stage_run), "--prompt-ids", "1,2,3", "--max-new-tokens", "40",
                       "--greedy", "--json"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)["ids"]) == 43
    assert "longer than the model's context (32 tokens" in captured.err


def test_evaluate_prints_a_context_length_table(work, one_stage_run, capsys):
    base = ["--load", str(one_stage_run), "--data", str(work[1]), "--json"]
    assert run_evaluate(base + ["--seq-len", "32"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert run_evaluate(base + ["--seq-len", "16,32,64"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["seq_len"] for r in rows] == [16, 32, 64]
    assert rows[1] == single  # the same numbers as evaluating that length alone
    assert rows[0]["loss"] > rows[1]["loss"]  # less context, harder predictions (the ramp in the data)
    assert "learned positions end at 32" in rows[2]["refused"]
    assert run_evaluate(base[:-1] + ["--seq-len", "16,32,64"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("context") and "(trained at 32, learned positions)" in table[0]
    assert table[3] == "     64   refused: --seq-len 64: this model's learned positions end at 32"
    assert run_evaluate(base + ["--seq-len", "16,x"]) == 2
    assert "--seq-len '16,x': expected an integer or comma-separated integers" in capsys.readouterr().err
    assert run_evaluate(base + ["--seq-len", "16,32", "--batch-size", "0"]) == 2  # an error, not a table row
    assert "--batch-size: must be at least 1, got 0" in capsys.readouterr().err


def test_a_batch_ramp_trains_through_its_changes_and_resumes_exactly_inside_it(dist_world1, work, capsys):
    # A JSON batch of 2 x 4 micro-batches = 8 sequences; the ramp starts at 4 (2 micro-batches) and
    # adds 2 at even steps over the first 24 samples: 4, 4, 4, 6, 6, 8, 8 sequences.
    ds = write_ds_config(work[0] / "ramp.json", micro=2, accum=4)
    ramp = ["--rampup-batch-size", "4,2,24", "--eval-interval", "0", "--deepspeed_config", str(ds)]
    full = work[0] / "ramp_full"
    assert run_pretrain(args(work, full, 1, 7, *ramp)) == 0
    out = capsys.readouterr().out
    assert "ramped up from 4 over 24 samples" in out and "iter      4 | batch size 6 sequences (3 micro-batches)" in out
    records = [r for r in read_metrics(full) if "loss" in r]
    assert [r["batch_size"] for r in records] == [4, 4, 4, 6, 6, 8, 8]
    assert [r["tokens"] for r in records] == [32 * n for n in (4, 8, 12, 18, 24, 32, 40)]
    # Stopped after iteration 4 (inside the ramp) and resumed: the same samples, the same losses.
    part = work[0] / "ramp_part"
    assert run_pretrain(args(work, part, 1, 7, *ramp, "--exit-interval", "4")) == 0
    assert run_pretrain(args(work, part, 1, 7, *ramp, "--load", str(part))) == 0
    assert train_losses(part) == train_losses(full)


def test_a_batch_ramp_without_a_pipeline_steps_once_per_iteration_and_resumes_exactly(dist_world1, work):
    """DeepSpeed's own engine steps when its running count of micro-batches reaches a multiple of the
    current accumulation; a ramp changes that mid-run, and a fresh engine restarts the count. gptx
    restarts it at each change (defect 9 in gptx/parallel/engine.py)."""
    ds = write_ds_config(work[0] / "ramp0.json", micro=2, accum=4)
    # 1, 1, 1, 2, 2, 3, 4 micro-batches: a running count of 3 is not a multiple of 2, nor 7 of 3.
    ramp = ["--rampup-batch-size", "2,2,16", "--eval-interval", "0", "--deepspeed_config", str(ds)]
    runs = {pipe: work[0] / f"ramp_pipe{pipe}" for pipe in (0, 1)}
    for pipe, run in runs.items():
        assert run_pretrain(args(work, run, pipe, 7, *ramp)) == 0
    assert [r["batch_size"] for r in read_metrics(runs[0]) if "loss" in r] == [2, 2, 2, 4, 4, 6, 8]
    piped, plain = train_losses(runs[1]), train_losses(runs[0])
    assert sorted(plain) == list(range(1, 8))
    assert max(abs(plain[i] - piped[i]) for i in piped) < 1e-5, (plain, piped)
    part = work[0] / "ramp_pipe0_part"
    assert run_pretrain(args(work, part, 0, 7, *ramp, "--exit-interval", "4")) == 0
    assert run_pretrain(args(work, part, 0, 7, *ramp, "--load", str(part))) == 0
    assert train_losses(part) == plain


def test_a_sequence_length_warmup_trains_on_the_samples_first_tokens_and_resumes_exactly_inside_it(
        dist_world1, work, capsys):
    warmup = ["--seq-len-warmup", "0:8,3:16,5:32", "--eval-interval", "4"]
    full = work[0] / "warmup_full"
    assert run_pretrain(args(work, full, 1, 6, *warmup)) == 0
    out = capsys.readouterr().out
    assert "iter      4 | sequence length 16" in out and "iter      6 | sequence length 32" in out
    assert "note: train.seq_len_warmup ends" not in out  # it ends on model.seq_len
    records = [r for r in read_metrics(full) if "loss" in r]
    assert [r["seq_len"] for r in records] == [8, 8, 8, 16, 16, 32]
    assert [r["tokens"] for r in records] == [4 * n for n in (8, 16, 24, 40, 56, 88)]  # 4 sequences per step
    assert [r["iter"] for r in read_metrics(full) if "val_loss" in r] == [4, 6]  # at the full length
    # The samples are the windows a run without warmup trains on, cut short.
    from gptx.data.tokens import TokenWindows
    tokens = open_tokens(work[1], "train")
    full_rows, short = next(TokenWindows(tokens, 32, 2, seed=7)), TokenWindows(tokens, 32, 2, seed=7)
    short.length = 8
    x, y = next(short)
    assert x.equal(full_rows[0][:, :8]) and y.equal(full_rows[1][:, :8])
    # Stopped inside the warmup (after iteration 4) and resumed: the same losses, the same tokens.
    part = work[0] / "warmup_part"
    assert run_pretrain(args(work, part, 1, 6, *warmup, "--exit-interval", "4")) == 0
    assert run_pretrain(args(work, part, 1, 6, *warmup, "--load", str(part))) == 0
    resumed = [r for r in read_metrics(part) if "loss" in r]
    assert train_losses(part) == train_losses(full) and resumed[-1]["tokens"] == records[-1]["tokens"]
    capsys.readouterr()
    assert run_pretrain(args(work, work[0] / "warmup_short", 1, 1, "--seq-len-warmup", "0:8,2:16")) == 0
    assert ("note: train.seq_len_warmup ends at 16 tokens, below model.seq_len 32: from iteration 3 on, every "
            "step trains on 16; end it with ITER:32 to reach the full length") in capsys.readouterr().out


def test_a_checkpoint_saved_before_its_preset_padded_resumes_with_its_own_table(dist_world1, work, monkeypatch,
                                                                                 capsys):
    """The GPT-2-vocabulary presets pad to a multiple of 64; a run saved unpadded with one of them
    keeps its table on --load unless padding is asked for explicitly. Here a small preset of the
    same kind: 250 tokens, padded to 256 rows."""
    import torch

    from gptx import presets
    from tests.helpers.runs import MICRO_MODEL, make_token_dir
    monkeypatch.setitem(presets.PRESETS, "micro-gpt2", dict(MICRO_MODEL, vocab_size=250, pad_vocab_to_multiple=64))
    data = make_token_dir(work[0] / "data250", vocab_size=250)
    old = lambda save, *extra: pretrain_args(data, "micro-gpt2", work[3], save, 1, 4, "--eval-interval", "0", *extra)
    unpadded = ("--set", "pad_vocab_to_multiple=1")  # what the preset was before
    full, part = work[0] / "unpadded_full", work[0] / "unpadded_part"
    assert run_pretrain(old(full, *unpadded)) == 0
    assert run_pretrain(old(part, *unpadded, "--exit-interval", "2")) == 0
    rows = lambda run: load_plain_model(run)[0].layers["0"].wte.weight.shape[0]
    assert rows(part) == 250
    capsys.readouterr()
    assert run_pretrain(old(part, "--set", "pad_vocab_to_multiple=64", "--load", str(part))) == 2  # asked for
    assert "pad_vocab_to_multiple 1 (checkpoint) vs 64 (now)" in capsys.readouterr().err
    assert run_pretrain(old(part, "--load", str(part))) == 0  # the preset's default: the checkpoint's table
    out = capsys.readouterr().out
    assert "has a table of 250 rows where 'micro-gpt2' now pads to 256: it keeps its 250 rows" in out
    assert train_losses(part) == pytest.approx(train_losses(full), abs=1e-6) and rows(part) == 250
    assert run_evaluate(["--load", str(part), "--data", str(data / "val.bin"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1
    fresh = work[0] / "padded"
    assert run_pretrain(pretrain_args(data, "micro-gpt2", work[3], fresh, 1, 1, "--eval-interval", "0")) == 0
    assert rows(fresh) == 256
    model, cfg = load_plain_model(fresh)
    with torch.no_grad():  # the padding rows are never predicted
        assert torch.isinf(model(torch.zeros(1, 4, dtype=torch.long))[..., 250:]).all()
