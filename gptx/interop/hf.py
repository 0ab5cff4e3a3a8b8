"""Hugging Face directories (config.json + model.safetensors) to and from gptx: GPT-2 here, Llama
through gptx.interop.hf_llama (chosen by the model's architecture on export, by model_type on import).

Weights are written with the safetensors package, in the run's precision and in shards as
transformers' save_pretrained writes them, and read through its memory map once the header
has been checked here (so a damaged file is one line naming it). GPT-2 stores its projections
as Conv1D, (in, out), where nn.Linear is (out, in): those weights are transposed.

A GPT-2-vocabulary export also gets GPT-2's tokenizer files (gptx.interop.hf_tokenizer).
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gptx.config import GPT2_ARCHITECTURE, Config, ModelConfig, TrainConfig
from gptx.config_checks import validate
from gptx.data.tokens import GPT2_EOT, reads_gpt2_bpe
from gptx.errors import CheckpointError, ConfigError
from gptx.interop.hf_llama import from_llama, is_llama, llama_config_text, llama_differences, to_llama_tensors
from gptx.interop.hf_tokenizer import RECORD_KEY, file_hash, gpt2_tokenizer_files, tokenizer_plan
from gptx.model.gpt import GPT
from gptx.training.checkpoint_files import META, checkpoint_folders

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Published files carry integer buffers too (e.g. position ids).
READ_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}
INT_KEYS = ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd", "hidden_size", "intermediate_size",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "head_dim",
            "n_inner")
BOOL_KEYS = ("tie_word_embeddings", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "attention_bias",
             "mlp_bias")
PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
"""transformers' save_pretrained default ("5GB")."""
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
EXPORT_MARKER = "gptx_export.json"
"""Written with every export: a directory holding it may be exported into again, another may not."""
SAFETENSORS_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")
"""The temporary file safetensors writes a file through (Rust's tempfile crate names it so)."""


def is_leftover(name: str) -> bool:
    """A file of an export that was killed: a staged .partial copy, or safetensors' temporary file."""
    return name.endswith(".partial") or SAFETENSORS_TEMP.fullmatch(name) is not None


