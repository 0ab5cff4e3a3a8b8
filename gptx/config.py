"""Model and training configuration: presets, YAML files, CLI overrides, validated once.

Precedence is CLI > YAML file > preset named in the file's `base:` > dataclass defaults. A
YAML file holds model keys at the top level and training keys under `train:`. DeepSpeed's own
settings (batch sizes, precision, optimizer, ZeRO, clipping) stay in DeepSpeed's JSON, which
`gptx.parallel.ds_config` reads and checks."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from difflib import get_close_matches
from typing import Any

import yaml

from gptx.config_checks import validate
from gptx.errors import ConfigError
from gptx.presets import DEFAULT_PRESET, PRESETS


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the GPT. Defaults are GPT-2 small's architecture."""

    vocab_size: int = 50257
    """Token vocabulary (GPT-2 BPE has 50257)."""
    seq_len: int = 1024
    """Context length in tokens; also the size of the learned position table."""
    n_layer: int = 12
    """Number of decoder blocks."""
    n_head: int = 12
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 768
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (0 for pretraining)."""
    bias: bool = True
    """Biases in Linear layers and LayerNorms, as in GPT-2."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head (a TiedLayerSpec across the end stages)."""
    position_embedding: str = "learned"
    """learned (GPT-2's table), alibi (linear biases on attention), rotary, or none."""
    residual: str = "sequential"
    """sequential (GPT-2) or parallel (GPT-J: x + attn(ln(x)) + mlp(ln(x)))."""
    norm: str = "layernorm"
    """layernorm (pre-LN blocks), rmsnorm (pre-norm blocks with RMSNorm, as Llama), or rezero (no
    norm in blocks; learned branch gates starting at 0)."""
    norm_eps: float = 1e-5
    """Epsilon of the LayerNorms or RMSNorms (GPT-2 and Llama 2 use 1e-5)."""
    mlp: str = "gelu"
    """gelu (GPT-2's two-layer MLP) or swiglu (Llama's gated MLP: down(silu(gate(x)) * up(x)))."""
    ffn_hidden_size: int | None = None
    """Hidden width of the MLP; default 4 x n_embd for gelu, and for swiglu 8/3 x n_embd rounded
    up to a multiple of ffn_multiple_of (the same parameters as a 4x GELU MLP, as Llama)."""
    ffn_multiple_of: int = 256
    """The default SwiGLU width is rounded up to a multiple of this."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention): must divide n_head; default n_head (plain
    multi-head attention); 1 is multi-query attention."""
    rope_theta: float = 10000.0
    """Base of the rotary position angles (position_embedding: rotary)."""
    macaron: bool = False
    """Half-step feed-forward before and after attention in each block."""
    residual_attention: bool = False
    """RealFormer: each layer adds the previous layer's pre-softmax attention scores to its own."""
    attention_topk: int | None = None
    """Explicit sparse attention: each query keeps only its K largest (causal) scores."""
    pad_vocab_to_multiple: int = 1
    """Round the embedding table and head up to a multiple of this many rows (64 or 128 suit GPU
    matmuls). Tokenization and the loss keep vocab_size: the padding rows' logits are -inf."""

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to_multiple
        return -(-self.vocab_size // m) * m

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    def resolved(self) -> "ModelConfig":
        """The same model with its defaults spelled out (MLP width, key/value heads), so that two
        configs of one shape compare equal however they were written."""
        return dataclasses.replace(self, ffn_hidden_size=self.ffn_hidden, n_kv_head=self.kv_heads,
                                   ffn_multiple_of=ModelConfig.ffn_multiple_of)

    @property
    def ffn_hidden(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.mlp == "swiglu":
            m = self.ffn_multiple_of
            return -(-(8 * self.n_embd // 3) // m) * m
        return 4 * self.n_embd


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Paths and run-time state (iteration, data position) are not here."""

    train_iters: int = 200
    """Total iterations (optimizer batches) of the run; a resumed run continues up to it."""
    lr: float = 6e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float | None = None
    """Floor of the cosine decay; default lr / 10."""
    warmup_iters: int = 20
    """Linear warmup length in optimizer steps."""
    lr_decay_iters: int | None = None
    """Optimizer steps after which the cosine is at min_lr (the last step is just above it); default train_iters."""
    eval_interval: int = 50
    """Evaluate on the val split every this many iterations (and at the end); 0 disables."""
    eval_iters: int = 4
    """Batches per evaluation."""
    log_interval: int = 10
    """Print a console line every this many iterations."""
    save_interval: int = 0
    """Save a checkpoint every this many iterations (0: only at the end)."""
    exit_interval: int = 0
    """Save and exit when the iteration is a multiple of this (0: never)."""
    seed: int = 1234
    """Seeds layer initialization (per layer index), data order and dropout."""
    pipe_parallel_size: int = 2
    """Pipeline stages; the data-parallel size is world size / this. 0: no pipeline, the
    whole model as one module under DeepSpeed's plain engine, data parallel over every
    rank (the mode for ZeRO-2 and ZeRO-3)."""
    partition_method: str = "parameters"
    """How layers are split over stages: DeepSpeed's parameters, uniform or type:REGEX, or
    compute (balances estimated FLOPs per layer: the head weighs more, embeddings nothing)."""
    pipeline_schedule: str = "1f1b"
    """The pipeline's training schedule: 1f1b (DeepSpeed's) or zb-h1 (zero bubble: weight gradients
    deferred into idle time, gptx/parallel/zero_bubble.py)."""
    activation_checkpoint_interval: int = 0
    """Recompute activations every this many layers in backward (0: off)."""
    compile_blocks: bool = False
    """torch.compile each decoder block (fuses its elementwise work; the first steps compile)."""
    fused_loss: bool = False
    """Compute the head and the cross-entropy together over chunks of positions, so the full
    (B, T, V) logits never exist at once (gptx/model/fused_loss.py). Same loss and gradients."""
    wandb_project: str | None = None
    """Log to Weights & Biases under this project (offline when no credentials are set)."""
    keep_checkpoints: int = 0
    """Keep only the newest this many complete checkpoints (0: keep all). Older ones are deleted
    only after a newer one is complete."""
    dist_timeout: int = 1800
    """Seconds a collective waits for the other ranks before the run fails (a hung rank)."""
    max_skipped_at_min_scale: int = 10
    """Stop after this many skipped steps in a row (fp16: at the minimum loss scale; bf16: non-finite); 0: never."""
    spike_factor: float = 0.0
    """Report a loss spike when a loss exceeds this many times its running mean (0: off)."""
    sample_tokens: int = 0
    """At each evaluation, print a sample of this many new tokens from the model (0: off)."""
    sample_prompt: str = ""
    """Text the samples start from (GPT-2 BPE); empty starts from end-of-text."""
    seq_len_warmup: str = ""
    """GPT*'s sequence-length warmup: 'ITER:LEN,ITER:LEN,...' trains from iteration ITER (0-based) on
    the first LEN tokens of each sample (e.g. 0:128,3750:256,7500:512); empty: always seq_len."""
    rampup_batch_size: str = ""
    """GPT-3's batch ramp, as Megatron's --rampup-batch-size: 'START,INCREMENT,SAMPLES' in sequences: the global
    batch starts at START and grows by INCREMENT at even steps until, after SAMPLES samples, it is
    the DeepSpeed JSON's train_batch_size (empty: off). The LR schedule counts optimizer steps."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = DEFAULT_PRESET
    """The preset or file the config came from, for logs."""
    padding_from_preset: bool = False
    """model.pad_vocab_to_multiple is a preset's, not set by a file or the command line: a checkpoint
    saved with another table size keeps its own (gptx.training.resume.keep_saved_padding)."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model": dataclasses.asdict(self.model),
                "train": dataclasses.asdict(self.train)}


GPT2_ARCHITECTURE = dict(position_embedding="learned", residual="sequential", norm="layernorm", mlp="gelu",
                         macaron=False, residual_attention=False, attention_topk=None, bias=True,
                         tie_embeddings=True)
"""The architecture keys as GPT-2 has them; any other value makes a variant."""


def describe_model(m: ModelConfig) -> str:
    """Shape and architecture in one line, for the start-up log: a variant names its keys."""
    padded = f" (table padded to {m.padded_vocab_size:,})" if m.padded_vocab_size != m.vocab_size else ""
    changed = [f"{k} {getattr(m, k)}" for k, v in GPT2_ARCHITECTURE.items() if getattr(m, k) != v]
    if m.kv_heads != m.n_head:
        changed.append(f"{m.kv_heads} key/value heads")
    if m.ffn_hidden != 4 * m.n_embd:
        changed.append(f"MLP width {m.ffn_hidden}")
    if m.position_embedding == "rotary" and m.rope_theta != 10000.0:
        changed.append(f"rope_theta {m.rope_theta:g}")
    kind = ("variant: " + ", ".join(changed) + " (the rest as GPT-2)") if changed else "GPT-2 architecture"
    dropout = f", dropout {m.dropout:g}" if m.dropout else ""
    return (f"{m.n_layer} layers, {m.n_head} heads, width {m.n_embd}, context {m.seq_len}, vocabulary "
            f"{m.vocab_size:,}{padded}{dropout}; {kind}")


MODEL_KEYS = {f.name for f in fields(ModelConfig)}
TRAIN_KEYS = {f.name for f in fields(TrainConfig)}
TEXT_KEYS = {f.name for cls in (ModelConfig, TrainConfig) for f in fields(cls) if f.type.startswith("str")}


def field_docs(cls) -> dict[str, str]:
    """Each field's docstring (the string under it in the class body), for --help."""
    import ast
    import inspect
    import textwrap
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}'; expected a YAML file path or one of: "
                          + ", ".join(PRESETS))
    return dict(PRESETS[name])


class NoRepeatsLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping: it keeps the last, which
    may not be the one edited."""

    def construct_mapping(self, node, deep=False):
        # YAML's merge key (<<: *base) brings keys the mapping may set again: only its own are counted.
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value
                if key.tag != "tag:yaml.org,2002:merge"]
        twice = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if twice is not None:
            raise RepeatedKey(twice)
        return super().construct_mapping(node, deep)


class RepeatedKey(Exception):
    pass


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=NoRepeatsLoader)
    except OSError as e:
        raise ConfigError(f"model config file '{path}': cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:  # a binary file given as --model
        raise ConfigError(f"model config file '{path}': not UTF-8 text (byte offset {e.start})") from None
    except RepeatedKey as e:
        raise ConfigError(f"model config file '{path}': key '{e.args[0]}' appears twice in one mapping; "
                          f"keep one") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"model config file '{path}': not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"model config file '{path}': expected a mapping of keys, got {type(data).__name__}")
    return data


def _merge(layers: list[tuple[str, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flatten (source, mapping) layers, later ones winning, into model and train dicts."""
    model: dict[str, Any] = {}
    train: dict[str, Any] = {}
    for source, mapping in layers:
        nested = mapping.get("train") if isinstance(mapping.get("train"), dict) else {}
        for key, value in mapping.items():
            check_key_name(source, key)
            if key == "train":
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: 'train' must be a mapping of training keys")
                for tkey, tvalue in value.items():
                    check_key_name(source, tkey)
                    if tkey not in TRAIN_KEYS:
                        raise ConfigError(f"{source}: unknown training key 'train.{tkey}'; expected one of: "
                                          + ", ".join(sorted(TRAIN_KEYS)))
                    train[tkey] = tvalue
            elif key in MODEL_KEYS:
                model[key] = value
            elif key in TRAIN_KEYS:
                if key in nested:  # which of the two wins would depend on their order in the file
                    raise ConfigError(f"{source}: '{key}' is set both at the top and under 'train:'; keep one")
                train[key] = value
            else:  # a misspelling gets its nearest key; --set takes training keys bare, a YAML file under train:
                near = "".join(f" (did you mean '{k}'?)" for k in get_close_matches(key, [*MODEL_KEYS, *TRAIN_KEYS], 1))
                where = ("give training keys bare: --set lr=1e-3" if source == "command line"
                         else "training keys go under 'train:'")
                raise ConfigError(f"{source}: unknown key '{key}'{near}; model keys are: "
                                  + ", ".join(sorted(MODEL_KEYS)) + f"; {where}")
    return model, train


def check_key_name(source: str, key) -> None:
    if not isinstance(key, str):  # YAML 1.1 reads on/off/yes/no as booleans and bare digits as numbers
        raise ConfigError(f"{source}: key {key!r} is not a name (YAML reads an unquoted on, off, yes, no or "
                          f"number so); fix the key or quote it")


def parse_override(text: str) -> tuple[str, Any]:
    """'n_layer=4' -> ('n_layer', 4), values parsed as YAML scalars; a text key's value as written
    (a prompt like 'Q: why?' or '# Python' is text, not YAML). 'train.lr' and 'model.n_layer'
    are their keys."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected KEY=VALUE, e.g. --set n_layer=4")
    key, raw = text.split("=", 1)
    key = key.strip()
    section, _, bare = key.partition(".")
    if bare in {"train": TRAIN_KEYS, "model": MODEL_KEYS}.get(section, ()):
        key = bare
    if key in TEXT_KEYS and raw not in ("null", "~"):
        return key, raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(model: str | None = None, overrides: dict[str, Any] | None = None,
                saved: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None) -> Config:
    """Resolve a preset name or YAML path plus CLI overrides into a validated Config.

    `saved` is a checkpoint's resolved config ({"name", "model", "train"}) on --load: the layer
    under the others, so its keys hold unless `model` (a preset or file given again) or an
    override sets them; without `model` no preset is read at all (the checkpoint's keys are
    already resolved). Keys this version does not know are left out, as check_compatible does.
    `defaults` is a tool's own default for keys, under every other layer.
    """
    layers: list[tuple[str, dict[str, Any]]] = [("the tool's defaults", defaults)] if defaults else []
    if saved:
        train = {k: v for k, v in (saved.get("train") or {}).items() if k in TRAIN_KEYS}
        layers.append(("checkpoint", {**{k: v for k, v in (saved.get("model") or {}).items() if k in MODEL_KEYS},
                                      "train": train}))
        if model is None:
            model = saved.get("name") or DEFAULT_PRESET
            return _finish(model, layers, overrides)
    model = model or DEFAULT_PRESET
    # A preset's name is the preset, even beside a folder of that name (a Hugging Face gpt2/ download).
    if model.endswith((".yaml", ".yml")) or os.path.sep in model or (model not in PRESETS and os.path.exists(model)):
        data = _read_yaml(model)
        base = data.pop("base", None)
        if base is not None:
            if not isinstance(base, str) or base not in PRESETS:
                raise ConfigError(f"model config file '{model}': base {base!r} is not a preset; 'base' names one "
                                  f"of: {', '.join(PRESETS)} (a YAML file cannot be a base)")
            layers.append((f"preset '{base}'", _preset(base)))
        layers.append((f"model config file '{model}'", data))
    else:
        layers.append((f"preset '{model}'", _preset(model)))
    return _finish(model, layers, overrides)


def _finish(model: str, layers: list[tuple[str, dict[str, Any]]], overrides: dict[str, Any] | None) -> Config:
    if overrides:
        layers.append(("command line", dict(overrides)))
    model_kw, train_kw = _merge(layers)
    setters = [source for source, mapping in layers if "pad_vocab_to_multiple" in mapping]
    cfg = Config(model=_build(ModelConfig, model_kw, "model"), train=_build(TrainConfig, train_kw, "train"),
                 name=model, padding_from_preset=bool(setters) and setters[-1].startswith("preset "))
    validate(cfg)
    return cfg


def _build(cls, values: dict[str, Any], section: str):
    kwargs = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        kwargs[f.name] = _coerce(f"{section}.{f.name}", values[f.name], f.type)
    return cls(**kwargs)


def _coerce(name: str, value: Any, type_: str) -> Any:
    """Check a YAML/CLI value against the field's annotation; ints are fine for floats."""
    optional = "None" in type_
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: must be set (got null)")
    base = type_.replace(" | None", "")
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if base == "str":
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    raise AssertionError(f"unhandled field type {type_}")
