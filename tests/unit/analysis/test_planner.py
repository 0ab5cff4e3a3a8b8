"""The planner (tools/partition_report.py --fit): the layouts it proposes are ones gptx runs, its
fits agree with its own budget, and what fits moves with the budget as it should."""
import json
import shlex

import pytest

from gptx.analysis.planner import Cluster, command_for, plan_layouts
from gptx.cli.partition_report import run_partition_report
from gptx.config import load_config, parse_override
from gptx.model.gpt import layer_specs
from gptx.parallel.ds_config import DS_CONFIG_DIR, check_ds_config, read_ds_config
from gptx.parallel.pipeline import layer_compute_weights, partition, stage_problem

MINGPT_45B = {"n_layer": 56, "n_head": 16, "n_embd": 8192, "seq_len": 128, "vocab_size": 65}
MINGPT_1_7B = {"n_layer": 15, "n_head": 16, "n_embd": 3072, "seq_len": 128, "vocab_size": 65}


def plan(model: dict, gpus=8, gpu_gib=40, host_gib=1024, ds_name="gpu_fp16.json"):
    cfg = load_config(None, dict(model))
    ds = read_ds_config(DS_CONFIG_DIR / ds_name)
    return plan_layouts(cfg, Cluster(gpus, gpu_gib, host_gib), ds, micro_batch=1, grad_accum=1)


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
@pytest.mark.parametrize("ds_name", ["gpu_fp16.json", "gpu_bf16.json", "cpu_fp32.json"])
def test_every_proposed_layout_passes_gptxs_own_checks(ds_name, schedule):
    model = dict(MINGPT_1_7B, pipeline_schedule=schedule)
    rows = plan(model, ds_name=ds_name)
    for row in rows:
        layout = row["layout"]
        check_ds_config(row["ds_config"], row["data_parallel"], layout.pipe, "cuda")
        load_config(None, dict(model, pipe_parallel_size=layout.pipe))  # the config check: zb-h1 needs a pipeline
        assert row["data_parallel"] * max(layout.pipe, 1) == 8
    assert any(r["layout"].pipe == 0 for r in rows) == (schedule == "1f1b")


def test_no_layout_the_engine_refuses_is_proposed():
    """gpt2 split by parameters over 8 stages holds the embedding alone on stage 0 and the tied head
    alone on stage 7, which DeepSpeed's ZeRO-1 and bf16 optimizers cannot step (build_pipeline
    refuses them): the planner leaves those layouts out."""
    cfg = load_config("gpt2")
    specs = layer_specs(cfg.model, seed=0)
    ds = read_ds_config(DS_CONFIG_DIR / "gpu_bf16.json")
    rows = plan_layouts(cfg, Cluster(8, 80, 1024), ds, micro_batch=1, grad_accum=1)
    assert rows and all(r["layout"].pipe != 8 for r in rows)
    for row in rows:
        pipe = row["layout"].pipe
        parts = partition(specs, "parameters", pipe, layer_compute_weights(cfg, specs)) if pipe > 1 else []
        assert stage_problem(specs, parts, row["ds_config"]) is None, row["layout"]


def test_the_command_sets_the_planned_checkpointing_over_the_models_own():
    rows = plan(dict(MINGPT_1_7B, activation_checkpoint_interval=1))
    assert {r["layout"].checkpoint for r in rows} == {0, 1}
    flags = "--model gpt2 --set activation_checkpoint_interval=1"
    for row in rows:
        words = shlex.split(command_for(flags, row, Cluster(8, 40, 1024)))
        assert int(words[words.index("--activation-checkpoint-interval") + 1]) == row["layout"].checkpoint


def test_fits_agree_with_the_budget_and_come_first():
    rows = plan(MINGPT_45B)
    assert 0 < sum(r["fits"] for r in rows) < len(rows)  # a budget some layouts fit and others do not
    assert all(r["fits"] == (r["gpu_gib"] <= 40 - 2 and r["host_gib_per_node"] <= 1024) for r in rows)
    flags = [r["fits"] for r in rows]
    assert flags == sorted(flags, reverse=True)  # fitting rows first
    fitting = [r["seconds"] for r in rows if r["fits"]]
    assert fitting == sorted(fitting)


def test_a_45b_model_on_8_gpus_of_40_gib_fits_only_with_offload_or_zero3():
    rows = [r for r in plan(MINGPT_45B) if r["fits"]]
    assert rows, "the 45B model must fit somehow with 1 TiB of host memory"
    for r in rows:
        assert r["layout"].offload_optimizer or r["layout"].zero == 3
    # Without the host memory for the optimizer states nothing fits.
    assert not any(r["fits"] for r in plan(MINGPT_45B, host_gib=64))