def shard_names(tensors: dict[str, torch.Tensor], itemsize: int, max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in order: a shard closes before the tensor that would take it past
    `max_shard_bytes` (a tensor larger than that is a shard of its own), as transformers shards."""
    shards, size = [[]], 0
    for name, t in tensors.items():
        n = t.numel() * itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_weights(tensors: dict[str, torch.Tensor], out: Path, dtype: torch.dtype,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, small_files: dict[str, bytes] | None = None) -> int:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards with model.safetensors.index.json
    (transformers' layout), in `dtype`, one shard's copy in memory at a time, and `small_files`
    (config.json, the tokenizer's) beside them. Returns the number of weight files."""
    def own_storage(t):  # a row slice of a padded table would take the whole table's bytes with it
        t = t.detach().to(dtype).contiguous()
        return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()
    if dtype == torch.float16:  # bf16 and fp32 weights past fp16's range would be written as inf
        for name, t in tensors.items():
            largest = float(t.detach().abs().max()) if t.numel() else 0.0
            if largest > torch.finfo(torch.float16).max:
                raise CheckpointError(f"--to-hf '{out}': {name} holds {largest:g}, beyond float16's range (65504); "
                                      f"export with --dtype bfloat16 or float32")
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = shard_names(tensors, itemsize, max_shard_bytes)
    files = [SINGLE_FILE] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                                      for i in range(1, len(shards) + 1)]
    index = {"metadata": {"total_size": sum(t.numel() * itemsize for t in tensors.values())},
             "weight_map": {name: file for file, names in zip(files, shards) for name in names}}
    # Written under .partial names and swapped in only when all are complete, so a failed write
    # (a full disk) leaves a previous export in this directory as it was.
    for path in out.iterdir():  # a killed export's: nothing else would ever remove them
        if is_leftover(path.name) and path.is_file():
            path.unlink()
    written = []
    try:
        for name, data in (small_files or {}).items():
            written.append(out / (name + ".partial"))
            written[-1].write_bytes(data)
        for file, names in zip(files, shards):
            written.append(out / (file + ".partial"))
            save_file({name: own_storage(tensors[name]) for name in names}, str(written[-1]),
                      metadata={"format": "pt"})
        if len(shards) > 1:
            written.append(out / (INDEX_FILE + ".partial"))
            written[-1].write_text(json.dumps(index, indent=2) + "\n")
    except BaseException as e:  # Ctrl-C too: its staged files would stay behind
        for path in written:
            path.unlink(missing_ok=True)
        if not isinstance(e, (OSError, SafetensorError)):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CheckpointError(f"--to-hf '{out}': could not write the export ({reason}); nothing in it was "
                              f"replaced") from None
    for old in [*out.glob("model-*-of-*.safetensors"), out / SINGLE_FILE, out / INDEX_FILE]:
        old.unlink(missing_ok=True)  # a previous export's shards would not match the new index
    for path in written:
        path.replace(path.with_name(path.name[:-len(".partial")]))
    return len(shards)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, read through a memory map; a file that is not one
    (garbage, cut short, a Git LFS pointer) is a CheckpointError naming it, found from the header
    before any tensor is read."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(64)
            n = struct.unpack("<Q", first[:8])[0] if len(first) >= 8 else 0
            f.seek(8)
            head = f.read(n) if 0 < n <= size - 8 else b""
    except OSError as e:
        raise CheckpointError(f"safetensors file '{path}': cannot read it ({e.strerror})") from None

    def bad(what: str):
        hint = ("it is a Git LFS pointer, not the weights: run git lfs pull in that directory"
                if first.startswith(b"version https://git-lfs") else
                "damaged, cut short or not a safetensors file")
        raise CheckpointError(f"safetensors file '{path}': {what}; {hint}")
    if size < 8:
        bad(f"{size} bytes, shorter than its 8-byte header length")
    if n > size - 8:
        bad(f"a header of {n:,} bytes does not fit in its {size:,}")
    try:
        header = json.loads(head)
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        bad("its header is not JSON")
    if not isinstance(header, dict):
        bad("its header is not a JSON object")
    header.pop("__metadata__", None)
    data = size - 8 - n
    for name, info in header.items():
        try:
            dtype = READ_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            if isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] not in READ_DTYPES:
                raise CheckpointError(f"safetensors file '{path}': tensor {name} has dtype {info['dtype']}, "
                                      f"not one of {', '.join(READ_DTYPES)}") from None
            bad(f"tensor {name}: expected dtype, shape and data_offsets")
        need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - start != need or start < 0 or min(shape, default=0) < 0:
            bad(f"tensor {name} ({info['dtype']} {shape}) needs {need:,} bytes, its header entry gives it "
                f"bytes {start:,}..{end:,}")
        if end > data:
            bad(f"tensor {name} lies at bytes {start:,}..{end:,} after the header, which the file holds only "
                f"{data:,} of")
    try:
        with safe_open(str(path), "pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:  # what the checks above do not cover, e.g. overlapping tensors
        bad(str(e))


def check_expressible(m: ModelConfig, any_mlp_width: bool = False) -> None:
    """Refuse a model that is not GPT-2's architecture. Untied embeddings convert (lm_head.weight), and
    with `any_mlp_width` another MLP width too (HF's n_inner; nanoGPT's MLP is 4 x n_embd)."""
    differs = [f"{k}: {getattr(m, k)}" for k, v in GPT2_ARCHITECTURE.items()
               if k != "tie_embeddings" and getattr(m, k) != v]
    differs += [f"{key}: {value}" for key, value, gpt2 in (
        ("n_kv_head", m.kv_heads, m.n_head), ("ffn_hidden_size", m.ffn_hidden, 4 * m.n_embd))
        if value != gpt2 and not (any_mlp_width and key == "ffn_hidden_size")]
    if differs:
        raise ConfigError("Hugging Face cannot express this model as GPT-2 (" + ", ".join(differs)
                          + ") nor as Llama (" + ", ".join(llama_differences(m)) + ")")


def to_hf(model, cfg: Config, out: str | Path, dtype: str = "float32",
          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> tuple[int, list[str]]:
    """Write config.json and the weights (in `dtype`, sharded above `max_shard_bytes`) for transformers'
    LlamaForCausalLM (RMSNorm, SwiGLU and rotary blocks) or GPT2LMHeadModel (GPT-2's architecture);
    refuse anything else in one line. Returns the number of weight files and the tokenizer files
    found there that no export wrote (or that were changed since), which are left as they are."""
    m = cfg.model
    out = Path(out)
    if is_llama(m):
        sd = to_llama_tensors({int(name): module.state_dict() for name, module in model.layers.items()}, m)
    else:
        check_expressible(m, any_mlp_width=True)
        sd = gpt2_tensors(model, m)
    if is_llama(m):
        config = llama_config_text(m, GPT2_EOT if reads_gpt2_bpe(m.vocab_size) else None, dtype)
    else:
        config = json.dumps(dict(gpt2_config(m), torch_dtype=dtype), indent=2) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, stale, kept = tokenizer_plan(out, out / EXPORT_MARKER,
                                            gpt2_tokenizer_files(m.seq_len) if reads_gpt2_bpe(m.vocab_size) else {})
    marker = {"written_by": "tools/convert.py --to-hf", RECORD_KEY: {k: file_hash(v) for k, v in tokenizer.items()}}
    # The marker goes in first: once any file of the export is swapped in, the directory is the export's.
    small_files = {EXPORT_MARKER: (json.dumps(marker, indent=2) + "\n").encode(), "config.json": config.encode(),
                   **tokenizer}
    files = write_weights(sd, out, EXPORT_DTYPES[dtype], max_shard_bytes, small_files)
    for name in stale:  # an earlier export's GPT-2 tokenizer would be read as this model's
        (out / name).unlink(missing_ok=True)
    return files, kept


def gpt2_tensors(model, m: ModelConfig, conv1d: bool = True) -> dict[str, torch.Tensor]:
    """gptx's GPT-2-architecture weights under Hugging Face's names (nanoGPT's too, which keeps
    nn.Linear's (out, in) layout: conv1d=False). Padding rows are not part of the format."""
    L, V = m.n_layer, m.vocab_size
    sd = {"transformer.wte.weight": model.layers["0"].wte.weight[:V],
          "transformer.wpe.weight": model.layers["1"].wpe.weight}
    for i in range(L):
        for name, t in model.layers[str(2 + i)].state_dict().items():
            sd[f"transformer.h.{i}.{name}"] = t.t() if conv1d and name in CONV1D else t
    for name, t in model.layers[str(2 + L)].state_dict().items():
        sd["transformer." + name] = t  # ln_f
    if not m.tie_embeddings:
        sd["lm_head.weight"] = model.layers[str(3 + L)].lm_head.weight[:V]
    return sd


def gpt2_config(m: ModelConfig) -> dict:
    gpt2_vocab = reads_gpt2_bpe(m.vocab_size)
    L = m.n_layer
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": m.vocab_size,
            "n_positions": m.seq_len, "n_ctx": m.seq_len, "n_embd": m.n_embd, "n_layer": L, "n_head": m.n_head,
            "n_inner": m.ffn_hidden if m.ffn_hidden != 4 * m.n_embd else None,  # null: HF's 4 x n_embd
            "activation_function": "gelu_new", "layer_norm_epsilon": m.norm_eps,
            "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout,
            "tie_word_embeddings": m.tie_embeddings, "bos_token_id": GPT2_EOT if gpt2_vocab else None,
            "eos_token_id": GPT2_EOT if gpt2_vocab else None, "torch_dtype": "float32"}


def check_shapes(layers: dict[int, dict[str, torch.Tensor]], m: ModelConfig, src: Path) -> None:
    """Refuse an import whose tensors do not fit the model its config.json describes (built on the
    meta device): caught here, not at the first --load."""
    with torch.device("meta"):
        model = GPT(m, seed=0)
    for name, module in model.layers.items():
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in layers.get(int(name), {}).items()}
        if int(name) not in layers and not expected:
            continue
        for key in sorted(set(expected) | set(got)):
            if expected.get(key) != got.get(key):
                raise CheckpointError(f"--from-hf '{src}': layer {name} {key}: config.json implies shape "
                                      f"{expected.get(key)}, the file has {got.get(key)}")


