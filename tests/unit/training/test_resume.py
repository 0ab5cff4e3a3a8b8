"""`--load RUN` continues the run as it was: model, training keys, data and DeepSpeed JSON come
from the checkpoint unless given again (issue 26, item 1). In process, one rank."""
import json
import shutil

import pytest

from gptx.cli.pretrain import run_pretrain
from gptx.training.checkpoint_files import MANIFEST, META
from tests.helpers.runs import make_token_dir, read_metrics, train_losses, write_ds_config, write_model_yaml

# The run's own choices, none of them the defaults a bare --load would otherwise take: a YAML
# model reshaped by --set (the default preset is `tiny`, 128 wide), its own data (256 tokens:
# the embedded corpus has GPT-2's 50,257 and would be refused), a DeepSpeed JSON of 1 x 4
# micro-batches (cpu_fp32.json has 4 x 4), one stage, and training flags.
SHAPE = ("--set", "n_layer=3", "--set", "n_embd=48")
FLAGS = ("--pipe-parallel-size", "1", "--lr", "3e-3", "--warmup-iters", "1", "--lr-decay-iters", "5",
         "--eval-interval", "0", "--seed", "7")


@pytest.fixture(scope="module")
def runs(dist_world1, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    data, model = make_token_dir(tmp / "data"), write_model_yaml(tmp / "model.yaml")
    ds = write_ds_config(tmp / "ds.json", micro=1, accum=4)
    given = ["--model", str(model), *SHAPE, "--data", str(data), "--deepspeed_config", str(ds), *FLAGS]
    assert run_pretrain([*given, "--train-iters", "5", "--save", str(tmp / "full")]) == 0
    assert run_pretrain([*given, "--train-iters", "3", "--save", str(tmp / "part")]) == 0  # stopped at 3
    pristine = tmp / "part_at_3"  # copies for the other cases, before the resume adds to it
    shutil.copytree(tmp / "part", pristine)
    ds.write_text("{}")  # the run's JSON file edited since: a resume reads the copy in its checkpoint
    return tmp, data, pristine


def copy_run(runs, name):
    tmp, _, pristine = runs
    shutil.copytree(pristine, tmp / name)
    return tmp / name


def changed_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("changed since the checkpoint: ")]


def test_load_alone_continues_the_run_on_its_model_data_and_deepspeed_json(runs, capsys):
    tmp, data, _ = runs
    capsys.readouterr()
    assert run_pretrain(["--load", str(tmp / "part"), "--train-iters", "5"]) == 0
    out = capsys.readouterr().out
    assert train_losses(tmp / "part") == train_losses(tmp / "full")  # exactly
    assert changed_lines(out) == ["changed since the checkpoint: train_iters 3 -> 5"]
    assert f"; data {data}" in out and "3 layers, 2 heads, width 48" in out and "1 x 4 micro-batches" in out
    saved = json.loads((tmp / "part" / "iter_0000005" / META).read_text())
    assert saved["data_sources"] == [{"path": str(data.resolve()), "weight": 1.0, "train_tokens": 20000}]
    assert saved["config"]["model"]["n_layer"] == 3 and saved["ds_config"]["gradient_accumulation_steps"] == 4


