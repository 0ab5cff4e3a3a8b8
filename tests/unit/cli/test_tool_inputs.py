"""Bad input and damaged files met by the tools that read a run (sample, evaluate, convert) and by
the data commands: one line on stderr, exit code 2, and nothing already saved written over."""
import json
import os
import shutil
import sys

import pytest
import torch

from gptx.cli.convert import run_convert
from gptx.cli.prepare_data import run_prepare_data
from gptx.cli.pretrain import run_pretrain
from gptx.cli.sample import run_sample
from gptx.errors import CheckpointError, ConfigError, DataError
from gptx.interop.evaluate import load_eval_tokens
from gptx.model.gpt import layer_specs
from gptx.parallel.pipeline import layer_compute_weights, partition
from gptx.training.checkpoint_files import read_torch_file, write_manifest
from tests.helpers.runs import mount_tmpfs, one_error_line, pretrain_args, run_files, unmount


@pytest.fixture(scope="module")
def run(dist_world1, tmp_path_factory):
    work = run_files(tmp_path_factory.mktemp("tool_inputs"))
    run = work[0] / "run"
    assert run_pretrain(pretrain_args(*work[1:], run, 1, 2, "--eval-interval", "0")) == 0
    return run


def copy_of(run, tmp_path):
    """A copy of the run to damage; the original stays for the other tests."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    return copy, copy / (copy / "latest").read_text().strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_a_device_the_machine_lacks_is_one_line(run, capsys):
    for device, needle in (("cuda", "this machine has no CUDA GPU"), ("tpu", "not a device torch knows"),
                           ("mps", "gptx's tools run on cpu, cuda or cuda:N"), ("meta", "gptx's tools run on cpu")):
        assert run_sample(["--load", str(run), "--prompt-ids", "1", "--device", device]) == 2
        assert f"--device '{device}': {needle}" in one_error_line(capsys)


def test_output_that_cannot_be_written_is_one_line_or_nothing(run, capsys, monkeypatch):
    # > /dev/full: before, an OSError traceback at the last print (or at exit).
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        assert run_sample(["--load", str(run), "--prompt-ids", "1", "--max-new-tokens", "2"]) == 2
        monkeypatch.undo()
    assert one_error_line(capsys) == ("error: writing the output failed (No space left on device); free space or "
                                      "write it elsewhere")
    # | head: the reader went away; before, a BrokenPipeError traceback and exit code 1.
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "w") as pipe:
        monkeypatch.setattr(sys, "stdout", pipe)
        assert run_sample(["--load", str(run), "--prompt-ids", "1", "--max-new-tokens", "2"]) == 0
        monkeypatch.undo()
    assert capsys.readouterr().err == ""


def test_ids_of_a_hand_padded_gpt2_table_and_of_damaged_gpt2_data_are_one_line(tmp_path, capsys):
    import numpy as np

    from gptx.config import Config, ModelConfig, TrainConfig
    from gptx.model.gpt import GPT
    from gptx.training.consolidate import save_weights_only
    m = ModelConfig(vocab_size=50304, seq_len=16, n_layer=1, n_head=2, n_embd=16)  # nanoGPT's padded table
    model = GPT(m)
    save_weights_only({int(k): layer.state_dict() for k, layer in model.layers.items()},
                      Config(model=m, train=TrainConfig()), tmp_path / "padded", source="test")
    # Before: accepted, then a KeyError traceback from the tokenizer's decode.
    assert run_sample(["--load", str(tmp_path / "padded"), "--prompt-ids", "50300", "--max-new-tokens", "1"]) == 2
    assert "--prompt-ids: 50300 is outside the vocabulary (0..50256)" in one_error_line(capsys)
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"vocab_size": 50257, "dtype": "uint16", "tokenizer": "gpt2"}))
    np.array([464, 2068, 50300, 13], dtype=np.uint16).tofile(data / "val.bin")
    with pytest.raises(DataError, match="token id 50300 is not a GPT-2 token"):
        load_eval_tokens(data, 50304)


def test_empty_prompt_ids_are_one_line(run, capsys):
    assert run_sample(["--load", str(run), "--prompt-ids", ","]) == 2
    assert "expected one or more comma-separated integers" in one_error_line(capsys)


def test_a_checkpoint_folder_the_manifest_says_is_incomplete_is_refused_by_the_tools(run, tmp_path, capsys):
    copy, folder = copy_of(run, tmp_path)
    layer = folder / "layer_02-model_states.pt"
    layer.write_bytes(layer.read_bytes()[:100])  # a copy that stopped halfway
    assert run_sample(["--load", str(folder), "--prompt-ids", "1"]) == 2
    assert "an incomplete checkpoint (layer_02-model_states.pt has 100 bytes" in one_error_line(capsys)
    (folder / "gptx.json").unlink()  # it said "no checkpoint folders (iter_*) to resume from"
    for command in (lambda: run_sample(["--load", str(folder), "--prompt-ids", "1"]),
                    lambda: run_pretrain(pretrain_args(*run_files_of(run), copy, 1, 3, "--load", str(folder)))):
        assert command() == 2
        assert f"--load '{folder}': an incomplete checkpoint (gptx.json is missing)" in one_error_line(capsys)


def test_a_damaged_file_of_the_right_size_is_one_line(run, tmp_path, capsys, dist_world1):
    copy, folder = copy_of(run, tmp_path)
    for name in ("layer_02-model_states.pt", "mp_rank_00_model_states.pt"):
        file = folder / name
        data = file.read_bytes()  # its zip directory at the end overwritten: the manifest's size still matches
        file.write_bytes(data[:-100] + bytes(100))
    assert run_sample(["--load", str(copy), "--prompt-ids", "1"]) == 2
    assert "layer_02-model_states.pt': a file cannot be read" in one_error_line(capsys)
    saved = lambda: {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    before = saved()
    damaged = ("layer_02-model_states.pt", "mp_rank_00_model_states.pt")
    for name in damaged:  # DeepSpeed's reader of a layer file raised an OSError (a traceback)
        assert run_pretrain(pretrain_args(*run_files_of(run), copy, 1, 3, "--load", str(copy),
                                         "--override-lr-schedule")) == 2
        assert f"{name}': a file cannot be read" in one_error_line(capsys)
        (folder / name).write_bytes((run / folder.name / name).read_bytes())
    # Checkpoints, metrics and the run's config.json as they were (written once the checkpoint has loaded).
    restored = {folder / name: (folder / name).read_bytes() for name in damaged}
    assert saved() == {**before, **restored}
    empty = folder / "rng_rank_00000.pt"  # an empty file: torch's EOFError says nothing
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"rng_rank_00000.pt': a file cannot be read \(not a torch archive"):
        read_torch_file(empty)


def test_a_flipped_bit_inside_a_tensor_is_one_line_not_a_run_on_damaged_weights(run, tmp_path, capsys, dist_world1):
    """torch.load does not check the CRC-32s torch.save writes: the damaged weights loaded, trained
    on, and the run's retention then deleted the last good checkpoint."""
    copy, folder = copy_of(run, tmp_path)
    file = folder / "layer_02-model_states.pt"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x10  # in the middle: tensor bytes, not the zip's structure
    file.write_bytes(bytes(data))
    for command in (lambda: run_sample(["--load", str(copy), "--prompt-ids", "1"]),
                    lambda: run_pretrain(pretrain_args(*run_files_of(run), copy, 1, 3, "--load", str(copy),
                                                       "--override-lr-schedule")),
                    # another layout: the layer files are read per parameter, not by DeepSpeed
                    lambda: run_pretrain(pretrain_args(*run_files_of(run), copy, 0, 3, "--load", str(copy),
                                                       "--override-lr-schedule"))):
        assert command() == 2
        line = one_error_line(capsys)
        assert "layer_02-model_states.pt': a file cannot be read (its record" in line and "CRC-32" in line, line


