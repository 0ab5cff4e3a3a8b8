"""Checks of a whole config, across its keys: what each field's type alone does not say
(ranges, divisibility, choices, keys that exclude each other). gptx.config runs them once,
at load."""
from __future__ import annotations

import math

from gptx.errors import ConfigError
from gptx.training.schedule import SeqLenWarmup


def validate(cfg) -> None:
    """Raise ConfigError, naming the key, for the first value out of bounds (cfg: a gptx.config.Config)."""
    m, t = cfg.model, cfg.train
    for key in ("vocab_size", "seq_len", "n_layer", "n_head", "n_embd", "pad_vocab_to_multiple"):
        if getattr(m, key) < 1:
            raise ConfigError(f"model.{key}: must be a positive integer, got {getattr(m, key)}")
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head}); "
                          f"adjust one of them")
    choices = {"position_embedding": ("learned", "alibi", "rotary", "none"),
               "residual": ("sequential", "parallel"), "norm": ("layernorm", "rmsnorm", "rezero"),
               "mlp": ("gelu", "swiglu")}
    for key, allowed in choices.items():
        if getattr(m, key) not in allowed:
            raise ConfigError(f"model.{key}: expected one of {', '.join(allowed)}, got '{getattr(m, key)}'")
    if m.macaron and m.residual == "parallel":
        raise ConfigError("model.macaron needs model.residual: sequential (its half-step feed-forwards sit "
                          "before and after attention, which a parallel block does not order)")
    if m.position_embedding == "rotary" and m.head_dim % 2:
        raise ConfigError(f"model.position_embedding rotary needs an even head size; n_embd / n_head = {m.head_dim}")
    if m.n_kv_head is not None and (m.n_kv_head < 1 or m.n_head % m.n_kv_head):
        raise ConfigError(f"model.n_kv_head: must be a positive divisor of model.n_head ({m.n_head}), "
                          f"got {m.n_kv_head}")
    if m.ffn_hidden_size is not None and m.ffn_hidden_size < 1:
        raise ConfigError(f"model.ffn_hidden_size: must be a positive integer or null, got {m.ffn_hidden_size}")
    if m.ffn_multiple_of < 1:
        raise ConfigError(f"model.ffn_multiple_of: must be a positive integer, got {m.ffn_multiple_of}")
    if not 0 < m.norm_eps < 1:
        raise ConfigError(f"model.norm_eps: must be in (0, 1), got {m.norm_eps}")
    if not 1 < m.rope_theta < math.inf:  # NaN too
        raise ConfigError(f"model.rope_theta: must be above 1, got {m.rope_theta}")
    if m.attention_topk is not None and m.attention_topk < 1:
        raise ConfigError(f"model.attention_topk: must be a positive integer or null, got {m.attention_topk}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout: must be in [0, 1), got {m.dropout}")
    if t.train_iters < 1:
        raise ConfigError(f"train.train_iters: must be at least 1, got {t.train_iters}")
    if not 0 < t.lr < float("inf"):  # NaN too
        raise ConfigError(f"train.lr: must be a positive number, got {t.lr}")
    if t.min_lr is not None and not 0 <= t.min_lr <= t.lr:
        raise ConfigError(f"train.min_lr: must be between 0 and train.lr ({t.lr}), got {t.min_lr}")
    for key in ("warmup_iters", "eval_interval", "save_interval", "exit_interval", "seed",
                "activation_checkpoint_interval", "sample_tokens", "keep_checkpoints",
                "max_skipped_at_min_scale", "pipe_parallel_size"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}: must be >= 0, got {getattr(t, key)}")
    for key in ("eval_iters", "log_interval"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}: must be >= 1, got {getattr(t, key)}")
    if t.seed >= 2 ** 62:  # with each layer's and rank's index added, it must still fit torch's int64
        raise ConfigError(f"train.seed: must be below 2**62, got {t.seed}")
    if not 1 <= t.dist_timeout <= 366 * 86400:  # a bound, well inside what timedelta holds
        raise ConfigError(f"train.dist_timeout: must be 1 to 31622400 seconds (a year), got {t.dist_timeout}")
    if t.spike_factor != 0 and not 1 < t.spike_factor < math.inf:  # NaN would turn the check off unsaid
        raise ConfigError(f"train.spike_factor: must be 0 (off) or above 1, got {t.spike_factor}")
    if t.lr_decay_iters is not None and t.lr_decay_iters <= t.warmup_iters:  # the cosine runs between them
        raise ConfigError(f"train.lr_decay_iters: must be above train.warmup_iters ({t.warmup_iters}), got "
                          f"{t.lr_decay_iters}")
    if t.seq_len_warmup:
        SeqLenWarmup.parse(t.seq_len_warmup, m.seq_len)
    if t.rampup_batch_size:
        parts = t.rampup_batch_size.replace(",", " ").split()
        if len(parts) != 3 or not all(x.isdigit() and int(x) > 0 for x in parts):
            raise ConfigError(f"train.rampup_batch_size: expected 'START,INCREMENT,SAMPLES' (three positive integers, "
                              f"in sequences), got {t.rampup_batch_size!r}")
    method = t.partition_method.lower()
    if not (method in ("parameters", "uniform", "compute") or (method.startswith("type:") and len(method) > 5)):
        raise ConfigError(f"train.partition_method: expected parameters, uniform, compute or type:REGEX, "
                          f"got '{t.partition_method}'")
    if t.pipeline_schedule not in ("1f1b", "zb-h1"):
        raise ConfigError(f"train.pipeline_schedule: expected 1f1b or zb-h1, got '{t.pipeline_schedule}'")
    if t.pipeline_schedule == "zb-h1" and t.pipe_parallel_size == 0:
        raise ConfigError("train.pipeline_schedule zb-h1 needs the pipeline engine (pipe_parallel_size >= 1)")
    n_specs = n_pipeline_layers(m)
    if t.pipe_parallel_size > n_specs:
        raise ConfigError(f"train.pipe_parallel_size ({t.pipe_parallel_size}) exceeds the {n_specs} pipeline "
                          f"layers of this model; use at most {n_specs} stages or more layers")


def n_pipeline_layers(m) -> int:
    """Length of the flat LayerSpec list (see gptx.model.gpt.layer_specs)."""
    return 2 + m.n_layer + 2  # token emb, position emb, blocks, final norm, head
