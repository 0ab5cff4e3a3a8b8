"""Bad input to launch/pretrain.py: one line on stderr, exit code 2, before any heavy work."""
import json

import pytest

from gptx.cli import run_pretrain
from tests.conftest import MICRO_MODEL, make_token_dir, write_ds_config, write_model_yaml


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    data = make_token_dir(tmp_path / "data")
    model = write_model_yaml(tmp_path / "model.yaml")
    ds = write_ds_config(tmp_path / "ds.json", micro=2, accum=2)
    return tmp_path, ["--model", str(model), "--data", str(data), "--deepspeed_config", str(ds)]


def fails_with(capsys, argv, needle):
    assert run_pretrain(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert needle in err, err


def test_unknown_preset(setup, capsys):
    tmp, base = setup
    fails_with(capsys, base[2:] + ["--model", "gpt-5"], "unknown model preset 'gpt-5'")


def test_unknown_override_key(setup, capsys):
    tmp, base = setup
    fails_with(capsys, base + ["--set", "n_layerz=3"], "unknown key 'n_layerz'")


def test_stages_must_divide_world_size(setup, capsys):
    tmp, base = setup
    fails_with(capsys, base + ["--pipe-parallel-size", "3"], "--pipe-parallel-size 3 does not divide the world size 2")


def test_zero2_with_pipeline(setup, capsys):
    tmp, base = setup
    ds = write_ds_config(tmp / "z2.json", micro=2, accum=2, zero_optimization={"stage": 2})
    fails_with(capsys, base + ["--deepspeed_config", str(ds)], "zero_optimization.stage 2 cannot be combined")


def test_batch_arithmetic(setup, capsys):
    tmp, base = setup
    ds = write_ds_config(tmp / "b.json", micro=2, accum=2, train_batch_size=6)
    fails_with(capsys, base + ["--deepspeed_config", str(ds)], "train_batch_size 6 must equal")


def test_malformed_ds_json(setup, capsys):
    tmp, base = setup
    (tmp / "bad.json").write_text("{not json")
    fails_with(capsys, base + ["--deepspeed_config", str(tmp / "bad.json")], "not valid JSON")


def test_missing_data(setup, capsys):
    tmp, base = setup
    fails_with(capsys, base + ["--data", str(tmp / "nope")], "not a directory")


def test_vocabulary_larger_than_the_models(setup, capsys):
    tmp, base = setup
    fails_with(capsys, base + ["--set", "vocab_size=100"], "tokenized with a 256-token vocabulary")


def test_token_ids_beyond_vocab(setup, capsys):
    tmp, base = setup
    (tmp / "data" / "meta.json").write_text('{"vocab_size": 100, "dtype": "uint16"}')  # meta that lies
    fails_with(capsys, base + ["--set", "vocab_size=100"], "outside the model's vocabulary")


def test_checkpoint_of_another_model(setup, capsys):
    tmp, base = setup
    run = tmp / "run"
    (run / "iter_0000004").mkdir(parents=True)
    (run / "latest").write_text("iter_0000004")
    saved = {"model": {**MICRO_MODEL, "dropout": 0.0, "bias": True, "tie_embeddings": True, "n_layer": 6}}
    (run / "iter_0000004" / "gptx.json").write_text(json.dumps({"config": saved, "pipe_parallel_size": 2}))
    size = (run / "iter_0000004" / "gptx.json").stat().st_size
    (run / "iter_0000004" / "manifest.json").write_text(json.dumps({"gptx.json": size}))
    fails_with(capsys, base + ["--load", str(run)], "n_layer 6 (checkpoint) vs 4 (now)")


def test_load_without_checkpoint(setup, capsys):
    tmp, base = setup
    (tmp / "empty").mkdir()
    fails_with(capsys, base + ["--load", str(tmp / "empty")], "no checkpoint folders (iter_*) to resume from")
