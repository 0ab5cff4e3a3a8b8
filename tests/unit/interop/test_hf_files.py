"""tools/convert.py and the files around the weights: a user's tokenizer files, interrupted and failed
writes, flags and keys an import would misread, precision kept across a round trip."""
import errno
import json
import os

import pytest
import torch

import gptx.interop.hf
import gptx.training.consolidate
from gptx.cli.convert import run_convert
from gptx.config import Config, ModelConfig
from gptx.interop.hf import EXPORT_MARKER, read_safetensors
from gptx.model.gpt import GPT
from gptx.training.checkpoint_files import layer_file, write_manifest
from gptx.training.consolidate import load_plain_model, save_weights_only, trained_precision
from tests.helpers.runs import MICRO_MODEL, one_error_line

GPT2_VOCAB = dict(vocab_size=50257, seq_len=16, n_layer=1, n_head=2, n_embd=8)


def save_model(model, path):
    layers = {int(name): module.state_dict() for name, module in model.layers.items()}
    save_weights_only(layers, Config(model=model.cfg), path, source="test")


def export(tmp_path, keys=None, name="run", out="hf", *flags):
    save_model(GPT(ModelConfig(**(keys or MICRO_MODEL)), seed=1).eval(), tmp_path / name)
    return run_convert(["--load", str(tmp_path / name), "--to-hf", str(tmp_path / out), *flags])


def listing(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# ---- a re-export replaces or removes only the tokenizer files gptx wrote

def test_a_reexport_keeps_the_tokenizer_files_a_user_added(tmp_path, capsys):
    assert export(tmp_path) == 0
    hf = tmp_path / "hf"
    theirs = {"tokenizer_config.json": b'{"tokenizer_class": "PreTrainedTokenizerFast"}',
              "special_tokens_map.json": b'{"eos_token": "</s>"}', "tokenizer.json": b'{"model": {}}'}
    for name, data in theirs.items():  # as the export's message asks
        (hf / name).write_bytes(data)
    capsys.readouterr()
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(hf)]) == 0
    assert {name: (hf / name).read_bytes() for name in theirs} == theirs
    assert "kept tokenizer_config.json, special_tokens_map.json, which no export wrote" in capsys.readouterr().out


def test_a_reexport_keeps_an_edited_tokenizer_config_and_removes_only_its_own_files(tmp_path):
    assert export(tmp_path, GPT2_VOCAB) == 0
    hf = tmp_path / "hf"
    config = json.loads((hf / "tokenizer_config.json").read_text())
    edited = json.dumps({**config, "chat_template": "{{ messages }}"}).encode()
    (hf / "tokenizer_config.json").write_bytes(edited)
    vocab = (hf / "vocab.json").read_bytes()
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(hf)]) == 0
    assert (hf / "tokenizer_config.json").read_bytes() == edited and (hf / "vocab.json").read_bytes() == vocab
    # Another vocabulary into the same directory: GPT-2's files gptx wrote go, the user's stays.
    assert export(tmp_path, name="small", out="hf") == 0
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", EXPORT_MARKER, "model.safetensors",
                                                    "tokenizer_config.json"]
    assert (hf / "tokenizer_config.json").read_bytes() == edited


def test_a_hand_padded_gpt2_vocabulary_exports_gpt2s_tokenizer_and_warns_of_the_padding(tmp_path, capsys):
    assert export(tmp_path, dict(GPT2_VOCAB, vocab_size=50304)) == 0
    out = capsys.readouterr().out
    assert "with GPT-2's tokenizer files" in out
    assert [line for line in out.splitlines() if line.startswith("warning:")] == [
        "warning: rows 50257..50303 of the vocabulary are hand padding, no token; under Hugging Face they stay "
        "live logits that sampling can pick"]
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf_cfg["vocab_size"], hf_cfg["eos_token_id"]) == (50304, 50256)
    assert json.loads((tmp_path / "hf" / "vocab.json").read_text())["<|endoftext|>"] == 50256


# ---- interrupted and failed writes leave nothing that blocks the retry

def test_a_killed_export_leaves_nothing_that_blocks_the_retry(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in (EXPORT_MARKER + ".partial", "config.json.partial", "model.safetensors.partial", ".tmpAb12Cd"):
        (hf / name).write_bytes(b"half")  # what a SIGKILL mid-write leaves of a first export
    assert export(tmp_path) == 0
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", EXPORT_MARKER, "model.safetensors"]


def test_an_interrupted_export_removes_its_staged_files(tmp_path, monkeypatch):
    assert export(tmp_path) == 0
    hf = tmp_path / "hf"
    before = listing(hf)

    def interrupted(tensors, path, metadata=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(gptx.interop.hf, "save_file", interrupted)
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(hf), "--dtype", "bfloat16"]) == 130
    assert listing(hf) == before


