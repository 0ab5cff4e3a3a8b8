"""Hugging Face GPT-2 format: exact round trips, an independent reading of the exported tensors, imports."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from gptx.cli.convert import run_convert
from gptx.cli.pretrain import run_pretrain
from gptx.config import Config, ModelConfig
from gptx.data.tokens import TokenWindows, open_tokens
from gptx.interop.hf import EXPORT_MARKER, read_safetensors
from gptx.interop.hf_tokenizer import gpt2_tokenizer_files
from gptx.model.gpt import GPT
from gptx.training.consolidate import load_plain_model, save_weights_only
from tests.helpers.runs import (MICRO_MODEL, make_token_dir, precision_ds, read_metrics, write_ds_config,
                                write_model_yaml)

CFG = ModelConfig(**MICRO_MODEL)


def save_model(model, path):
    layers = {int(name): module.state_dict() for name, module in model.layers.items()}
    save_weights_only(layers, Config(model=model.cfg), path, source="test")


def gpt2_reference(sd: dict, hf: dict, idx: torch.Tensor) -> torch.Tensor:
    """GPT-2's forward written against Hugging Face's tensor names and Conv1D (x @ W + b) layout."""
    C, nh = hf["n_embd"], hf["n_head"]
    T = idx.size(1)
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(hf["n_layer"]):
        p = f"transformer.h.{i}."
        h = F.layer_norm(x, (C,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
        q, k, v = (h @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]).split(C, dim=-1)
        q, k, v = (t.view(1, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2) / math.sqrt(C // nh)).masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(1, T, C)
        x = x + y @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
        h = F.layer_norm(x, (C,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
        h = F.gelu(h @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"], approximate="tanh")
        x = x + h @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (C,), sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"], 1e-5)
    return x @ sd.get("lm_head.weight", sd["transformer.wte.weight"]).T


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_is_exact_and_the_export_reads_as_gpt2(tmp_path, tied):
    model = GPT(ModelConfig(**{**MICRO_MODEL, "tie_embeddings": tied}), seed=4).eval()
    save_model(model, tmp_path / "run")
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(tmp_path / "hf")]) == 0
    assert run_convert(["--from-hf", str(tmp_path / "hf"), "--save", str(tmp_path / "back")]) == 0
    back, _ = load_plain_model(tmp_path / "back")
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    idx = torch.randint(0, 256, (1, 32))
    with torch.no_grad():
        assert torch.equal(model(idx), back.eval()(idx))
        hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
        reference = gpt2_reference(read_safetensors(tmp_path / "hf" / "model.safetensors"), hf_cfg, idx)
        assert torch.allclose(reference, model(idx), atol=1e-5)
    assert hf_cfg["tie_word_embeddings"] is tied and hf_cfg["activation_function"] == "gelu_new"


def test_pytorch_model_bin_with_mask_buffers_imports(tmp_path):
    model = GPT(CFG, seed=1).eval()
    save_model(model, tmp_path / "run")
    run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(tmp_path / "hf")])
    sd = read_safetensors(tmp_path / "hf" / "model.safetensors")
    sd["transformer.h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()  # as older GPT-2 files carry
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(sd, tmp_path / "hf" / "pytorch_model.bin")
    assert run_convert(["--from-hf", str(tmp_path / "hf"), "--save", str(tmp_path / "back")]) == 0
    back, _ = load_plain_model(tmp_path / "back")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_a_gpt2_import_keeps_the_dropout_and_refuses_layers_its_config_leaves_out(tmp_path, capsys):
    model = GPT(ModelConfig(**{**MICRO_MODEL, "dropout": 0.2}), seed=1)
    save_model(model, tmp_path / "run")
    run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(tmp_path / "hf")])
    assert run_convert(["--from-hf", str(tmp_path / "hf"), "--save", str(tmp_path / "back")]) == 0
    assert load_plain_model(tmp_path / "back")[1].model.dropout == 0.2
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    for edit, needle in (({"n_layer": 1}, "tensor(s) config.json does not account for, first h.1."),
                         ({"attn_pdrop": 0.0}, "resid_pdrop, embd_pdrop and attn_pdrop differ (0.2, 0.2, 0)")):
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf_cfg, **edit}))
        assert run_convert(["--from-hf", str(tmp_path / "hf"), "--save", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "bad").exists()


def test_variants_gpt2_cannot_express_are_refused(tmp_path, capsys):
    save_model(GPT(ModelConfig(**{**MICRO_MODEL, "position_embedding": "alibi"}), seed=0), tmp_path / "run")
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "cannot express this model as GPT-2 (position_embedding: alibi) nor as Llama (norm: layernorm" in err
    assert len(err.strip().splitlines()) == 1


def test_training_continues_from_imported_weights(dist_world1, tmp_path):
    model = GPT(CFG, seed=9).eval()
    save_model(model, tmp_path / "hf_run")
    data = make_token_dir(tmp_path / "data")
    ds = write_ds_config(tmp_path / "ds.json", micro=2, accum=2)
    yaml = write_model_yaml(tmp_path / "model.yaml")
    assert run_pretrain(["--model", str(yaml), "--data", str(data), "--deepspeed_config", str(ds),
                         "--load", str(tmp_path / "hf_run"), "--save", str(tmp_path / "cont"),
                         "--pipe-parallel-size", "1", "--train-iters", "2", "--eval-interval", "0"]) == 0
    first = [r for r in read_metrics(tmp_path / "cont") if "loss" in r][0]
    windows = TokenWindows(open_tokens(data, "train"), 32, 2, seed=1234)
    with torch.no_grad():  # the first loss is the imported weights' loss on the first batch
        expected = sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                       for x, y in (next(windows) for _ in range(2))) / 2
    assert first["loss"] == pytest.approx(expected, abs=1e-5)


def test_padded_vocabulary_exports_only_the_real_rows(tmp_path):
    model = GPT(ModelConfig(**{**MICRO_MODEL, "vocab_size": 250, "pad_vocab_to_multiple": 64}), seed=4).eval()
    save_model(model, tmp_path / "run")
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(tmp_path / "hf")]) == 0
    sd = read_safetensors(tmp_path / "hf" / "model.safetensors")
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert sd["transformer.wte.weight"].shape == (250, 32) and hf_cfg["vocab_size"] == 250
    idx = torch.randint(0, 250, (1, 32))
    with torch.no_grad():
        assert torch.allclose(gpt2_reference(sd, hf_cfg, idx), model(idx)[..., :250], atol=1e-5)


def gpt2_bpe_reference(vocab: dict, merges: list[str], text: str) -> list[int]:
    """GPT-2's original tokenizer algorithm over vocab.json and merges.txt: split by its
    pattern, spell each piece's UTF-8 bytes in the byte alphabet, merge by merges.txt rank."""
    import regex
    alphabet = {}
    for b in range(256):  # the alphabet as GPT-2's encoder.py defines it
        printable = 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255
        alphabet[b] = chr(b) if printable else chr(256 + sum(
            1 for c in range(b) if not (33 <= c <= 126 or 161 <= c <= 172 or 174 <= c <= 255)))
    rank = {tuple(line.split(" ")): i for i, line in enumerate(merges)}
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    ids = []
    for piece in regex.findall(pattern, text):
        word = [alphabet[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [(rank.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            best, i = min(pairs)
            if best == math.inf:
                break
            word[i:i + 2] = [word[i] + word[i + 1]]
        ids += [vocab[w] for w in word]
    return ids


def test_a_gpt2_vocabulary_export_carries_gpt2s_tokenizer(tmp_path, capsys):
    from gptx.data.tokens import gpt2_encoding
    model = GPT(ModelConfig(vocab_size=50257, seq_len=16, n_layer=1, n_head=2, n_embd=8), seed=1)
    save_model(model, tmp_path / "run")
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(tmp_path / "hf")]) == 0
    assert "with GPT-2's tokenizer files" in capsys.readouterr().out
    out = tmp_path / "hf"
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    merges = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 50000 and len(vocab) == 50257
    assert vocab["<|endoftext|>"] == 50256 == json.loads((out / "config.json").read_text())["eos_token_id"]
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 16
    text = ("Hello world! It's a test: tabs\tand  double spaces,\n\nnew lines, 12345 numbers, "
            "naïve café — “quotes” and 日本語 and emoji 🙂.")
    assert gpt2_bpe_reference(vocab, merges[1:], text) == gpt2_encoding().encode_ordinary(text)


def test_the_export_loads_in_transformers_with_no_download(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gptx.data.tokens import gpt2_encoding
    model = GPT(ModelConfig(vocab_size=50257, seq_len=16, n_layer=1, n_head=2, n_embd=8), seed=1).eval()
    save_model(model, tmp_path / "run")
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(tmp_path / "hf")]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    text = "The quick brown fox, naïve café."
    assert tokenizer(text)["input_ids"] == gpt2_encoding().encode_ordinary(text)
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    out = pipe("The quick", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert out.startswith("The quick") and len(out) > len("The quick")


def test_another_vocabulary_exports_without_tokenizer_files(tmp_path, capsys):
    save_model(GPT(CFG, seed=1), tmp_path / "run")
    (tmp_path / "hf").mkdir()
    # An earlier export's GPT-2 tokenizer, into the same folder, by a gptx whose marker recorded no hashes.
    (tmp_path / "hf" / "vocab.json").write_bytes(gpt2_tokenizer_files(16)["vocab.json"])
    (tmp_path / "hf" / EXPORT_MARKER).write_text("{}")
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(tmp_path / "hf")]) == 0
    assert "without tokenizer files (its 256-token vocabulary is not GPT-2's" in capsys.readouterr().out
    assert not (tmp_path / "hf" / "vocab.json").exists()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] is None