def test_a_shape_given_again_that_the_checkpoint_cannot_take_is_one_line(runs, capsys):
    run = copy_run(runs, "reshaped")
    capsys.readouterr()
    assert run_pretrain(["--load", str(run), "--set", "n_layer=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "n_layer 3 (checkpoint) vs 4 (now)" in err[0]
    assert "leave n_layer out of --model/--set to resume with the checkpoint's" in err[0]
    assert max(train_losses(run)) == 3  # nothing trained or written


def test_other_data_given_explicitly_is_used_and_said_once(runs, capsys):
    tmp, data, _ = runs
    run = copy_run(runs, "other_data")
    other = make_token_dir(tmp / "other", seed=5)
    capsys.readouterr()
    assert run_pretrain(["--load", str(run), "--train-iters", "4", "--data", str(other)]) == 0
    out = capsys.readouterr().out
    assert changed_lines(out) == ["changed since the checkpoint: train_iters 3 -> 4",
                                  f"changed since the checkpoint: data {data.resolve()} -> {other.resolve()}"]
    assert "data differs" not in out  # the old warning, which named only the old data
    assert json.loads((run / "iter_0000004" / META).read_text())["data_sources"][0]["path"] == str(other.resolve())
    assert train_losses(run)[4] != train_losses(tmp / "full")[4]  # other samples


def test_a_checkpoint_folder_resumes_from_itself_and_names_the_later_latest(runs, capsys):
    tmp, _, _ = runs
    run = copy_run(runs, "two_checkpoints")
    assert run_pretrain(["--load", str(run), "--train-iters", "5"]) == 0  # latest: iter_0000005
    capsys.readouterr()
    branch = tmp / "branch"
    assert run_pretrain(["--load", str(run / "iter_0000003"), "--train-iters", "4", "--save", str(branch)]) == 0
    out = capsys.readouterr().out
    assert (f"note: resuming from iter_0000003 as asked, though '{run / 'latest'}' names the later "
            f"iter_0000005 (--load {run} resumes from there); new checkpoints go to {branch}\n") in out
    assert f"resumed from {run / 'iter_0000003'}: iteration 3" in out
    assert train_losses(branch) == {4: train_losses(tmp / "full")[4]}
    assert (run / "latest").read_text() == "iter_0000005"  # the run it came from is untouched


def old_format(run, monkeypatch, **meta_changes):
    """The copy's checkpoint as an older gptx wrote it: gptx.json without what it now records."""
    folder = run / "iter_0000003"
    meta = json.loads((folder / META).read_text())
    for key, value in meta_changes.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest[META] = (folder / META).stat().st_size
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_an_old_checkpoint_resumes_as_before(runs, capsys, monkeypatch):
    tmp, data, _ = runs
    # Before mixtures, only --data as given was recorded, relative to where the run started.
    run = copy_run(runs, "old_relative")
    old_format(run, monkeypatch, data_sources=None, data="data")
    monkeypatch.chdir(tmp)
    assert run_pretrain(["--load", str(run), "--train-iters", "5"]) == 0
    assert train_losses(run) == train_losses(tmp / "full")
    # No record of the data at all: the default corpus, as before, and one line says what to give.
    run = copy_run(runs, "old_unrecorded")
    old_format(run, monkeypatch, data_sources=None, data=None)
    capsys.readouterr()
    assert run_pretrain(["--load", str(run), "--train-iters", "5"]) == 2  # the default corpus is GPT-2's
    assert ("does not record its data (saved by an older gptx): training on the default corpus; pass --data DIR"
            in capsys.readouterr().out)
    assert run_pretrain(["--load", str(run), "--train-iters", "5", "--data", str(data)]) == 0
    assert train_losses(run) == train_losses(tmp / "full")
    assert [r["iter"] for r in read_metrics(run) if "checkpoint" in r] == [3, 5]


def test_data_that_grew_since_the_checkpoint_is_said_once(runs, capsys, monkeypatch):
    tmp, _, _ = runs
    run = copy_run(runs, "grown_data")
    grown = make_token_dir(tmp / "grown")  # the run's data, prepared again with more text since
    old_format(run, monkeypatch, data=str(grown),
               data_sources=[{"path": str(grown.resolve()), "weight": 1.0, "train_tokens": 20000}])
    with open(grown / "train.bin", "ab") as f:
        f.write(bytes(2 * 640))
    capsys.readouterr()
    assert run_pretrain(["--load", str(run), "--train-iters", "4"]) == 0
    assert changed_lines(capsys.readouterr().out)[1:] == [
        f"changed since the checkpoint: data '{grown.resolve()}': train.bin holds 20,640 tokens, 20,000 when the "
        f"checkpoint was saved; the rest of the epoch reads its windows in a new order, so some already trained "
        f"on come again and some are skipped"]