def test_the_cli_prints_the_chosen_command_and_json(capsys):
    args = ["--fit", "--gpus", "8", "--gpu-memory", "40", "--host-memory", "1024", "--micro-batch", "1",
            "--accum", "1"] + [f for k, v in MINGPT_1_7B.items() for f in ("--set", f"{k}={v}")]
    assert run_partition_report(args) == 0
    out = capsys.readouterr().out
    assert "layouts fit" in out and "chosen:" in out and "deepspeed --num_gpus 8 launch/pretrain.py" in out
    assert run_partition_report(args + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["fits"] and rows[0]["command"].startswith("deepspeed --num_gpus 8")
    # The command trains the planned model: its --model and --set flags give the same shape.
    words = shlex.split(rows[0]["command"])
    sets = dict(parse_override(words[i + 1]) for i, w in enumerate(words) if w == "--set")
    model = words[words.index("--model") + 1]
    assert load_config(model, sets).model == load_config(None, MINGPT_1_7B).model


@pytest.mark.parametrize("flag,value,needle", [("--gpus", "0", "--gpus: must be >= 1"),
                                                ("--gpu-memory", "-4", "--gpu-memory: must be a positive"),
                                                ("--accum", "0", "--accum: must be >= 1, got 0"),
                                                # nan fitted nothing and inf everything, with exit 0
                                                ("--gpu-memory", "nan", "--gpu-memory: must be a positive"),
                                                ("--host-memory", "inf", "--host-memory: must be a positive")])
def test_bad_budgets_are_one_line(capsys, flag, value, needle):
    assert run_partition_report(["--fit", flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


@pytest.mark.parametrize("flag,value", [("--micro-batch", "1"), ("--gpus", "64"), ("--gpu-memory", "1"),
                                        ("--top", "3")])
def test_the_flags_of_fit_are_refused_without_it(capsys, flag, value):
    """The plain report takes its batch from the JSON: these were silently ignored."""
    assert run_partition_report(["--model", "gpt2", flag, value]) == 2
    assert f"error: {flag}: only with --fit" in capsys.readouterr().err


@pytest.mark.parametrize("edit, needle", [(lambda ds: ds.update(zero_optimization=[1]), "'zero_optimization' must be"),
                                          (lambda ds: ds.update(optimizer="AdamW"), "'optimizer' must be an object"),
                                          (lambda ds: ds["optimizer"].update(params="x"), "optimizer.params must be")])
def test_fit_reads_a_malformed_json_as_the_report_does(tmp_path, capsys, edit, needle):
    """An AttributeError traceback in the planner before."""
    ds = json.loads((DS_CONFIG_DIR / "gpu_fp16.json").read_text())
    edit(ds)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(ds))
    assert run_partition_report(["--fit", "--deepspeed_config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_the_command_trains_the_partition_it_was_planned_with_and_quotes_the_plan(tmp_path, capsys):
    plan = tmp_path / "my plan.json"
    assert run_partition_report(["--fit", "--model", "gpt2", "--gpus", "2", "--partition-method", "compute",
                                 "--write-plan", str(plan), "--json"]) == 0
    words = shlex.split(json.loads(capsys.readouterr().out)[0]["command"])
    assert words[words.index("--partition-method") + 1] == "compute"
    assert words[words.index("--deepspeed_config") + 1] == str(plan)


def test_fit_splits_the_jsons_train_batch_size_over_each_layouts_replicas(tmp_path, capsys):
    """train_batch_size 512 in micro-batches of 8 on 8 GPUs: 8 micro-batches on 8 replicas, 64 on one
    (as check_ds_config, and so the engine, read the JSON), the same 512 sequences for every layout."""
    ds = read_ds_config(DS_CONFIG_DIR / "gpu_fp16.json")
    del ds["gradient_accumulation_steps"]
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(dict(ds, train_batch_size=512, train_micro_batch_size_per_gpu=8)))
    sets = [f for k, v in MINGPT_1_7B.items() for f in ("--set", f"{k}={v}")]
    assert run_partition_report(["--fit", "--deepspeed_config", str(path), "--json"] + sets) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows
    for row in rows:
        split = check_ds_config(row["ds_config"], row["data_parallel"], row["layout"]["pipe"], "cuda")
        assert (split.micro_batch, split.global_batch) == (row["micro_batch"], 512) == (8, 512), row["layout"]


def test_write_plan_never_replaces_an_existing_file(tmp_path, capsys):
    """Not the model's YAML (or anything else there), nor a plan written before: one line, exit 2, the
    file as it was."""
    args = ["--fit", "--gpus", "8", "--micro-batch", "1", "--accum", "1"] + [
        f for k, v in MINGPT_1_7B.items() for f in ("--set", f"{k}={v}")]
    model, plan = tmp_path / "model.yaml", tmp_path / "plan.json"
    model.write_text("model:\n  n_layer: 2\n")
    assert run_partition_report(args + ["--write-plan", str(plan)]) == 0
    capsys.readouterr()
    for existing in (model, plan):
        before = existing.read_text()
        assert run_partition_report(args + ["--write-plan", str(existing)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--write-plan '{existing}': it already exists" in err[0], err
        assert existing.read_text() == before