LLAMA = dict(MICRO_MODEL, n_head=4, norm="rmsnorm", mlp="swiglu", position_embedding="rotary", bias=False,
             ffn_multiple_of=16, norm_eps=1e-6, rope_theta=500000.0)


def llama_model(seed=4, **keys):
    model = GPT(ModelConfig(**{**LLAMA, **keys}), seed=seed).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: move them so that a swapped one would show
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("keys", [dict(n_kv_head=2, tie_embeddings=False), dict(n_kv_head=1),
                                  dict(n_kv_head=4, bias=True, vocab_size=250, pad_vocab_to_multiple=64)])
def test_llama_round_trip_is_exact(tmp_path, keys):
    model = llama_model(**keys)
    save_model(model, tmp_path / "run")
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(tmp_path / "hf")]) == 0
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf_cfg["model_type"], hf_cfg["num_key_value_heads"], hf_cfg["intermediate_size"]) == (
        "llama", model.cfg.kv_heads, 96)
    assert run_convert(["--from-hf", str(tmp_path / "hf"), "--save", str(tmp_path / "back")]) == 0
    back, back_cfg = load_plain_model(tmp_path / "back")
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a[:model.cfg.vocab_size], b[:model.cfg.vocab_size]), name
    idx = torch.randint(0, model.cfg.vocab_size, (2, 32))
    with torch.no_grad():
        assert torch.equal(model(idx)[..., :model.cfg.vocab_size], back.eval()(idx))
    m = back_cfg.model
    assert (m.kv_heads, m.ffn_hidden, m.rope_theta, m.norm_eps, m.bias, m.tie_embeddings) == (
        model.cfg.kv_heads, 96, 500000.0, 1e-6, model.cfg.bias, model.cfg.tie_embeddings)


