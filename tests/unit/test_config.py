import re

import pytest

from gptx.config import ModelConfig, load_config, parse_override
from gptx.errors import ConfigError
from gptx.model.gpt import layer_specs
from gptx.parallel.pipeline import count_layer_params
from gptx.presets import PRESETS


def unique_params(cfg):
    counts = count_layer_params(layer_specs(cfg.model, seed=0))
    tied_copy = cfg.model.padded_vocab_size * cfg.model.n_embd if cfg.model.tie_embeddings else 0
    return sum(counts) - tied_copy


@pytest.mark.parametrize("name,expected", [
    # Parameter counts of the released GPT-2 checkpoints (tied embeddings, biases).
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200),
])
def test_gpt2_presets_have_the_published_parameter_counts(name, expected):
    assert unique_params(load_config(name, {"pad_vocab_to_multiple": 1})) == expected
    # The presets' table has 50,304 rows: 47 padding rows of n_embd each on top of the released count.
    cfg = load_config(name)
    assert cfg.model.vocab_size == 50257 and cfg.model.padded_vocab_size == 50304
    assert unique_params(cfg) == expected + 47 * cfg.model.n_embd


def test_parameter_count_follows_the_closed_form():
    cfg = load_config("gpt3-2.7b")
    m = cfg.model
    C, L, V, T = m.n_embd, m.n_layer, 50304, m.seq_len  # GPT-2's 50,257 tokens padded to a multiple of 64
    per_block = 12 * C * C + 13 * C  # qkv + proj + fc + proj weights and biases, two LayerNorms
    assert unique_params(cfg) == V * C + T * C + L * per_block + 2 * C


@pytest.mark.parametrize("name,expected", [
    # Hugging Face's parameter counts of TinyLlama/TinyLlama_v1.1 and meta-llama/Llama-2-7b-hf.
    ("tinyllama-1.1b", 1_100_048_384), ("llama2-7b", 6_738_415_616),
])
def test_llama_presets_have_the_published_parameter_counts(name, expected):
    assert unique_params(load_config(name)) == expected


