"""The smaller things a new user met (issue 26, item 8): each says what is true, or does what it says."""
import json
import shlex
import subprocess
import sys

from gptx.cli.evaluate import run_evaluate
from gptx.cli.partition_report import run_partition_report
from gptx.cli.prepare_data import prepare_data_parser
from gptx.parallel.ds_config import read_ds_config
from tests.helpers.runs import REPO, make_token_dir

SMALL_FIT = ["--fit", "--model", "gpt2", "--gpus", "8", "--gpu-memory", "80", "--micro-batch", "1", "--accum", "1"]


def test_fit_writes_the_plan_its_command_names(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_partition_report(SMALL_FIT) == 0
    out = capsys.readouterr().out
    assert "--deepspeed_config plan.json" in out and "add --write-plan plan.json" in out, out
    assert not (tmp_path / "plan.json").exists()  # a report writes nothing unasked

    plan = tmp_path / "plans" / "gpt2.json"
    assert run_partition_report(SMALL_FIT + ["--write-plan", str(plan)]) == 0
    out = capsys.readouterr().out
    command = next(line.strip() for line in out.splitlines() if line.strip().startswith("deepspeed "))
    words = shlex.split(command)
    assert words[words.index("--deepspeed_config") + 1] == str(plan)
    assert f"wrote its DeepSpeed JSON to {plan}" in out
    written = read_ds_config(str(plan))  # what gptx itself will read at launch
    assert run_partition_report(SMALL_FIT + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert written == next(r for r in rows if r["fits"])["ds_config"]


def test_write_plan_when_nothing_fits_or_without_fit_is_one_line(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert run_partition_report(["--fit", "--model", "gpt3-175b", "--gpus", "1", "--gpu-memory", "8",
                                 "--host-memory", "16", "--write-plan", str(plan)]) == 2
    captured = capsys.readouterr()
    assert "nothing fits" in captured.out
    assert captured.err.strip() == f"error: --write-plan '{plan}': no layout fits, so no plan was written"
    assert not plan.exists()
    assert run_partition_report(["--write-plan", str(plan)]) == 2
    assert "--write-plan: only with --fit" in capsys.readouterr().err


def test_the_tied_embedding_note_only_for_tied_heads(capsys):
    assert run_partition_report(["--model", "gpt2", "--pipe-parallel-size", "2"]) == 0
    assert "(a tied embedding counts on both end stages)" in capsys.readouterr().out
    for untied in (["--model", "llama2-7b"], ["--model", "gpt2", "--set", "tie_embeddings=false"]):
        assert run_partition_report(untied + ["--pipe-parallel-size", "2"]) == 0
        out = capsys.readouterr().out
        assert "parameters: total" in out and "tied embedding" not in out, out
    assert run_partition_report(["--model", "gpt2", "--pipe-parallel-size", "1"]) == 0  # one copy on one stage
    assert "tied embedding" not in capsys.readouterr().out


def test_evaluate_load_of_a_data_directory_says_so(tmp_path, capsys):
    data = make_token_dir(tmp_path / "data")
    assert run_evaluate(["--load", str(data), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --load '{data}': a data directory (train.bin, val.bin, meta.json), not a model")
    assert "resume" not in err and f"--data {data}" in err
    (tmp_path / "empty").mkdir()
    assert run_evaluate(["--load", str(tmp_path / "empty"), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no checkpoint to evaluate in it" in err and "resume" not in err


def test_fetching_the_bpe_says_why_where_and_that_it_is_still_going(monkeypatch, tmp_path):
    import gptx.data.tokens
    monkeypatch.setenv("GPTX_CACHE", str(tmp_path / "cache"))
    # A download that takes a while and then fails, in place of pip.
    monkeypatch.setattr(gptx.data.tokens, "_whisper_download_command",
                        lambda dest: [sys.executable, "-c", "import sys, time; time.sleep(1); "
                                                            "sys.exit('ERROR: no network')"])
    lines = []
    assert gptx.data.tokens._ranks_from_whisper_sdist(lines.append, progress_every=0.2) is None
    assert lines[0] == ("gptx: fetching GPT-2's BPE from the openai-whisper sdist on PyPI (it ships the vocabulary "
                        f"files); once, cached in {tmp_path / 'cache'}")
    assert any(line.startswith("gptx: still fetching openai-whisper (") for line in lines[1:-1]), lines
    assert "ERROR: no network" in lines[-1]


def test_prepare_data_help_shows_the_defaults():
    parser = prepare_data_parser()
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            assert f"(default: {action.default})" in text, action.option_strings
    assert "(default: 0.01)" in text and "(default: text)" in text


def test_data_directories_are_ignored_by_git():
    out = subprocess.run(["git", "check-ignore", "-q", "data/mine/train.bin"], cwd=REPO)
    assert out.returncode == 0