@pytest.mark.parametrize("keys", [dict(n_kv_head=2, tie_embeddings=False), dict(n_kv_head=1), dict(bias=True)])
def test_llama_export_loads_in_transformers_with_the_same_logits(tmp_path, keys):
    transformers = pytest.importorskip("transformers")
    model = llama_model(**keys)
    save_model(model, tmp_path / "run")
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(tmp_path / "hf")]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.num_parameters() == sum(p.numel() for p in model.parameters())
    idx = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert torch.allclose(hf(idx).logits, model(idx), atol=1e-5)


def test_llama_import_refuses_rope_scaling_in_one_line(tmp_path, capsys):
    save_model(llama_model(), tmp_path / "run")
    run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(tmp_path / "hf")])
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf_cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_cfg))
    assert run_convert(["--from-hf", str(tmp_path / "hf"), "--save", str(tmp_path / "back")]) == 2
    err = capsys.readouterr().err
    assert "rope scaling" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "back").exists()


def test_an_imported_llama_resumes_under_a_config_that_leaves_widths_at_their_defaults(tmp_path):
    from gptx.config import load_config
    from gptx.errors import CheckpointError
    from gptx.training.resume import check_compatible
    model = llama_model(n_kv_head=2, ffn_multiple_of=256, tie_embeddings=False)  # width 256: the default rounding
    save_model(model, tmp_path / "run")
    run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(tmp_path / "hf")])
    run_convert(["--from-hf", str(tmp_path / "hf"), "--save", str(tmp_path / "back")])
    meta = json.loads(next((tmp_path / "back").glob("iter_*/gptx.json")).read_text())
    keys = {k: v for k, v in LLAMA.items() if k != "ffn_multiple_of"}
    check_compatible(meta, load_config(None, dict(keys, n_kv_head=2, tie_embeddings=False)), 1, "back")
    with pytest.raises(CheckpointError, match="n_kv_head 2 \\(checkpoint\\) vs 1 \\(now\\)"):
        check_compatible(meta, load_config(None, dict(keys, n_kv_head=1, tie_embeddings=False)), 1, "back")


