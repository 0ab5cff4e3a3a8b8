"""Hugging Face Llama directories (LlamaForCausalLM: config.json + model.safetensors) to and from gptx.

A gptx model with RMSNorm, SwiGLU, rotary positions and sequential pre-norm blocks is a
Llama. The tensors map one to one except two fused ones, split on export and joined on
import: gptx's c_attn holds q, k and v projections stacked by rows (queries first, then the
n_kv_head key heads, then the value heads), and its SwiGLU c_fc holds the gate rows, then
the up rows. Both use the same rotary layout as Hugging Face (rotating halves of each head),
so no weight is permuted.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from gptx.config import Config, ModelConfig, TrainConfig
from gptx.errors import CheckpointError

# The architecture keys a Llama fixes (bias, heads, widths, eps and theta are its settings).
LLAMA_ARCHITECTURE = dict(norm="rmsnorm", mlp="swiglu", position_embedding="rotary", residual="sequential",
                          macaron=False, residual_attention=False, attention_topk=None)


def is_llama(m: ModelConfig) -> bool:
    return all(getattr(m, k) == v for k, v in LLAMA_ARCHITECTURE.items())


def llama_differences(m: ModelConfig) -> list[str]:
    return [f"{k}: {getattr(m, k)}" for k, v in LLAMA_ARCHITECTURE.items() if getattr(m, k) != v]


def to_llama_tensors(layers: dict[int, dict[str, torch.Tensor]], m: ModelConfig) -> dict[str, torch.Tensor]:
    """gptx per-position state dicts -> Hugging Face Llama tensor names."""
    L, V, C = m.n_layer, m.vocab_size, m.n_embd
    kv, H = m.kv_heads * m.head_dim, m.ffn_hidden
    sd = {"model.embed_tokens.weight": layers[0]["wte.weight"][:V]}  # padding rows are not Llama's
    for i in range(L):
        block, p = layers[2 + i], f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = block["ln_1.weight"]
        sd[p + "post_attention_layernorm.weight"] = block["ln_2.weight"]
        suffixes = ("weight", "bias") if m.bias else ("weight",)
        for suffix in suffixes:
            q, k, v = block[f"attn.c_attn.{suffix}"].split([C, kv, kv])
            sd[p + f"self_attn.q_proj.{suffix}"], sd[p + f"self_attn.k_proj.{suffix}"] = q, k
            sd[p + f"self_attn.v_proj.{suffix}"] = v
            sd[p + f"self_attn.o_proj.{suffix}"] = block[f"attn.c_proj.{suffix}"]
            gate, up = block[f"mlp.c_fc.{suffix}"].split([H, H])
            sd[p + f"mlp.gate_proj.{suffix}"], sd[p + f"mlp.up_proj.{suffix}"] = gate, up
            sd[p + f"mlp.down_proj.{suffix}"] = block[f"mlp.c_proj.{suffix}"]
    sd["model.norm.weight"] = layers[2 + L]["ln_f.weight"]
    if not m.tie_embeddings:
        sd["lm_head.weight"] = layers[3 + L]["lm_head.weight"][:V]
    return sd


def llama_config(m: ModelConfig, eot: int | None) -> dict:
    """config.json for transformers' LlamaForCausalLM (rope_theta written both ways: transformers 4
    reads the top-level key, 5 its rope_parameters)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": m.vocab_size,
            "hidden_size": m.n_embd, "intermediate_size": m.ffn_hidden, "num_hidden_layers": m.n_layer,
            "num_attention_heads": m.n_head, "num_key_value_heads": m.kv_heads, "head_dim": m.head_dim,
            "hidden_act": "silu", "max_position_embeddings": m.seq_len, "rms_norm_eps": m.norm_eps,
            "rope_theta": m.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
            "rope_scaling": None, "attention_bias": m.bias, "mlp_bias": m.bias,
            "attention_dropout": m.dropout, "tie_word_embeddings": m.tie_embeddings,
            "bos_token_id": eot, "eos_token_id": eot, "torch_dtype": "float32"}


