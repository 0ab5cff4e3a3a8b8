"""The no-pipeline mode (--pipe-parallel-size 0) in one process: DeepSpeed's plain engine with
ZeRO 0-3 and offload trains the pipeline's model on the same batches with the pipeline's losses.

fp32 must match the 1-stage pipeline to 1e-5 over 6 steps (ZeRO-0 and -2 match exactly here,
ZeRO-3 with offload to 5e-7). Two mistakes this catches, both seen while building the mode:
under zero.Init the layers' own init lands on empty shards (loss 21 instead of 5.5 at step 1),
and ZeRO-3's empty shards made every parameter look like a vector, so no weight decayed
(1.2e-4 off by step 6).
"""
import json

import pytest
import torch

from gptx.analysis.precision_check import max_loss_diff, max_norm_rel_diff, train_trace
from gptx.config import load_config
from gptx.data.tokens import open_tokens
from gptx.training import checkpoint, consolidate
from tests.helpers.runs import MICRO_MODEL, make_token_dir, precision_ds
from tests.unit.parallel.test_engine import BF16_LOSS_TOL, LOSS_TOL
from tests.unit.parallel.test_engine import cpu_fp16 as cpu_fp16_fixture

cpu_fp16 = cpu_fp16_fixture  # the fixture that lets DeepSpeed's CPU accelerator run fp16

ITERS = 6
PARITY_TOL = 1e-5


def config(pipe: int, **train):
    return load_config(None, dict(MICRO_MODEL, lr=3e-3, warmup_iters=1, train_iters=ITERS, pipe_parallel_size=pipe,
                                  **train))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return open_tokens(make_token_dir(tmp_path_factory.mktemp("sequential") / "data"), "train")


@pytest.fixture(scope="module")
def pipeline_fp32(dist_world1, tokens):
    return train_trace(config(1), precision_ds("fp32"), tokens, ITERS)


def zero_ds(precision: str, stage: int, offload: bool = False) -> dict:
    ds = precision_ds("fp16-zero1-torch" if precision == "fp16" else precision)
    ds["zero_optimization"] = {"stage": stage}
    if offload:  # DeepSpeedCPUAdam steps the host copies (gptx refuses torch_adam with offload)
        ds["optimizer"]["params"].pop("torch_adam")
        ds["zero_optimization"].update(offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"})
    return ds


@pytest.mark.parametrize("stage,offload", [(0, False), (2, False), (3, False), (3, True)],
                         ids=["zero0", "zero2", "zero3", "zero3-offload"])
def test_fp32_without_pipeline_matches_the_pipeline(dist_world1, tokens, pipeline_fp32, stage, offload):
    trace = train_trace(config(0), zero_ds("fp32", stage, offload), tokens, ITERS)
    assert max_loss_diff(pipeline_fp32, trace) < PARITY_TOL, (pipeline_fp32.losses, trace.losses)
    assert None not in trace.grad_norms  # the norm is logged in every ZeRO stage
    assert max_norm_rel_diff(pipeline_fp32, trace) < 1e-5


@pytest.mark.parametrize("precision,stage", [("bf16", 3), ("fp16", 2), ("fp16", 3)])
def test_half_precision_without_pipeline_follows_fp32(dist_world1, cpu_fp16, tokens, pipeline_fp32, precision, stage):
    trace = train_trace(config(0), zero_ds(precision, stage), tokens, ITERS)
    assert trace.skipped[-1] == 0
    tol = BF16_LOSS_TOL if precision == "bf16" else LOSS_TOL
    assert max_loss_diff(pipeline_fp32, trace) < tol, (pipeline_fp32.losses, trace.losses)


def test_activation_checkpointing_without_pipeline_recomputes_and_changes_nothing(dist_world1, tokens,
                                                                                   pipeline_fp32, monkeypatch):
    import gptx.parallel.data_parallel
    calls = []
    original = gptx.parallel.data_parallel.recompute_in_backward
    monkeypatch.setattr(gptx.parallel.data_parallel, "recompute_in_backward", lambda fn, x: calls.append(1) or original(fn, x))
    trace = train_trace(config(0, activation_checkpoint_interval=2), zero_ds("fp32", 3), tokens, ITERS)
    assert max_loss_diff(pipeline_fp32, trace) < PARITY_TOL
    micro_batches = ITERS * 2  # precision_ds: 2 micro-batches per step
    assert len(calls) == micro_batches * MICRO_MODEL["n_layer"] // 2  # chunks of 2 blocks


def test_a_zero3_checkpoint_gives_the_tools_its_layers_and_fp32_masters(dist_world1, tokens, tmp_path):
    """gptx writes the per-layer files from ZeRO-3's shards; --master-weights reads the fp32
    copies through DeepSpeed's own consolidation (zero_to_fp32)."""
    cfg = config(0)
    ds = zero_ds("bf16", 3)
    saved = {}

    def save(engine):
        progress = {"iteration": ITERS, "consumed_samples": 0, "tokens": 0, "lr_steps": ITERS,
                    "pipe_parallel_size": 0, "data_parallel_size": 1}
        meta = {"config": cfg.to_dict(), "ds_config": ds, "pipe_parallel_size": 0, "data_parallel_size": 1}
        checkpoint.save(engine, tmp_path, ITERS, progress, meta)
        module = engine.module
        with torch.no_grad():
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(module.parameters())):
                saved["weights"] = {k: v.detach().float().cpu() for k, v in module.state_dict().items()}

    train_trace(cfg, ds, tokens, ITERS, on_done=save)
    model, loaded_cfg = consolidate.load_plain_model(tmp_path)
    assert loaded_cfg.train.pipe_parallel_size == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved["weights"][key]), key  # the bf16 weights, exactly
    masters, _ = consolidate.load_plain_model(tmp_path, master_weights=True)
    master_state, bf16_state = masters.state_dict(), model.state_dict()
    assert master_state.keys() == bf16_state.keys()
    differ = 0
    for key, value in bf16_state.items():
        assert torch.equal(master_state[key].bfloat16().float(), value), key  # the bf16 weights are the masters, rounded
        differ += int((master_state[key] != value).sum())
    assert differ > 0  # and the masters carry more bits
    assert sum(p.numel() for p in masters.parameters()) == sum(v.numel() for v in bf16_state.values())
    meta = json.loads((consolidate.resolve_checkpoint(tmp_path) / "gptx.json").read_text())
    assert meta["pipe_parallel_size"] == 0


