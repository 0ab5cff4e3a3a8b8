"""Bad input to launch/pretrain.py: one line on stderr, exit code 2, before any heavy work."""
import json
import re

import pytest

from gptx.cli.pretrain import run_pretrain
from gptx.errors import CheckpointError
from tests.helpers.runs import MICRO_MODEL, make_token_dir, write_ds_config, write_model_yaml


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


def test_stages_must_divide_world_size(setup, capsys, monkeypatch):
    tmp, base = setup
    monkeypatch.setenv("WORLD_SIZE", "4")
    fails_with(capsys, base + ["--pipe-parallel-size", "3"], "--pipe-parallel-size 3 does not divide the world size 4")


def test_more_stages_than_processes_names_the_launcher(setup, capsys):
    tmp, base = setup
    fails_with(capsys, base + ["--pipe-parallel-size", "3"], "3 pipeline stages need 3 processes, 2 launched: run "
                                                             "deepspeed --num_gpus 3 launch/pretrain.py, or "
                                                             "--pipe-parallel-size 2")


def test_wandb_that_cannot_be_imported_is_one_line_before_any_engine(setup, capsys, monkeypatch):
    tmp, base = setup
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # what an install without it gives
    fails_with(capsys, base + ["--save", str(tmp / "run"), "--set", "wandb_project=gptx-runs"],
               "train.wandb_project 'gptx-runs': wandb cannot be imported here; pip install wandb")
    assert not (tmp / "run").exists()


def test_deepspeeds_old_config_flag_is_the_config_flag(setup, capsys, tmp_path):
    tmp, base = setup
    # Before: listed in --help by DeepSpeed's parser, accepted and ignored (the default JSON trained).
    fails_with(capsys, base[:4] + ["--deepscale_config", str(tmp / "missing.json")],
               f"--deepspeed_config '{tmp / 'missing.json'}': cannot read it")
    fails_with(capsys, base + ["--deepscale_config", str(tmp / "other.json")],
               "--deepscale_config is DeepSpeed's old name for --deepspeed_config; give one of them")


def test_a_resume_on_more_ranks_says_the_global_batch_changed():
    from gptx.parallel.ds_config import BatchLayout
    from gptx.training.plan import batch_change
    meta = {"data_parallel_size": 1, "pipe_parallel_size": 1,
            "ds_config": {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4,
                          "optimizer": {"type": "AdamW"}}}
    assert batch_change(meta, BatchLayout(4, 4, 2), "cpu") == [
        "global batch 16 -> 32 sequences (micro-batch 4 -> 4, accumulation 4 -> 4, data-parallel 1 -> 2); set "
        "train_batch_size in the DeepSpeed JSON to keep it"]
    assert batch_change(meta, BatchLayout(4, 2, 2), "cpu") == []  # train_batch_size 16 kept it


def test_zero2_with_pipeline(setup, capsys):
    tmp, base = setup
    ds = write_ds_config(tmp / "z2.json", micro=2, accum=2, zero_optimization={"stage": 2})
    fails_with(capsys, base + ["--deepspeed_config", str(ds)], "zero_optimization.stage 2 does not work with pipeline parallelism (DeepSpeed's pipeline engine takes ZeRO 0 and 1); add --pipe-parallel-size 0")


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


def fake_run(run, latest="iter_0000004"):
    (run / latest).mkdir(parents=True)
    (run / "latest").write_text(latest)
    (run / "config.json").write_text('{"theirs": true}\n')
    (run / "metrics.jsonl").write_text('{"iter": 1, "loss": 5.0}\n')
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


@pytest.mark.parametrize("with_load", [False, True])
def test_save_into_another_runs_directory_is_refused_and_changes_nothing(setup, capsys, with_load):
    tmp, base = setup
    before = fake_run(tmp / "theirs")
    extra = ["--save", str(tmp / "theirs")]
    if with_load:  # resuming run A but saving into run B
        fake_run(tmp / "mine")
        extra += ["--load", str(tmp / "mine")]
    fails_with(capsys, base + extra, f"--save '{tmp / 'theirs'}' already holds another run (config.json, "
                                     f"metrics.jsonl, latest, 1 checkpoint folder(s), newest iter_0000004)")
    assert {p: p.read_bytes() for p in (tmp / "theirs").rglob("*") if p.is_file()} == before