def test_a_checkpoint_with_a_key_this_version_lacks_compares_on_the_keys_it_knows():
    from gptx.config import load_config
    from gptx.errors import CheckpointError
    from gptx.training.resume import check_compatible
    cfg = load_config("tiny")
    meta = {"config": {"model": {**cfg.to_dict()["model"], "qk_norm": False}}}  # written by a later gptx
    check_compatible(meta, cfg, 2, "later")
    meta["config"]["model"]["n_layer"] = 5
    with pytest.raises(CheckpointError, match=r"^checkpoint 'later' is of another model: n_layer 5 \(checkpoint\) vs 4"):
        check_compatible(meta, cfg, 2, "later")


@pytest.mark.parametrize("edit,needle", [
    (lambda cfg, sd: cfg.update(num_key_value_heads=4), "config.json implies shape"),
    (lambda cfg, sd: cfg.update(intermediate_size=64), "config.json implies shape"),
    (lambda cfg, sd: sd.update({"model.layers.0.self_attn.q_proj.bias": torch.ones(32)}),
     "1 tensor(s) this config.json does not account for, first model.layers.0.self_attn.q_proj.bias"),
    (lambda cfg, sd: sd.pop("model.norm.weight"), "missing tensor model.norm.weight"),
])
def test_a_llama_import_that_does_not_fit_its_config_is_refused_in_one_line(tmp_path, capsys, edit, needle):
    from safetensors.torch import save_file
    save_model(llama_model(n_kv_head=2), tmp_path / "run")
    run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(tmp_path / "hf")])
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    sd = read_safetensors(tmp_path / "hf" / "model.safetensors")
    edit(hf_cfg, sd)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_cfg))
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"))
    assert run_convert(["--from-hf", str(tmp_path / "hf"), "--save", str(tmp_path / "back")]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "back").exists()


# ---- corrupt foreign files are one line naming them (issue 26 item 7)