def _read_tensors(src: Path) -> dict[str, torch.Tensor]:
    if (src / "model.safetensors").exists():
        return read_safetensors(src / "model.safetensors")
    index_path = src / "model.safetensors.index.json"
    if index_path.exists():  # sharded, as large models are published
        index = _read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"--from-hf: '{index_path}' has no 'weight_map' of tensor names to shard files")
        sd = {}
        for shard in sorted(set(weight_map.values())):
            if not (src / shard).exists():
                raise CheckpointError(f"--from-hf: shard '{src / shard}' named by '{index_path}' is missing")
            sd.update(read_safetensors(src / shard))
        return sd
    if (src / "pytorch_model.bin").exists():
        try:
            sd = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # garbage or cut short: pickle, zip and torch errors alike (torch's own
            # message for garbage suggests weights_only=False, which would run the file's code)
            raise CheckpointError(f"--from-hf: '{src / 'pytorch_model.bin'}' cannot be read as PyTorch weights "
                                  f"({type(e).__name__}): damaged, cut short or not a weights file") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"--from-hf: '{src / 'pytorch_model.bin'}' is not a table of tensor names to "
                                  f"tensors (a training checkpoint that nests one?)")
        return sd
    raise CheckpointError(f"--from-hf '{src}': none of model.safetensors, model.safetensors.index.json, "
                          f"pytorch_model.bin")


