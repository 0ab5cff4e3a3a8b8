import json

import pytest

from gptx.errors import ConfigError
from gptx.parallel.ds_config import DS_CONFIG_DIR, check_ds_config, read_ds_config
from gptx.testing import CPU_FP16_ENV


def test_shipped_configs_are_valid():
    cpu = check_ds_config(read_ds_config(DS_CONFIG_DIR / "cpu_fp32.json"), 1, 2, "cpu")
    assert cpu.global_batch == cpu.micro_batch * cpu.grad_accum
    fp16 = read_ds_config(DS_CONFIG_DIR / "gpu_fp16.json")
    check_ds_config(fp16, 4, 2, "cuda")
    scale = fp16["fp16"]
    assert scale["loss_scale"] == 0 and scale["initial_scale_power"] <= 24 and scale["min_loss_scale"] >= 1
    check_ds_config(read_ds_config(DS_CONFIG_DIR / "gpu_bf16.json"), 1, 1, "cuda")


ADAMW = {"optimizer": {"type": "AdamW"}}


@pytest.mark.parametrize("spelling", ["fp32", "float32", "float", "torch.float32"])
def test_bf16_on_the_pipeline_takes_every_spelling_deepspeed_reads_as_fp32(spelling):
    bf16 = dict(read_ds_config(DS_CONFIG_DIR / "gpu_bf16.json"), data_types={"grad_accum_dtype": spelling})
    check_ds_config(bf16, 1, 2, "cuda")
    with pytest.raises(ConfigError, match="bf16 needs"):
        check_ds_config(dict(bf16, data_types={"grad_accum_dtype": "bf16"}), 1, 2, "cuda")