def from_llama(src: Path, hf: dict, sd: dict[str, torch.Tensor]) -> tuple[dict[int, dict[str, torch.Tensor]], Config]:
    """A Llama config.json and its tensors -> per-layer-position state dicts and the gptx Config."""
    def fail(what: str):
        raise CheckpointError(f"--from-hf '{src}': {what}")
    if hf.get("hidden_act", "silu") != "silu":
        fail(f"hidden_act {hf['hidden_act']!r} is not Llama's silu")
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        fail(f"rope_parameters {rope!r} is not an object")
    if (rope.get("rope_type") or rope.get("type") or "default") != "default" or hf.get("rope_scaling"):
        fail("rope scaling (rope_scaling / rope_parameters.rope_type other than 'default') is not supported")
    for key in ("hidden_size", "num_attention_heads"):  # needed before the config is built
        if key not in hf:
            fail(f"config.json has no {key}")
    C, nh = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, C // nh):
        fail(f"head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads ({C // nh})")
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        fail("attention_bias and mlp_bias differ; gptx's bias key sets both")
    bias = bool(hf.get("attention_bias", False))
    try:
        m = ModelConfig(vocab_size=hf["vocab_size"], seq_len=hf["max_position_embeddings"],
                        n_layer=hf["num_hidden_layers"], n_head=nh, n_kv_head=hf.get("num_key_value_heads") or nh,
                        n_embd=C, ffn_hidden_size=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), bias=bias,
                        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                        dropout=float(hf.get("attention_dropout", 0.0)), **LLAMA_ARCHITECTURE)
    except KeyError as e:
        fail(f"config.json has no {e.args[0]}")
    except (TypeError, ValueError):  # float() of a string or a list
        fail("config.json: rms_norm_eps, rope_theta and attention_dropout must be numbers")
    L = m.n_layer
    sd = {k: v.float() for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}  # recomputed, not learned
    used = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return sd[name]
    try:
        layers = {0: {"wte.weight": take("model.embed_tokens.weight")},
                  1: {}, 2 + L: {"ln_f.weight": take("model.norm.weight")}}
        for i in range(L):
            p = f"model.layers.{i}."
            block = {"ln_1.weight": take(p + "input_layernorm.weight"),
                     "ln_2.weight": take(p + "post_attention_layernorm.weight")}
            for suffix in (("weight", "bias") if bias else ("weight",)):
                block[f"attn.c_attn.{suffix}"] = torch.cat([take(p + f"self_attn.{x}_proj.{suffix}") for x in "qkv"])
                block[f"attn.c_proj.{suffix}"] = take(p + f"self_attn.o_proj.{suffix}")
                block[f"mlp.c_fc.{suffix}"] = torch.cat([take(p + f"mlp.{x}_proj.{suffix}") for x in ("gate", "up")])
                block[f"mlp.c_proj.{suffix}"] = take(p + f"mlp.down_proj.{suffix}")
            layers[2 + i] = block
        if not m.tie_embeddings:
            layers[3 + L] = {"lm_head.weight": take("lm_head.weight")}
    except KeyError as e:
        fail(f"missing tensor {e.args[0]}")
    except RuntimeError:  # torch.cat of pieces whose widths disagree
        fail("the q/k/v or gate/up projections' shapes disagree with each other")
    unused = sorted(set(sd) - used)
    if unused:  # e.g. biases that config.json says are not there: dropping them would change the model
        fail(f"{len(unused)} tensor(s) this config.json does not account for, first {unused[0]}")
    return layers, Config(model=m, train=TrainConfig(), name=f"hf:{src.name}")


def llama_config_text(m: ModelConfig, eot: int | None, torch_dtype: str = "float32") -> str:
    """config.json of a Llama export."""
    return json.dumps(dict(llama_config(m, eot), torch_dtype=torch_dtype), indent=2) + "\n"