def run_files_of(run):
    """The data and model of the module's run, and its DeepSpeed JSON (pretrain_args' order)."""
    return run.parent / "data", run.parent / "model.yaml", run.parent / "ds.json"


def test_the_tools_read_a_checkpoint_of_a_later_gptx_and_name_its_bad_values(run, tmp_path, capsys):
    copy, folder = copy_of(run, tmp_path)
    meta = json.loads((folder / "gptx.json").read_text())
    meta["config"]["model"]["a_later_key"] = 1  # written by a later gptx: left out, as --load does
    (folder / "gptx.json").write_text(json.dumps(meta))
    write_manifest(folder)
    assert run_sample(["--load", str(copy), "--prompt-ids", "1", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    meta["config"]["model"]["n_layer"] = "2"
    (folder / "gptx.json").write_text(json.dumps(meta))
    write_manifest(folder)
    assert run_sample(["--load", str(copy), "--prompt-ids", "1"]) == 2
    assert "gptx.json: model.n_layer" in one_error_line(capsys)


def test_convert_to_hf_does_not_write_into_a_run_or_over_a_file(run, tmp_path, capsys):
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert run_convert(["--load", str(run), "--to-hf", str(run)]) == 2
    assert "holds a gptx run or checkpoint" in one_error_line(capsys)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert run_convert(["--load", str(run), "--to-hf", str(afile)]) == 2
    assert "exists and is not a directory" in one_error_line(capsys)
    assert run_convert(["--load", str(run), "--to-hf", str(afile / "hf")]) == 2  # the machine refuses the path
    assert f"'{afile / 'hf'}': Not a directory" in one_error_line(capsys)
    assert afile.read_text() == "mine"


def test_an_empty_data_directory_says_what_is_missing(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="no train.bin, val.bin or meta.json; prepare it"):
        load_eval_tokens(tmp_path / "data", 256)


def test_evaluate_on_text_that_is_not_utf8_says_how_to_convert_it(tmp_path):
    text = tmp_path / "latin1.txt"
    text.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"not valid UTF-8 at byte offset 3 \(0xe9\); convert the file to UTF-8"):
        load_eval_tokens(text, 50257)


def test_a_type_regex_partition_that_deepspeed_cannot_use_is_one_line(dist_world1, run, capsys):
    from gptx.config import load_config
    cfg = load_config(str(run.parent / "model.yaml"), {"pipe_parallel_size": 2})
    specs = layer_specs(cfg.model, 0)
    for method, needle in (("type:(", "not a regular expression"), ("type:a:b", "cuts the regex at ':'")):
        with pytest.raises(ConfigError, match=needle):
            partition(specs, method, 2, layer_compute_weights(cfg, specs))
    # Training builds DeepSpeed's partition: a regex no layer matches was its RuntimeError.
    argv = pretrain_args(*run_files_of(run), run.parent / "unmatched", 1, 1, "--partition-method", "type:nomatch")
    assert run_pretrain(argv) == 2
    assert "no layer class matches" in one_error_line(capsys)


def test_prepare_data_on_a_disk_that_fills_is_one_line(tmp_path, capsys):
    disk = tmp_path / "small"
    skipped = mount_tmpfs(disk, 64)
    if skipped:
        pytest.skip(skipped)
    try:
        text = tmp_path / "big.txt"
        text.write_text(MICRO_TEXT * 4000)
        assert run_prepare_data([str(text), "--out", str(disk / "data"), "--workers", "1"]) == 2
        assert (f"--out '{disk / 'data'}': writing the token files failed (No space left on device)"
                in one_error_line(capsys))
        assert not (disk / "data").exists()  # made by this call: removed
    finally:
        unmount(disk)


MICRO_TEXT = "The quick brown fox jumps over the lazy dog, again and again. "