@pytest.mark.parametrize("existed", [False, True])
def test_an_import_that_fills_the_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, existed):
    assert export(tmp_path) == 0
    back = tmp_path / "back"
    if existed:
        back.mkdir()
    real_write, calls = gptx.training.consolidate.atomic_write, []

    def fills_the_disk(path, data):  # the third file meets a full disk half-way
        calls.append(path)
        if len(calls) == 3:
            path.write_bytes(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(path, data)
    monkeypatch.setattr(gptx.training.consolidate, "atomic_write", fills_the_disk)
    capsys.readouterr()
    assert run_convert(["--from-hf", str(tmp_path / "hf"), "--save", str(back)]) == 2
    assert one_error_line(capsys) == (f"error: --save '{back}': could not write the checkpoint (No space left on "
                                      f"device); free space or choose another --save (nothing was kept)")
    assert (list(back.iterdir()) == []) if existed else not back.exists()
    monkeypatch.undo()
    assert run_convert(["--from-hf", str(tmp_path / "hf"), "--save", str(back)]) == 0


# ---- what an import refuses before anything is written

@pytest.mark.parametrize("save", [".", "run"])
def test_an_import_into_its_own_source_directory_is_refused(tmp_path, capsys, save):
    assert export(tmp_path) == 0
    hf = tmp_path / "hf"
    before = listing(hf)
    capsys.readouterr()
    assert run_convert(["--from-hf", str(hf), "--save", str(hf / save)]) == 2
    assert one_error_line(capsys) == (f"error: --save '{hf / save}' is inside the --from-hf directory '{hf}'; "
                                      f"choose a --save outside it (nothing was written)")
    assert listing(hf) == before


@pytest.mark.parametrize("flag", [["--dtype", "float16"], ["--master-weights"], ["--max-shard-size", "1GB"]])
def test_export_flags_given_to_an_import_are_refused(tmp_path, capsys, flag):
    assert export(tmp_path) == 0
    capsys.readouterr()
    assert run_convert(["--from-hf", str(tmp_path / "hf"), "--save", str(tmp_path / "back"), *flag]) == 2
    assert one_error_line(capsys).startswith(f"error: {flag[0]} applies to --to-hf exports only")
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize("llama,key,value", [(False, "tie_word_embeddings", "false"),
                                             (False, "scale_attn_weights", "true"),
                                             (True, "tie_word_embeddings", "false"),
                                             (True, "attention_bias", 0)])
def test_a_boolean_key_that_is_not_a_boolean_is_one_line(tmp_path, capsys, llama, key, value):
    keys = dict(MICRO_MODEL, norm="rmsnorm", mlp="swiglu", position_embedding="rotary", bias=False) if llama else None
    assert export(tmp_path, keys) == 0
    hf = tmp_path / "hf"
    (hf / "config.json").write_text(json.dumps({**json.loads((hf / "config.json").read_text()), key: value}))
    capsys.readouterr()
    assert run_convert(["--from-hf", str(hf), "--save", str(tmp_path / "back")]) == 2
    assert one_error_line(capsys) == (f"error: --from-hf: '{hf / 'config.json'}': {key} must be true or false, "
                                      f"got {value!r}")
    assert not (tmp_path / "back").exists()


def test_a_head_that_a_tied_config_leaves_out_is_refused_unless_it_is_the_embedding(tmp_path, capsys):
    from safetensors.torch import save_file
    assert export(tmp_path, dict(MICRO_MODEL, tie_embeddings=False)) == 0
    hf = tmp_path / "hf"
    (hf / "config.json").write_text(json.dumps({**json.loads((hf / "config.json").read_text()),
                                                "tie_word_embeddings": True}))
    capsys.readouterr()
    assert run_convert(["--from-hf", str(hf), "--save", str(tmp_path / "back")]) == 2
    assert one_error_line(capsys).endswith("1 tensor(s) config.json does not account for, first lm_head.weight")
    sd = read_safetensors(hf / "model.safetensors")  # older .bin saves repeat a tied head under its name
    save_file({**sd, "lm_head.weight": sd["transformer.wte.weight"].clone()}, str(hf / "model.safetensors"))
    assert run_convert(["--from-hf", str(hf), "--save", str(tmp_path / "back")]) == 0


# ---- the model comes back as it went

def test_a_gpt2_mlp_width_other_than_4x_round_trips_through_n_inner(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = GPT(ModelConfig(**MICRO_MODEL, ffn_hidden_size=64), seed=3).eval()
    save_model(model, tmp_path / "run")
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["n_inner"] == 64
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert torch.allclose(hf(idx).logits, model(idx), atol=1e-5)
    assert run_convert(["--from-hf", str(tmp_path / "hf"), "--save", str(tmp_path / "back")]) == 0
    back, cfg = load_plain_model(tmp_path / "back")
    assert cfg.model.ffn_hidden == 64
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_a_bf16_import_exports_as_bf16_again(tmp_path, capsys):
    assert export(tmp_path, None, "run", "hf", "--dtype", "bfloat16") == 0
    assert run_convert(["--from-hf", str(tmp_path / "hf"), "--save", str(tmp_path / "back")]) == 0
    assert trained_precision(tmp_path / "back") == "bf16"
    capsys.readouterr()
    assert run_convert(["--load", str(tmp_path / "back"), "--to-hf", str(tmp_path / "again")]) == 0
    assert "(bfloat16, " in capsys.readouterr().out
    first, again = (read_safetensors(tmp_path / d / "model.safetensors") for d in ("hf", "again"))
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, first[k]) for k, t in again.items())


def test_a_layer_file_that_is_not_a_table_of_tensors_is_one_line(tmp_path, capsys):
    save_model(GPT(ModelConfig(**MICRO_MODEL), seed=1), tmp_path / "run")
    folder = next((tmp_path / "run").glob("iter_*"))
    torch.save([1, 2], layer_file(folder, 2))
    write_manifest(folder)  # sizes that match: only the contents are wrong
    assert run_convert(["--load", str(tmp_path / "run"), "--to-hf", str(tmp_path / "hf")]) == 2
    assert one_error_line(capsys) == (f"error: checkpoint file '{layer_file(folder, 2)}' holds a list, not a table "
                                      f"of a layer's tensors; the file is not a gptx layer file: --load an earlier "
                                      f"checkpoint folder of the run")