def test_convert_does_not_write_into_another_run(setup, capsys):
    from gptx.cli.convert import run_convert
    tmp, _ = setup
    before = fake_run(tmp / "theirs")
    assert run_convert(["--from-hf", str(tmp / "hf"), "--save", str(tmp / "theirs")]) == 2
    assert "already holds another run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (tmp / "theirs").rglob("*") if p.is_file()} == before


def test_every_training_key_is_a_flag_with_its_default_in_the_help(capsys):
    import dataclasses

    from gptx.cli.pretrain import parse_pretrain_args
    from gptx.config import TrainConfig
    with pytest.raises(SystemExit):
        parse_pretrain_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    section = help_text.split("training keys", 1)[1]
    flags = [re.escape("--" + f.name.replace("_", "-")) + "[ ,]" for f in dataclasses.fields(TrainConfig)]
    for f, flag, after in zip(dataclasses.fields(TrainConfig), flags, flags[1:] + ["--deepspeed "]):
        assert re.search(flag, section), flag
        entry = re.split(after, re.split(flag, section, maxsplit=1)[1], maxsplit=1)[0]
        if f.default is not None and f.default != "":
            shown = f"{f.default:g}" if isinstance(f.default, float) else str(f.default)
            assert f"(default: {shown}" in entry, (flag, entry)
        assert len(entry) > 30, (flag, entry)  # a help text, not just the flag
    cfg, _ = parse_pretrain_args(["--lr-decay-iters", "70", "--min-lr", "1e-5", "--compile-blocks",
                                  "--sample-prompt", "Once"])
    assert (cfg.train.lr_decay_iters, cfg.train.min_lr, cfg.train.compile_blocks, cfg.train.sample_prompt) == \
        (70, 1e-5, True, "Once")
    assert parse_pretrain_args(["--no-compile-blocks"])[0].train.compile_blocks is False


@pytest.mark.parametrize("argv,needle", [
    (["--lr-decay", "5"], "unrecognized arguments: --lr-decay 5"),  # no abbreviations: a typo is an error
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
])
def test_a_wrong_flag_is_one_line_from_rank_0_and_silence_elsewhere(setup, capsys, monkeypatch, argv, needle):
    tmp, base = setup
    fails_with(capsys, base + argv, needle)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")  # rank 0's node
    monkeypatch.setattr("time.sleep", lambda s: None)
    assert run_pretrain(base + argv) == 2
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    monkeypatch.setenv("LOCAL_RANK", "0")  # the first rank of another node, whose inputs are its own
    assert run_pretrain(base + argv) == 2
    assert capsys.readouterr().err.startswith(f"error: rank 1 (the first on its node): {needle}")


def test_a_run_that_saved_no_checkpoint_is_not_written_over_either(setup, capsys):
    tmp, base = setup
    (tmp / "crashed").mkdir()
    (tmp / "crashed" / "config.json").write_text("{}\n")
    (tmp / "crashed" / "metrics.jsonl").write_text('{"iter": 1, "loss": 5.0}\n')
    fails_with(capsys, base + ["--save", str(tmp / "crashed")],
               f"--save '{tmp / 'crashed'}' holds a run that saved no checkpoint (config.json, metrics.jsonl); "
               f"delete the directory to start again there")


def test_a_start_that_failed_before_its_first_step_may_be_started_again_there(tmp_path):
    """DeepSpeed can still refuse something after the run directory is written (config.json and an
    empty metrics.jsonl): nothing was trained, so the same command, mended, may run there."""
    from gptx.training.resume import check_save_dir
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "config.json").write_text("{}\n")
    (tmp_path / "failed" / "metrics.jsonl").write_text("")
    check_save_dir(tmp_path / "failed", None)
    (tmp_path / "failed" / "metrics.jsonl").write_text('{"iter": 1, "loss": 5.0}\n')
    with pytest.raises(CheckpointError, match="holds a run that saved no checkpoint"):
        check_save_dir(tmp_path / "failed", None)


def test_runs_started_in_the_same_second_get_their_own_directories(dist_world1, tmp_path, monkeypatch):
    import datetime as real

    import gptx.training.trainer
    from gptx.config import load_config

    class Frozen(real.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 11, 24, 12, 0, 0)
    monkeypatch.setattr(gptx.training.trainer, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny")
    dirs = [gptx.training.trainer.new_run_dir(cfg) for _ in range(3)]
    assert [str(d) for d in dirs] == ["runs/tiny-20261124-120000", "runs/tiny-20261124-120000-2",
                                      "runs/tiny-20261124-120000-3"]
    assert all(d.is_dir() for d in dirs)