def _read_json(path: Path) -> dict:
    """A JSON object from a Hugging Face directory's file, or one line naming it."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise CheckpointError(f"--from-hf: '{path}': cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"--from-hf: '{path}' is not valid JSON (line {e.lineno}: {e.msg})") from None
    except ValueError:  # bytes that are not text
        raise CheckpointError(f"--from-hf: '{path}' is not valid JSON (not UTF-8 text)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"--from-hf: '{path}' is not a JSON object")
    return data


def from_hf(src: str | Path) -> tuple[dict[int, dict[str, torch.Tensor]], Config, str]:
    """A local HF GPT-2 or Llama directory -> per-layer-position state dicts (fp32), the gptx Config and
    the precision its weights were stored in (fp32, bf16 or fp16)."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"--from-hf '{src}': not a directory (expected config.json and model.safetensors)")
    if (src / META).exists() or (src / "metrics.jsonl").exists() or checkpoint_folders(src):
        raise CheckpointError(f"--from-hf '{src}': a gptx run or checkpoint, not a Hugging Face directory; "
                              f"--load {src} --to-hf OUT converts it the other way")
    if not (src / "config.json").exists():
        raise CheckpointError(f"--from-hf '{src}': no config.json")
    hf = {k: v for k, v in _read_json(src / "config.json").items() if v is not None}  # null: HF's "not set"
    for key in INT_KEYS:  # a wrong type would fail deep in the conversion with a traceback
        value = hf.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise CheckpointError(f"--from-hf: '{src / 'config.json'}': {key} must be a positive integer, "
                                  f"got {value!r}")
    for key in BOOL_KEYS:  # bool("false") is True: a string would silently read as the opposite
        if not isinstance(hf.get(key, False), bool):
            raise CheckpointError(f"--from-hf: '{src / 'config.json'}': {key} must be true or false, "
                                  f"got {hf[key]!r}")
    if hf.get("model_type") not in ("gpt2", "llama"):
        raise CheckpointError(f"--from-hf '{src}': model_type is {hf.get('model_type')!r}, expected 'gpt2' or 'llama'")
    sd = _read_tensors(src)
    layers, cfg = (from_llama if hf["model_type"] == "llama" else from_gpt2)(src, hf, sd)
    _validate(cfg, src)
    check_shapes(layers, cfg.model, src)
    return layers, cfg, stored_precision(sd)


def stored_precision(sd: dict[str, torch.Tensor]) -> str:
    """fp32, bf16 or fp16: the one floating dtype of a model's weights (fp32 where they mix or are
    another, which keeps every value); older files' mask and rotary buffers do not count."""
    found = {t.dtype for k, t in sd.items()
             if t.is_floating_point() and not k.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))}
    return PRECISIONS.get(found.pop(), "fp32") if len(found) == 1 else "fp32"


