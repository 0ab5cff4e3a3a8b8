"""DeepSpeed's JSON config: pick a default, read it, and check what gptx depends on.

DeepSpeed owns these keys (batch sizes, precision, optimizer, ZeRO, clipping); gptx only
reads them. The learning rate is the exception: its schedule lives in the training config,
so `optimizer.params.lr` must not be set here (two sources of truth would disagree).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gptx.errors import ConfigError
from gptx.testing import CPU_FP16_ENV, cpu_fp16_allowed

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"  # package data; ./ds_configs links here


def default_ds_config_path(accelerator_name: str) -> Path:
    """fp16 with dynamic loss scaling on GPUs, fp32 on CPUs (DeepSpeed's CPU accelerator refuses fp16)."""
    return DS_CONFIG_DIR / ("gpu_fp16.json" if accelerator_name == "cuda" else "cpu_fp32.json")


@dataclass(frozen=True)
class BatchLayout:
    micro_batch: int
    grad_accum: int
    dp_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp_size


def read_ds_config(path: str | Path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--deepspeed_config '{path}': cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:  # a binary file given as the JSON
        raise ConfigError(f"--deepspeed_config '{path}': not UTF-8 text (byte offset {e.start})") from None
    def no_repeats(pairs):  # json keeps the last of a repeated key: the one edited may be the other
        keys = [k for k, _ in pairs]
        twice = next((k for k in keys if keys.count(k) > 1), None)
        if twice is not None:
            raise ConfigError(f"--deepspeed_config '{path}': key '{twice}' appears twice in one object; keep one")
        return dict(pairs)
    try:
        cfg = json.loads(text, object_pairs_hook=no_repeats)
    except json.JSONDecodeError as e:
        # DeepSpeed reads its config file with hjson (a JSON superset: comments, trailing commas),
        # so a file DeepSpeed takes is taken here too (hjson comes with DeepSpeed).
        import hjson
        try:
            cfg = hjson.loads(text, object_pairs_hook=no_repeats)
        except hjson.HjsonDecodeError:
            raise ConfigError(f"--deepspeed_config '{path}': not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"--deepspeed_config '{path}': expected a JSON object")
    _check_types(cfg, str(path))  # here too: the planners build layouts from it before check_ds_config
    return cfg


def _positive_int(cfg: dict, key: str, path) -> int | None:
    value = cfg.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{path}: '{key}' must be a positive integer, got {value!r}")
    return value


def names_fp32(value) -> bool:
    """Whether a DeepSpeed JSON dtype is float32, spelled any way DeepSpeed's DtypeEnum reads it."""
    return dtype_name(value) == "fp32"


def dtype_name(value) -> str:
    """A DeepSpeed JSON dtype, spelled any way its DtypeEnum reads it, as gptx names precisions."""
    name = str(value).removeprefix("torch.")
    return {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}.get(name, name)


def check_ds_config(cfg: dict, dp_size: int, pipe_size: int, accelerator_name: str, path="ds_config") -> BatchLayout:
    """Validate the JSON for a run with this data-parallel size; return the batch layout."""
    _check_types(cfg, path)
    mb = _positive_int(cfg, "train_micro_batch_size_per_gpu", path)
    gas = _positive_int(cfg, "gradient_accumulation_steps", path)
    tb = _positive_int(cfg, "train_batch_size", path)
    if mb is None and tb is None:  # DeepSpeed refuses it too; gptx would have trained on micro-batches of 1
        raise ConfigError(f"{path}: set 'train_micro_batch_size_per_gpu' and 'gradient_accumulation_steps' "
                          f"(the micro-batches per step)")
    if tb is not None:
        if mb is not None and gas is None:
            gas, rem = divmod(tb, mb * dp_size)
            if rem or gas == 0:
                raise ConfigError(f"{path}: train_batch_size {tb} is not a multiple of train_micro_batch_size_per_gpu "
                                  f"{mb} x data-parallel size {dp_size}")
        elif gas is not None and mb is None:
            mb, rem = divmod(tb, gas * dp_size)
            if rem or mb == 0:
                raise ConfigError(f"{path}: train_batch_size {tb} is not a multiple of gradient_accumulation_steps "
                                  f"{gas} x data-parallel size {dp_size}")
        elif mb is None and gas is None:
            gas = 1
            mb, rem = divmod(tb, dp_size)
            if rem or mb == 0:
                raise ConfigError(f"{path}: train_batch_size {tb} is not a multiple of the data-parallel size {dp_size}")
        elif tb != mb * gas * dp_size:
            raise ConfigError(f"{path}: train_batch_size {tb} must equal train_micro_batch_size_per_gpu {mb} x "
                              f"gradient_accumulation_steps {gas} x data-parallel size {dp_size} = {mb * gas * dp_size}; "
                              f"drop train_batch_size to let DeepSpeed derive it")
    mb = mb or 1
    gas = gas or 1

    stage = zero_stage(cfg)
    zero = cfg.get("zero_optimization") or {}
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if stage in (2, 3) and pipe_size > 0:
        # DeepSpeed's pipeline engine refuses them (with a traceback), also for one stage.
        raise ConfigError(f"{path}: zero_optimization.stage {stage} does not work with pipeline parallelism "
                          f"(DeepSpeed's pipeline engine takes ZeRO 0 and 1); add --pipe-parallel-size 0 to train "
                          f"the model as one module, data parallel over every rank")
    _check_offload(cfg, zero, stage, pipe_size, path)
    fp16 = (cfg.get("fp16") or {}).get("enabled", False)
    bf16 = (cfg.get("bf16") or cfg.get("bfloat16") or {}).get("enabled", False)
    if fp16 and bf16:
        raise ConfigError(f"{path}: fp16.enabled and bf16.enabled are both true; choose one precision")
    if fp16 and accelerator_name == "cpu" and not cpu_fp16_allowed():
        raise ConfigError(f"{path}: fp16 is not supported by DeepSpeed's CPU accelerator; use "
                          f"ds_configs/cpu_fp32.json or a bf16 config on CPU ({CPU_FP16_ENV}=1 runs it anyway, "
                          f"slowly, for tests)")
    if fp16 and (cfg["fp16"].get("loss_scale", 0) or 0) == 0 and cfg["fp16"].get("initial_scale_power", 16) > 24:
        raise ConfigError(f"{path}: fp16.initial_scale_power {cfg['fp16']['initial_scale_power']} starts the loss "
                          f"scale so high that the first steps are all skipped; use 16 or less")
    if fp16 and pipe_size == 0 and stage == 0:
        raise ConfigError(f"{path}: fp16 with --pipe-parallel-size 0 needs zero_optimization.stage 1, 2 or 3 "
                          f"(DeepSpeed's fp16 optimizers without ZeRO are only corrected for the pipeline)")
    if bf16 and pipe_size == 0 and stage == 0:
        raise ConfigError(f"{path}: bf16 with --pipe-parallel-size 0 needs zero_optimization.stage 1, 2 or 3")
    if bf16 and pipe_size > 0 and (stage != 1 or not names_fp32((cfg.get("data_types") or {}).get("grad_accum_dtype"))):
        # Under the pipeline engine DeepSpeed 0.19 picks its BF16 optimizer either way, but only
        # this combination writes optimizer checkpoints it can read back.
        raise ConfigError(f"{path}: bf16 needs \"zero_optimization\": {{\"stage\": 1}} and "
                          f"\"data_types\": {{\"grad_accum_dtype\": \"fp32\"}} (see ds_configs/gpu_bf16.json)")
    accum = (cfg.get("data_types") or {}).get("grad_accum_dtype")
    if accum is not None and stage == 0 and dtype_name(accum) != precision(cfg):
        # DeepSpeed stops in its optimizer check: "unsupported mix of model_dtype and grad_accum_dtype".
        raise ConfigError(f"{path}: data_types.grad_accum_dtype {accum!r} with {precision(cfg)} training needs ZeRO "
                          f"(zero_optimization.stage 1); without it DeepSpeed accumulates in the training precision: "
                          f"remove the key")
    _check_optimizer_sections(cfg, path)
    return BatchLayout(micro_batch=mb, grad_accum=gas, dp_size=dp_size)


SECTIONS = ("fp16", "bf16", "bfloat16", "zero_optimization", "data_types", "optimizer", "pipeline",
            "activation_checkpointing")


def _check_types(cfg: dict, path) -> None:
    """The sections and values gptx and DeepSpeed read, of the type they read them as: DeepSpeed
    itself stops on another type with an AttributeError or TypeError deep inside its start-up."""
    from deepspeed.runtime import config as deepspeed_config

    # DeepSpeed's own list of the keys it removed (amp, sparse_gradients, ...), refused even when disabled.
    refuse_removed = getattr(deepspeed_config, "_reject_removed_config_keys", lambda cfg: None)
    try:
        refuse_removed(cfg)
    except deepspeed_config.DeepSpeedConfigError as e:
        raise ConfigError(f"{path}: {str(e).split('. See ')[0]}; remove the key") from None
    for key in SECTIONS:
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise ConfigError(f"{path}: '{key}' must be an object ({{...}}), got {cfg[key]!r}")
    for key in ("fp16", "bf16", "bfloat16"):
        enabled = (cfg.get(key) or {}).get("enabled", False)
        if not isinstance(enabled, bool):  # "false" would read as true
            raise ConfigError(f"{path}: {key}.enabled must be true or false, got {enabled!r}")
    for key in ("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale"):
        value = (cfg.get("fp16") or {}).get(key, 0)
        if not _is_number(value):
            raise ConfigError(f"{path}: fp16.{key} must be a number, got {value!r}")
    clip = cfg.get("gradient_clipping", 0.0)
    if not _is_number(clip) or clip < 0:
        raise ConfigError(f"{path}: gradient_clipping must be a number >= 0 (0: no clipping), got {clip!r}")
    optimizer = cfg.get("optimizer") or {}
    params = optimizer.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: optimizer.params must be an object, got {params!r}")
    name = optimizer.get("type")
    if name is not None and not _known_optimizer(name):
        raise ConfigError(f"{path}: optimizer.type {name!r} is neither one of DeepSpeed's optimizers nor in "
                          f"torch.optim; AdamW is what ds_configs/*.json use")
    betas = params.get("betas", [0.9, 0.999])
    if not (isinstance(betas, list) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"{path}: optimizer.params.betas must be two numbers in [0, 1), e.g. [0.9, 0.95], "
                          f"got {betas!r}")
    for key, low in (("eps", "> 0"), ("weight_decay", ">= 0")):
        value = params.get(key, 1e-8)
        if not _is_number(value) or not value >= 0 or value == float("inf") or (low == "> 0" and value == 0):
            raise ConfigError(f"{path}: optimizer.params.{key} must be a number {low}, got {value!r}")
    if "max_grad_norm" in params:
        raise ConfigError(f"{path}: remove optimizer.params.max_grad_norm; DeepSpeed clips by \"gradient_clipping\"")
    adam = str(name).lower() in ("adam", "adamw")
    if adam and params.get("amsgrad") and not params.get("torch_adam"):
        raise ConfigError(f"{path}: optimizer.params.amsgrad needs \"torch_adam\": true beside it (DeepSpeed's "
                          f"fused Adam has no AMSGrad)")
    zero = cfg.get("zero_optimization") or {}
    if (name is not None and zero.get("stage", 0) and str(name).lower() not in ZERO_OPTIMIZERS
            and not cfg.get("zero_allow_untested_optimizer")):
        raise ConfigError(f"{path}: ZeRO runs Adam, AdamW, Adagrad and Lion; for optimizer.type {name!r} add "
                          f"\"zero_allow_untested_optimizer\": true, or set zero_optimization.stage 0")


ZERO_OPTIMIZERS = ("adam", "adamw", "adagrad", "lion")
"""Optimizers DeepSpeed's ZeRO builds without zero_allow_untested_optimizer (its ZERO_SUPPORTED_OPTIMIZERS)."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _known_optimizer(name) -> bool:
    """DeepSpeed builds its own optimizers by lower-cased name and anything else from torch.optim."""
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    return isinstance(name, str) and (name.lower() in DEEPSPEED_OPTIMIZERS or hasattr(torch.optim, name))


def _check_optimizer_sections(cfg: dict, path: str) -> None:
    """The optimizer DeepSpeed builds (gptx hands it none), and the settings gptx owns instead of it."""
    optimizer = cfg.get("optimizer")
    params = (optimizer.get("params") or {}) if isinstance(optimizer, dict) else {}
    if "lr" in params:
        raise ConfigError(f"{path}: remove optimizer.params.lr; the learning rate and its schedule are set by the "
                          f"gptx training config (train.lr, train.min_lr, train.warmup_iters)")
    if "scheduler" in cfg:
        raise ConfigError(f"{path}: remove the 'scheduler' section; gptx runs the warmup + cosine schedule "
                          f"from its training config")
    pipeline = cfg.get("pipeline") or {}
    if pipeline.get("stages", "auto") != "auto" or pipeline.get("partition", "best") != "best":  # DeepSpeed's defaults
        raise ConfigError(f"{path}: pipeline.stages / pipeline.partition are ignored by DeepSpeed; use "
                          f"--pipe-parallel-size and --partition-method instead")
    if not isinstance(optimizer, dict) or not optimizer.get("type"):
        raise ConfigError(f"{path}: add an 'optimizer' section with a 'type' (AdamW, as in ds_configs/*.json): gptx "
                          f"hands DeepSpeed no optimizer of its own")


def zero_stage(cfg: dict) -> int:
    zero = cfg.get("zero_optimization") or {}
    return zero.get("stage", 0) if isinstance(zero, dict) else 0


def offload_devices(cfg: dict) -> tuple[str, str]:
    """(optimizer, parameters) offload devices: "none", "cpu" or "nvme"."""
    zero = cfg.get("zero_optimization") or {}
    return tuple(((zero.get(key) or {}).get("device") or "none") for key in ("offload_optimizer", "offload_param"))


def _check_offload(cfg: dict, zero: dict, stage: int, pipe_size: int, path) -> None:
    for key in ("offload_optimizer", "offload_param"):
        section = zero.get(key)
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{path}: zero_optimization.{key} must be an object like {{\"device\": \"cpu\"}}")
    optimizer, params = offload_devices(cfg)
    for key, device in (("offload_optimizer", optimizer), ("offload_param", params)):
        if device not in ("none", "cpu", "nvme"):
            raise ConfigError(f"{path}: zero_optimization.{key}.device must be cpu, nvme or none, got {device!r}")
    if optimizer != "none" and stage == 0:
        raise ConfigError(f"{path}: zero_optimization.offload_optimizer needs ZeRO stage 1, 2 or 3")
    if optimizer == "nvme" and stage != 3:
        raise ConfigError(f"{path}: offload_optimizer to nvme needs ZeRO stage 3 (DeepSpeed's ZeRO-Infinity), "
                          f"so --pipe-parallel-size 0; with stage {stage} offload to cpu")
    if params != "none" and stage != 3:
        raise ConfigError(f"{path}: zero_optimization.offload_param needs ZeRO stage 3 (--pipe-parallel-size 0); "
                          f"with stage {stage} offload only the optimizer (offload_optimizer)")
    for key, device in (("offload_optimizer", optimizer), ("offload_param", params)):
        if device == "nvme" and not (zero.get(key) or {}).get("nvme_path"):
            raise ConfigError(f"{path}: zero_optimization.{key}.nvme_path: name a directory on the NVMe drive")
    opt_params = (cfg.get("optimizer") or {}).get("params") or {}
    if optimizer != "none" and (opt_params.get("torch_adam") or "fused" in opt_params):
        # DeepSpeed would run torch's AdamW on the host copies instead of its vectorized CPU Adam.
        raise ConfigError(f"{path}: remove optimizer.params.torch_adam (and fused) with offload_optimizer: DeepSpeed "
                          f"then steps the host copies with its own DeepSpeedCPUAdam (see ds_configs/cpu_offload.json)")


def precision(cfg: dict) -> str:
    if (cfg.get("fp16") or {}).get("enabled", False):
        return "fp16"
    if (cfg.get("bf16") or cfg.get("bfloat16") or {}).get("enabled", False):
        return "bf16"
    return "fp32"