def test_llama_style_125m_follows_the_closed_form():
    m = load_config("llama-style-125m").model
    C, L, V = m.n_embd, m.n_layer, 50304  # GPT-2's vocabulary padded to a multiple of 64
    kv, H = 4 * (C // 12), 8 * C // 3  # 4 of 12 heads keep keys and values; 8/3 C is a multiple of 256 here
    per_block = 2 * C * C + 2 * C * kv + 3 * C * H + 2 * C  # q, out; k, v; gate, up, down; two RMSNorm weights
    assert unique_params(load_config("llama-style-125m")) == V * C + L * per_block + C == 126_736_128


@pytest.mark.parametrize("n_embd,width", [(2048, 5632), (4096, 11008), (768, 2048), (100, 512)])
def test_swiglu_width_defaults_to_eight_thirds_rounded_up_to_256(n_embd, width):
    # 5632 and 11008 are TinyLlama's and Llama 2 7B's published intermediate sizes.
    m = ModelConfig(n_embd=n_embd, n_head=4, mlp="swiglu")
    assert m.ffn_hidden == width
    assert ModelConfig(n_embd=n_embd, n_head=4, mlp="swiglu", ffn_hidden_size=7).ffn_hidden == 7
    assert ModelConfig(n_embd=n_embd, n_head=4).ffn_hidden == 4 * n_embd


def test_every_preset_is_valid_and_gpt3_uses_2048_context():
    for name in PRESETS:
        cfg = load_config(name)
        assert cfg.model.n_embd % cfg.model.n_head == 0
    assert load_config("gpt3-175b").model.seq_len == 2048
    assert load_config("gpt3-175b").model.n_embd == 12288
    assert load_config("gpt3-175b").train.lr == pytest.approx(6e-5)


def test_yaml_base_overrides_and_cli_precedence(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("base: gpt2\nn_layer: 3\ntie_embeddings: false\ntrain:\n  lr: 1.0e-4\n  train_iters: 7\n")
    cfg = load_config(str(f), {"n_layer": 5, "train_iters": 9})
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.tie_embeddings) == (5, 768, False)
    assert (cfg.train.lr, cfg.train.train_iters) == (1e-4, 9)


@pytest.mark.parametrize("body,needle", [
    ("n_layers: 3\n", "unknown key 'n_layers' (did you mean 'n_layer'?); model keys are"),
    ("base: gpt9\n", "base 'gpt9' is not a preset; 'base' names one of: tiny"),
    # Before: "unknown model preset 'other.yaml'; expected a YAML file path", which it is.
    ("base: other.yaml\n", "base 'other.yaml' is not a preset; 'base' names one of: tiny, gpt2, "),
    # YAML 1.1 reads these keys as true and 12: before, a TypeError traceback from the spelling hint.
    ("base: tiny\non: 3\n", "key True is not a name (YAML reads an unquoted on, off, yes, no or number so)"),
    ("train:\n  12: 4\n", "key 12 is not a name"),
    # Which one won depended on their order, silently.
    ("n_layer: 2\nn_layer: 6\n", "key 'n_layer' appears twice in one mapping; keep one"),
    ("lr: 1.0e-3\ntrain:\n  lr: 5.0e-4\n", "'lr' is set both at the top and under 'train:'; keep one"),
    ("rope_theta: .nan\n", "model.rope_theta: must be above 1, got nan"),  # the loss went nan at iteration 1
    ("train:\n  spike_factor: .nan\n", "train.spike_factor: must be 0 (off) or above 1, got nan"),
    ("n_embd: 100\nn_head: 3\n", "must be divisible by model.n_head"),
    ("n_layer: two\n", "model.n_layer: expected an integer"),
    ("train:\n  lrr: 1\n", "unknown training key 'train.lrr'"),
    ("n_layer: [1\n", "not valid YAML"),
    ("dropout: 1.5\n", "model.dropout"),
    ("n_kv_head: 5\n", "model.n_kv_head: must be a positive divisor of model.n_head"),
    ("n_kv_head: 0\n", "model.n_kv_head"),
    ("mlp: relu\n", "model.mlp: expected one of gelu, swiglu"),
    ("norm: batchnorm\n", "model.norm: expected one of layernorm, rmsnorm, rezero"),
    ("norm_eps: 0\n", "model.norm_eps"),
    ("rope_theta: 0.5\n", "model.rope_theta"),
    ("ffn_hidden_size: 0\n", "model.ffn_hidden_size"),
    ("ffn_multiple_of: 0\n", "model.ffn_multiple_of"),
    ("train:\n  seed: 18446744073709551615\n", "train.seed: must be below 2**62"),  # a traceback in torch
    ("train:\n  dist_timeout: 99999999999999\n", "train.dist_timeout: must be 1 to 31622400"),  # in timedelta
    ("train:\n  dist_timeout: 0\n", "train.dist_timeout"),
    ("train:\n  lr: .nan\n", "train.lr: must be a positive number, got nan"),  # trained to a NaN loss
    ("train:\n  lr: .inf\n", "train.lr: must be a positive number, got inf"),
    # The cosine would start at min_lr: the warmup would end in a drop, never at the peak.
    ("train:\n  warmup_iters: 5\n  lr_decay_iters: 5\n", "train.lr_decay_iters: must be above train.warmup_iters (5)"),
])
def test_bad_yaml_is_rejected_naming_the_field(tmp_path, body, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(body)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(str(f))


def test_yaml_merge_keys_still_work_beside_the_repeated_key_check(tmp_path):
    f = tmp_path / "anchors.yaml"
    f.write_text("base: tiny\ntrain:\n  <<: {lr: 1.0e-3, train_iters: 7}\n  train_iters: 9\n")
    cfg = load_config(str(f))
    assert (cfg.train.lr, cfg.train.train_iters) == (1e-3, 9)  # the mapping's own key wins over the merged one


def test_override_parsing():
    assert parse_override("n_layer=4") == ("n_layer", 4)
    assert parse_override("dropout=0.1") == ("dropout", 0.1)
    assert load_config("tiny", dict([parse_override("train.lr=1e-3")])).train.lr == 1e-3
    assert parse_override("model.n_layer=4") == ("n_layer", 4)
    # Text keys keep the text: as YAML these were a mapping, a comment (null) and a boolean.
    for text in ("Q: What is the capital of France?", "# Python", "def f():", "on"):
        assert parse_override(f"sample_prompt={text}") == ("sample_prompt", text)
        assert load_config("tiny", dict([parse_override(f"sample_prompt={text}")])).train.sample_prompt == text
    assert parse_override("wandb_project=null") == ("wandb_project", None)
    with pytest.raises(ConfigError, match="unknown key 'max_iters'.*; give training keys bare: --set lr=1e-3"):
        load_config("tiny", dict([parse_override("max_iters=100")]))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("n_layer")


def test_a_preset_name_is_the_preset_even_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()  # a Hugging Face download saved as gpt2/: before, "cannot read it (Is a directory)"
    (tmp_path / "gpt2" / "config.json").write_text("{}")
    assert load_config("gpt2").model.n_embd == 768


def test_a_tools_default_lies_under_the_preset_the_file_and_the_command_line(tmp_path):
    f = tmp_path / "pp.yaml"
    f.write_text("base: tiny\ntrain:\n  pipe_parallel_size: 1\n")
    world = {"pipe_parallel_size": 2}  # one stage per rank, the benchmark tools' default
    assert load_config(str(f), defaults=world).train.pipe_parallel_size == 1  # before: 2, the file unheard
    assert load_config(str(f), {"pipe_parallel_size": 0}, defaults=world).train.pipe_parallel_size == 0
    assert load_config("tiny", defaults=world).train.pipe_parallel_size == 2


def test_more_stages_than_layers_is_rejected():
    with pytest.raises(ConfigError, match="pipe_parallel_size"):
        load_config("tiny", {"pipe_parallel_size": 9})


def test_exponent_without_a_dot_is_a_number_and_words_are_not(tmp_path):
    # YAML 1.1 reads 3e-4 as a string; as a float key it must still be 3e-4.
    assert load_config("tiny", dict([parse_override("lr=3e-4")])).train.lr == pytest.approx(3e-4)
    (tmp_path / "m.yaml").write_text("base: tiny\nlr: 1e-3\n")
    assert load_config(str(tmp_path / "m.yaml")).train.lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="train.lr: expected a number, got 'fast'"):
        load_config("tiny", dict([parse_override("lr=fast")]))


GPT2_VOCAB_PRESETS = [n for n in PRESETS if n != "tiny" and load_config(n).model.vocab_size == 50257]


def test_gpt2_vocabulary_presets_pad_to_64_and_the_others_keep_their_tables():
    assert len(GPT2_VOCAB_PRESETS) == 15
    for name in PRESETS:
        m = load_config(name).model
        assert m.padded_vocab_size == (50304 if name in GPT2_VOCAB_PRESETS else m.vocab_size), name
    assert load_config("tiny").model.padded_vocab_size == 50257  # the README's quickstart numbers are tiny's


def test_padding_remembers_whether_only_the_preset_asked_for_it(tmp_path):
    based = tmp_path / "based.yaml"
    based.write_text("base: gpt2\nn_layer: 2\n")
    chosen = tmp_path / "chosen.yaml"
    chosen.write_text("base: gpt2\npad_vocab_to_multiple: 64\n")
    assert load_config("gpt2").padding_from_preset and load_config(str(based)).padding_from_preset
    assert not load_config("gpt2", {"pad_vocab_to_multiple": 64}).padding_from_preset
    assert not load_config(str(chosen)).padding_from_preset
    assert not load_config("tiny").padding_from_preset  # nothing set it: the dataclass default