def from_gpt2(src: Path, hf: dict, sd: dict[str, torch.Tensor]) -> tuple[dict[int, dict[str, torch.Tensor]], Config]:
    """A GPT-2 config.json and its tensors -> per-layer-position state dicts and the gptx Config."""
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"--from-hf '{src}': activation {hf['activation_function']} is not GPT-2's tanh GELU")
    for key, gpt2s in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if hf.get(key, gpt2s) != gpt2s:  # scores scaled otherwise than by 1/sqrt(head size): other logits
            raise CheckpointError(f"--from-hf '{src}': {key} is {hf[key]!r}; gptx's attention is GPT-2's "
                                  f"({key} {str(gpt2s).lower()})")
    sd = {k.removeprefix("transformer."): v.float() for k, v in sd.items()}
    tied = hf.get("tie_word_embeddings", True)
    try:
        # gptx has one dropout rate (the export writes it to all three); GPT-2's own files agree.
        rates = {float(hf.get(key, 0.1)) for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
        m = ModelConfig(vocab_size=hf["vocab_size"], seq_len=hf["n_positions"], n_layer=hf["n_layer"],
                        n_head=hf["n_head"], n_embd=hf["n_embd"], ffn_hidden_size=hf.get("n_inner"),
                        tie_embeddings=tied, norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), dropout=max(rates))
    except KeyError as e:
        raise CheckpointError(f"--from-hf: '{src / 'config.json'}' has no {e.args[0]}") from None
    except (TypeError, ValueError):
        raise CheckpointError(f"--from-hf: '{src / 'config.json'}': layer_norm_epsilon, resid_pdrop, embd_pdrop "
                              f"and attn_pdrop must be numbers") from None
    if len(rates) > 1:
        given = ", ".join(f"{hf.get(key, 0.1):g}" for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"))
        raise CheckpointError(f"--from-hf '{src}': resid_pdrop, embd_pdrop and attn_pdrop differ ({given}); gptx "
                              f"has one dropout rate: set them equal in config.json")
    L = m.n_layer
    try:
        layers = {0: {"wte.weight": sd["wte.weight"]}, 1: {"wpe.weight": sd["wpe.weight"]},
                  2 + L: {"ln_f.weight": sd["ln_f.weight"], "ln_f.bias": sd["ln_f.bias"]}}
        for i in range(L):
            prefix = f"h.{i}."
            block = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            for buffer in ("attn.bias", "attn.masked_bias"):  # causal-mask buffers of older files
                block.pop(buffer, None)
            layers[2 + i] = {k: (v.t().contiguous() if k in CONV1D else v) for k, v in block.items()}
        if not tied:
            layers[3 + L] = {"lm_head.weight": sd["lm_head.weight"]}
    except KeyError as e:
        raise CheckpointError(f"--from-hf '{src}': missing tensor {e.args[0]}") from None
    used = {f"h.{i}.{name}" for i in range(L) for name in layers[2 + i]} | {"wte.weight", "wpe.weight", "ln_f.weight",
                                                                             "ln_f.bias"}
    # A tied model's head is the embedding: older .bin saves repeat it under lm_head.weight; another one
    # would be dropped.
    if not tied or torch.equal(sd.get("lm_head.weight", sd["wte.weight"]), sd["wte.weight"]):
        used.add("lm_head.weight")
    unused = sorted(k for k in set(sd) - used if not k.endswith(("attn.bias", "attn.masked_bias")))
    if unused:  # e.g. layers past config.json's n_layer: dropping them would change the model
        raise CheckpointError(f"--from-hf '{src}': {len(unused)} tensor(s) config.json does not account for, first "
                              f"{unused[0]}")
    return layers, Config(model=m, train=TrainConfig(), name=f"hf:{src.name}")


def _validate(cfg: Config, src: Path) -> None:
    try:
        validate(cfg)
    except ConfigError as e:
        raise CheckpointError(f"--from-hf: '{src / 'config.json'}' gives a model gptx cannot build: {e}") from None