def test_batch_arithmetic_is_derived_and_checked():
    assert check_ds_config({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, **ADAMW}, 2, 1,
                           "cpu").grad_accum == 4
    with pytest.raises(ConfigError, match="set 'train_micro_batch_size_per_gpu'"):  # DeepSpeed refuses it too
        check_ds_config({"gradient_accumulation_steps": 4, **ADAMW}, 2, 1, "cpu")
    with pytest.raises(ConfigError, match="must equal train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 2"):
        check_ds_config({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4,
                         "gradient_accumulation_steps": 2}, 2, 1, "cpu")
    with pytest.raises(ConfigError, match="not a multiple"):
        check_ds_config({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, 2, 1, "cpu")


@pytest.mark.parametrize("cfg,needle", [
    ({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}, "--pipe-parallel-size 0"),
    ({"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True}}, "fp16 is not supported"),
    ({"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1}}}, "optimizer.params.lr"),
    ({"train_micro_batch_size_per_gpu": 1, "scheduler": {"type": "WarmupLR"}}, "scheduler"),
    ({"train_micro_batch_size_per_gpu": 0}, "positive integer"),
    ({"train_micro_batch_size_per_gpu": 1}, "add an 'optimizer' section"),
    ({"train_micro_batch_size_per_gpu": 1, "optimizer": {"params": {"weight_decay": 0.1}}}, "with a 'type'"),
    ({}, "train_micro_batch_size_per_gpu"),
    ({"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}}, "bf16 needs"),
    ({"train_micro_batch_size_per_gpu": 1, "pipeline": {"stages": 2}}, "ignored by DeepSpeed"),
])
def test_bad_ds_configs(cfg, needle):
    with pytest.raises(ConfigError, match=needle):
        check_ds_config(cfg, dp_size=1, pipe_size=2, accelerator_name="cpu")


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.update(gradient_clipping="1.0"), "gradient_clipping must be a number"),
    (lambda c: c.update(gradient_clipping=-1), "gradient_clipping must be a number"),
    (lambda c: c.update(bf16=True), "'bf16' must be an object"),
    (lambda c: c.update(bf16={"enabled": "false"}), "bf16.enabled must be true or false"),
    (lambda c: c.update(zero_optimization=1), "'zero_optimization' must be an object"),
    (lambda c: c.update(data_types="fp32"), "'data_types' must be an object"),
    (lambda c: c.update(optimizer="AdamW"), "'optimizer' must be an object"),
    (lambda c: c["optimizer"].update(params=[1]), "optimizer.params must be an object"),
    (lambda c: c["optimizer"].update(type="Adamw2"), "optimizer.type 'Adamw2'"),
    (lambda c: c["optimizer"]["params"].update(weight_decay="0.1"), "weight_decay must be a number >= 0"),
    (lambda c: c["optimizer"]["params"].update(eps=-1), "eps must be a number > 0"),
    (lambda c: c["optimizer"]["params"].update(betas=0.9), "betas must be two numbers"),
    (lambda c: c["optimizer"]["params"].update(betas=[0.9, 1.5]), "betas must be two numbers"),
    (lambda c: c["optimizer"]["params"].update(eps=float("nan")), "eps must be a number > 0"),  # JSON's NaN
    # These five passed gptx's checks and stopped DeepSpeed's start-up with a traceback on every rank.
    (lambda c: c.update(amp={"enabled": False}), "NVIDIA Apex AMP integration has been removed.*remove the key"),
    (lambda c: c.update(fp16={"enabled": True, "initial_scale_power": "16"}),
     "fp16.initial_scale_power must be a number, got '16'"),
    (lambda c: c["optimizer"]["params"].update(max_grad_norm=1.0), "DeepSpeed clips by \"gradient_clipping\""),
    (lambda c: c["optimizer"]["params"].update(amsgrad=True, torch_adam=False), "amsgrad needs \"torch_adam\": true"),
    (lambda c: c.update(optimizer={"type": "SGD", "params": {}}, zero_optimization={"stage": 1}),
     "ZeRO runs Adam, AdamW, Adagrad and Lion; for optimizer.type 'SGD' add \"zero_allow_untested_optimizer\""),
])
def test_values_of_the_wrong_type_are_one_line_naming_the_key(edit, needle):
    """Each of these stopped DeepSpeed's start-up with a traceback (AttributeError, TypeError,
    AssertionError, ValueError), or was read as something else ("false" as true)."""
    cfg = read_ds_config(DS_CONFIG_DIR / "cpu_fp32.json")
    check_ds_config(cfg, dp_size=1, pipe_size=2, accelerator_name="cpu")
    edit(cfg)
    with pytest.raises(ConfigError, match=needle):
        check_ds_config(cfg, dp_size=1, pipe_size=2, accelerator_name="cpu")


def test_optimizer_types_deepspeed_builds_are_accepted():
    cfg = read_ds_config(DS_CONFIG_DIR / "cpu_fp32.json")
    for name in ("adamw", "Adam", "Lamb", "SGD", "RMSprop"):  # DeepSpeed's by any case; torch.optim's by name
        cfg["optimizer"]["type"] = name
        check_ds_config(cfg, dp_size=1, pipe_size=2, accelerator_name="cpu")


def test_malformed_json_names_the_file(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text('{"train_micro_batch_size_per_gpu": 4,,}')
    with pytest.raises(ConfigError, match="ds.json.*not valid JSON"):
        read_ds_config(f)
    # json keeps the last of a repeated key, so the copy a user edited could be ignored.
    f.write_text('{"gradient_accumulation_steps": 8, "train_micro_batch_size_per_gpu": 4, '
                 '"gradient_accumulation_steps": 1}')
    with pytest.raises(ConfigError, match="key 'gradient_accumulation_steps' appears twice in one object"):
        read_ds_config(f)


def test_comments_and_trailing_commas_read_as_deepspeed_reads_them(tmp_path):
    # DeepSpeed loads its config file with hjson; gptx refused such a file as "not valid JSON".
    f = tmp_path / "ds.json"
    shipped = (DS_CONFIG_DIR / "cpu_fp32.json").read_text()
    f.write_text("// my settings\n" + shipped.replace('"gradient_clipping"', '/* clip */ "gradient_clipping"')
                 .rstrip().removesuffix("}") + ",}\n")
    assert read_ds_config(f) == json.loads(shipped)
    f.write_text('// a comment\n{"gradient_accumulation_steps": 8, "gradient_accumulation_steps": 1}')
    with pytest.raises(ConfigError, match="key 'gradient_accumulation_steps' appears twice"):
        read_ds_config(f)


@pytest.mark.parametrize("precision, accum", [({"fp16": {"enabled": True}}, "fp32"), ({}, "bf16"), ({}, "half")])
def test_a_gradient_accumulation_dtype_deepspeed_cannot_mix_without_zero_is_one_line(monkeypatch, precision, accum):
    """DeepSpeed stopped with NotImplementedError ("unsupported mix of model_dtype ... grad_accum_dtype")."""
    monkeypatch.setenv(CPU_FP16_ENV, "1")
    cfg = {"train_micro_batch_size_per_gpu": 1, **ADAMW, **precision, "data_types": {"grad_accum_dtype": accum}}
    with pytest.raises(ConfigError, match=f"grad_accum_dtype '{accum}' with .* needs ZeRO"):
        check_ds_config(cfg, dp_size=1, pipe_size=2, accelerator_name="cpu")
    # its own precision, spelled another way
    same = {"fp16": "float16", "fp32": "float"}["fp16" if precision else "fp32"]
    check_ds_config({**cfg, "data_types": {"grad_accum_dtype": same}}, dp_size=1, pipe_size=2, accelerator_name="cpu")


def test_deepspeed_own_pipeline_defaults_are_accepted():
    """A config copied from DeepSpeed's documentation spells out its defaults; they change nothing."""
    cfg = {"train_micro_batch_size_per_gpu": 1, **ADAMW, "pipeline": {"stages": "auto", "partition": "best"}}
    assert check_ds_config(cfg, dp_size=1, pipe_size=2, accelerator_name="cpu").micro_batch == 1
    with pytest.raises(ConfigError, match="ignored by DeepSpeed"):
        check_ds_config({**cfg, "pipeline": {"partition": "uniform"}}, dp_size=1, pipe_size=2, accelerator_name="cpu")


def test_the_fixes_those_refusals_name_are_accepted():
    cfg = read_ds_config(DS_CONFIG_DIR / "cpu_fp32.json")
    cfg["optimizer"]["params"].update(amsgrad=True, torch_adam=True)
    check_ds_config(cfg, dp_size=1, pipe_size=2, accelerator_name="cpu")
    cfg.update(optimizer={"type": "SGD", "params": {}}, zero_optimization={"stage": 1},
               zero_allow_untested_optimizer=True)
    check_ds_config(cfg, dp_size=1, pipe_size=2, accelerator_name="cpu")


def test_fp16_on_cpu_only_with_the_testing_switch(monkeypatch):
    cfg = read_ds_config(DS_CONFIG_DIR / "gpu_fp16.json")
    monkeypatch.delenv("GPTX_CPU_FP16", raising=False)
    with pytest.raises(ConfigError, match="fp16 is not supported by DeepSpeed's CPU accelerator.*GPTX_CPU_FP16=1"):
        check_ds_config(cfg, 1, 2, "cpu")
    monkeypatch.setenv("GPTX_CPU_FP16", "1")
    assert check_ds_config(cfg, 1, 2, "cpu").grad_accum == 8


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_2_and_3_are_refused_with_one_stage_too_and_point_to_the_no_pipeline_mode(stage):
    # One stage still runs DeepSpeed's pipeline engine, which rejects them with a traceback per rank.
    with pytest.raises(ConfigError, match=f"zero_optimization.stage {stage} does not work with pipeline.*"
                                          f"add --pipe-parallel-size 0"):
        check_ds_config({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}}, 2, 1, "cpu")
    assert check_ds_config({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}, **ADAMW},
                           2, 0, "cpu").dp_size == 2


OFFLOAD_CPU = {"device": "cpu"}


@pytest.mark.parametrize("zero,pipe,optimizer,needle", [
    ({"stage": 0, "offload_optimizer": OFFLOAD_CPU}, 2, None, "offload_optimizer needs ZeRO stage 1, 2 or 3"),
    ({"stage": 1, "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}}, 2, None, "nvme needs ZeRO stage 3"),
    ({"stage": 2, "offload_param": OFFLOAD_CPU}, 0, None, "offload_param needs ZeRO stage 3"),
    ({"stage": 3, "offload_param": {"device": "nvme"}}, 0, None, "offload_param.nvme_path"),
    ({"stage": 1, "offload_optimizer": {"device": "gpu"}}, 2, None, "must be cpu, nvme or none"),
    ({"stage": 1, "offload_optimizer": "cpu"}, 2, None, "must be an object"),
    ({"stage": 1, "offload_optimizer": OFFLOAD_CPU}, 2, {"torch_adam": True, "fused": True}, "remove optimizer.params.torch_adam"),
    ({"stage": 4}, 0, None, "must be 0, 1, 2 or 3"),
])
def test_offload_combinations_deepspeed_cannot_run_are_one_line(zero, pipe, optimizer, needle):
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero}
    if optimizer:
        cfg["optimizer"] = {"type": "AdamW", "params": optimizer}
    with pytest.raises(ConfigError, match=needle):
        check_ds_config(cfg, 1, pipe, "cpu")


def test_the_shipped_offload_config_is_accepted_with_the_pipeline():
    cfg = read_ds_config(DS_CONFIG_DIR / "cpu_offload.json")
    check_ds_config(cfg, 1, 2, "cpu")
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize("precision_key", ["fp16", "bf16"])
def test_half_precision_without_zero_is_refused_without_the_pipeline(precision_key, monkeypatch):
    monkeypatch.setenv("GPTX_CPU_FP16", "1")
    cfg = {"train_micro_batch_size_per_gpu": 1, precision_key: {"enabled": True}}
    with pytest.raises(ConfigError, match=f"{precision_key} with --pipe-parallel-size 0 needs zero_optimization"):
        check_ds_config(cfg, 1, 0, "cpu")