def _exported(tmp_path):
    save_model(GPT(CFG, seed=2), tmp_path / "run")
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(tmp_path / "hf")]) == 0
    return tmp_path / "hf"


def _edit_config(hf, **changes):
    (hf / "config.json").write_text(json.dumps({**json.loads((hf / "config.json").read_text()), **changes}))


def _cut(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("damage,needle", [
    (lambda hf: (hf / "model.safetensors").write_bytes(bytes(range(256)) * 8),
     "model.safetensors': a header of"),
    (lambda hf: _cut(hf / "model.safetensors", (hf / "model.safetensors").stat().st_size - 100),
     "which the file holds only"),
    (lambda hf: _cut(hf / "model.safetensors", 5), "5 bytes, shorter than its 8-byte header length"),
    (lambda hf: (hf / "model.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:"
                                                       b"00\nsize 1234\n"), "a Git LFS pointer, not the weights"),
    (lambda hf: (hf / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{\"a\": [1, 2]}   "),
     "tensor a: expected dtype, shape and data_offsets"),
    (lambda hf: (hf / "config.json").write_text("{\"model_type\": \"gpt2\",,}"),
     "config.json' is not valid JSON (line 1: Expecting property name"),
    (lambda hf: (hf / "config.json").write_bytes(b"\xff\xfe\0garbage"), "config.json' is not valid JSON"),
    (lambda hf: (hf / "config.json").write_text("[]"), "config.json' is not a JSON object"),
    (lambda hf: (hf / "config.json").write_text(json.dumps({**json.loads((hf / "config.json").read_text()),
                                                            "n_layer": "two"})),
     "n_layer must be a positive integer, got 'two'"),
    (lambda hf: (hf / "config.json").write_text(json.dumps({"model_type": "gpt2"})), "config.json' has no"),
    (lambda hf: _edit_config(hf, n_layer=None), "config.json' has no n_layer"),
    (lambda hf: _edit_config(hf, layer_norm_epsilon=-1.0), "model.norm_eps: must be in (0, 1), got -1.0"),
    # Attention scores scaled otherwise than GPT-2's: transformers takes these, gptx's logits would differ.
    (lambda hf: _edit_config(hf, scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx is True"),
    (lambda hf: _edit_config(hf, scale_attn_weights=False), "scale_attn_weights is False"),
    (lambda hf: (hf / "model.safetensors").write_bytes(
        b"\x40\0\0\0\0\0\0\0" + b'{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}'.ljust(64)
        + bytes(4)), "tensor a: expected dtype, shape and data_offsets"),
    (lambda hf: ((hf / "model.safetensors").unlink(),
                 torch.save({"state_dict": {"w": torch.zeros(1)}}, hf / "pytorch_model.bin")),
     "pytorch_model.bin' is not a table of tensor names to tensors"),
    (lambda hf: (hf / "config.json").write_text(json.dumps({"model_type": "llama"})),
     "config.json has no hidden_size"),
    (lambda hf: ((hf / "model.safetensors").unlink(), (hf / "pytorch_model.bin").write_bytes(b"PK\x03\x04junk" * 9)),
     "pytorch_model.bin' cannot be read as PyTorch weights"),
    (lambda hf: ((hf / "model.safetensors").unlink(), (hf / "model.safetensors.index.json").write_text("{")),
     "model.safetensors.index.json' is not valid JSON"),
    (lambda hf: ((hf / "model.safetensors").rename(hf / "model-00001-of-00002.safetensors"),
                 (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
                     "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))),
     "model-00002-of-00002.safetensors' named by"),
])
def test_a_corrupt_hugging_face_directory_is_one_line_naming_the_file(tmp_path, capsys, damage, needle):
    hf = _exported(tmp_path)
    capsys.readouterr()
    damage(hf)
    assert run_convert(["--from-hf", str(hf), "--save", str(tmp_path / "back")]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert str(hf) in err
    assert not (tmp_path / "back").exists()


def test_a_safetensors_file_with_integer_buffers_reads(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.ones(2, 3)}, str(tmp_path / "a.safetensors"))
    raw = (tmp_path / "a.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["ids"] = {"dtype": "I64", "shape": [3], "data_offsets": [24, 48]}  # as position_ids buffers are stored
    head = json.dumps(header).encode()
    (tmp_path / "b.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + raw[8 + n:]
                                             + torch.arange(3).numpy().tobytes())
    sd = read_safetensors(tmp_path / "b.safetensors")
    assert torch.equal(sd["ids"], torch.arange(3)) and torch.equal(sd["w"], torch.ones(2, 3))


@pytest.mark.parametrize("which", ["model", "deepspeed", "mixture"])
def test_a_binary_file_given_as_a_yaml_or_json_config_is_one_line(tmp_path, which):
    from gptx.config import load_config
    from gptx.data.mixture import read_mixture
    from gptx.errors import GptxError
    from gptx.parallel.ds_config import read_ds_config
    bad = tmp_path / "conf.yaml"
    bad.write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe\x00\x00")
    read = {"model": lambda: load_config(str(bad)), "deepspeed": lambda: read_ds_config(bad),
            "mixture": lambda: read_mixture(bad)}[which]
    with pytest.raises(GptxError, match=r"conf.yaml': not UTF-8 text \(byte offset 8\)"):
        read()


def test_a_bf16_checkpoint_exports_as_bf16_shards_that_transformers_loads_with_the_same_logits(dist_world1, tmp_path,
                                                                                              capsys):
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open
    data = make_token_dir(tmp_path / "data")
    ds = tmp_path / "bf16.json"
    ds.write_text(json.dumps(precision_ds("bf16")))
    yaml = write_model_yaml(tmp_path / "model.yaml")
    run = tmp_path / "run"
    assert run_pretrain(["--model", str(yaml), "--data", str(data), "--deepspeed_config", str(ds), "--save", str(run),
                         "--pipe-parallel-size", "1", "--train-iters", "2", "--eval-interval", "0"]) == 0
    out = tmp_path / "hf"
    capsys.readouterr()
    assert run_convert(["--load", str(run), "--to-hf", str(out), "--max-shard-size", "40KB"]) == 0
    assert "(bfloat16, " in capsys.readouterr().out  # the run's precision, not fp32
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    total = 0
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        assert all(t.dtype == torch.bfloat16 for t in tensors.values())
        sizes = [t.numel() * 2 for t in tensors.values()]
        assert sum(sizes) <= 40_000 or len(sizes) == 1, shard.name  # a tensor over the limit gets a shard alone
        assert all(index["weight_map"][k] == shard.name for k in tensors)
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"

    model, _ = load_plain_model(run)  # the bf16 weights, widened: exactly what the shards hold
    hf = transformers.GPT2LMHeadModel.from_pretrained(out, torch_dtype=torch.float32).eval()
    idx = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert torch.allclose(hf(idx).logits, model.eval()(idx), atol=1e-5)
    # The shards read back exactly, and --dtype float32 gives one file again (the shards of before removed).
    assert run_convert(["--from-hf", str(out), "--save", str(tmp_path / "back")]) == 0
    back, _ = load_plain_model(tmp_path / "back")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    assert run_convert(["--load", str(run), "--to-hf", str(out), "--dtype", "float32"]) == 0
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_an_export_into_a_directory_of_other_files_is_refused_and_leaves_them(tmp_path, capsys):
    save_model(GPT(CFG, seed=1), tmp_path / "run")
    theirs = tmp_path / "downloaded"  # e.g. the Hugging Face model the run was imported from
    theirs.mkdir()
    (theirs / "config.json").write_text('{"model_type": "gpt2"}')
    (theirs / "model.safetensors").write_bytes(b"weights")
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(theirs)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --to-hf '{theirs}' holds files no gptx export wrote "
                                               f"(config.json and 1 more); choose a new or empty directory "
                                               f"(nothing was written)")
    assert (theirs / "model.safetensors").read_bytes() == b"weights"
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(tmp_path / "ours")]) == 0
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(tmp_path / "ours")]) == 0  # its own again


def test_a_gptx_run_given_as_from_hf_is_one_line_pointing_the_other_way(tmp_path, capsys):
    save_model(GPT(CFG, seed=1), tmp_path / "run")  # has a config.json of its own, with no model_type
    assert run_convert(["--from-hf", str(tmp_path / "run"), "--save", str(tmp_path / "back")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --from-hf '{tmp_path / 'run'}': a gptx run or checkpoint, not "
                                               f"a Hugging Face directory; --load {tmp_path / 'run'} --to-hf OUT "
                                               f"converts it the other way")


def test_a_float16_export_of_weights_beyond_its_range_is_one_line_and_writes_nothing(tmp_path, capsys):
    model = GPT(CFG, seed=1)
    with torch.no_grad():
        model.layers["2"].mlp.c_fc.weight[0, 0] = 1e5  # fits bf16 and fp32, not fp16: inf in the export
    save_model(model, tmp_path / "run")
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(tmp_path / "hf"), "--dtype", "float16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --to-hf '{tmp_path / 'hf'}': transformer.h.0.mlp.c_fc.weight holds 100000, beyond "
                   f"float16's range (65504); export with --dtype bfloat16 or float32"]
    assert not list((tmp_path / "hf").glob("*.safetensors"))


@pytest.mark.parametrize("size", ["0", "lots", "5TB", "inf", "nan"])
def test_a_bad_shard_size_is_one_line(tmp_path, capsys, size):
    assert run_convert(["--load", str(tmp_path), "--to-hf", str(tmp_path / "hf"), "--max-shard-size", size]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: argument --max-shard-size: '{size}': give a size such as 500MB, 2GiB or a byte count "
                   "(see tools/convert.py --help)"]


def test_an_export_that_cannot_be_written_is_one_line_and_keeps_the_previous_export(tmp_path, capsys, monkeypatch):
    import errno

    import gptx.interop.hf
    save_model(GPT(CFG, seed=3), tmp_path / "run")
    out = tmp_path / "hf"
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save, calls = gptx.interop.hf.save_file, []

    def fills_the_disk(tensors, path, metadata=None):  # the second shard meets a full disk mid-write
        calls.append(path)
        real_save(tensors, path, metadata=metadata)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(gptx.interop.hf, "save_file", fills_the_disk)
    capsys.readouterr()
    # In bf16, whose config.json says so: the config must not change without the weights either.
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(out), "--max-shard-size", "40KB",
                        "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not write the export (No space left on device)" in err[0], err
    assert len(calls) == 2 and {p.name: p.read_bytes() for p in out.iterdir()} == before  # no shard, index or partial
    assert '"torch_dtype": "float32"' in before["config.json"].decode()


def test_a_config_that_cannot_be_written_leaves_the_previous_export_whole(tmp_path, capsys, monkeypatch):
    """config.json and the tokenizer files are staged and swapped in with the weights: a disk that fills
    at config.json leaves the old weights with the old config, not new weights with an old config."""
    import errno
    import pathlib

    save_model(GPT(CFG, seed=3), tmp_path / "run")
    out = tmp_path / "hf"
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_write_bytes, real_write_text = pathlib.Path.write_bytes, pathlib.Path.write_text

    def full_at_config(write):
        def attempt(path, data, *args, **kwargs):
            if path.name.startswith("config.json"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write(path, data, *args, **kwargs)
        return attempt
    monkeypatch.setattr(pathlib.Path, "write_bytes", full_at_config(real_write_bytes))
    monkeypatch.setattr(pathlib.Path, "write_text", full_at_config(real_write_text))
    capsys.readouterr()
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(out), "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not write the export (No space left on device)" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