@pytest.mark.parametrize("stage,offload", [(2, False), (3, True)], ids=["zero2", "zero3-offload"])
def test_a_no_pipeline_run_stopped_and_resumed_repeats_the_uninterrupted_losses(dist_world1, tmp_path, stage,
                                                                                 offload):
    """launch/pretrain.py's loop in this process: full run vs --exit-interval 2 then --load."""
    from gptx.cli.pretrain import run_pretrain
    from tests.helpers.runs import make_token_dir, pretrain_args, train_losses, write_model_yaml
    data = make_token_dir(tmp_path / "data")
    model = write_model_yaml(tmp_path / "model.yaml")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(zero_ds("fp32", stage, offload)))
    flags = ("--eval-interval", "0", "--log-interval", "1", "--set", "dropout=0.1")
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_pretrain(pretrain_args(data, model, ds, full, 0, 4, *flags)) == 0
    assert run_pretrain(pretrain_args(data, model, ds, part, 0, 4, *flags, "--exit-interval", "2")) == 0
    assert max(train_losses(part)) == 2
    assert run_pretrain(pretrain_args(data, model, ds, part, 0, 4, *flags, "--load", str(part))) == 0
    assert train_losses(part) == train_losses(full) and len(train_losses(full)) == 4


def test_a_pipeline_checkpoint_continues_without_pipeline_and_back(dist_world1, tmp_path, capsys):
    """Layer files are per position in the LayerSpec list, so either layout reads the other's
    (weights, iteration, data position, LR schedule; the optimizer restarts); the HF export
    reads the no-pipeline checkpoint too."""
    from gptx.cli.convert import run_convert
    from gptx.cli.pretrain import run_pretrain
    from tests.helpers.runs import make_token_dir, pretrain_args, read_metrics, train_losses, write_model_yaml
    data = make_token_dir(tmp_path / "data")
    model = write_model_yaml(tmp_path / "model.yaml")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(zero_ds("fp32", 2)))
    flags = ("--eval-interval", "0", "--log-interval", "1")
    piped, flat = tmp_path / "piped", tmp_path / "flat"
    ds1 = tmp_path / "ds1.json"
    ds1.write_text(json.dumps(precision_ds("fp32")))
    assert run_pretrain(pretrain_args(data, model, ds1, piped, 1, 4, *flags, "--exit-interval", "2")) == 0
    whole = tmp_path / "whole"
    assert run_pretrain(pretrain_args(data, model, ds1, whole, 1, 4, *flags)) == 0
    capsys.readouterr()
    assert run_pretrain(pretrain_args(data, model, ds, flat, 0, 4, *flags, "--load", str(piped))) == 0
    out = capsys.readouterr().out
    assert "the checkpoint has 1 pipeline stage(s) and this run no pipeline" in out
    assert [r["iter"] for r in read_metrics(flat) if "loss" in r] == [3, 4]
    # Iteration 3's loss comes before its update: the same weights on the same batch as the
    # uninterrupted pipeline run (the optimizer's restart shows only from iteration 4 on).
    assert abs(train_losses(flat)[3] - train_losses(whole)[3]) < PARITY_TOL
    back = tmp_path / "back"
    assert run_pretrain(pretrain_args(data, model, ds1, back, 1, 5, *flags, "--load", str(flat),
                                      "--lr-decay-iters", "4")) == 0
    assert "the checkpoint has no pipeline and this run 1 pipeline stage(s)" in capsys.readouterr().out
    assert [r["iter"] for r in read_metrics(back) if "loss" in r] == [5]
    a, _ = consolidate.load_plain_model(flat)
    out_dir = tmp_path / "hf"
    assert run_convert(["--load", str(flat), "--to-hf", str(out_dir)]) == 0
    from gptx.interop.hf import read_safetensors
    exported = read_safetensors(out_dir / "model.safetensors")
    assert torch.equal(exported["transformer.h.0.attn.c_attn.weight"], a.state_dict()["layers.2.attn.c_attn.weight"].t())
