"""tools/compare_variants.py's comparison, with the launches faked: what it refuses, what it counts."""
import json
from pathlib import Path

import pytest

import gptx.analysis.variants as variants
from gptx.cli.compare_variants import run_compare_variants
from gptx.config import load_config
from gptx.model.gpt import GPT
from tests.helpers.runs import fake_launches


@pytest.fixture
def launches(monkeypatch):
    """Every command launched; each fake run writes the metrics a real one would."""
    def write_metrics(cmd):
        run_dir = Path(cmd[cmd.index("--save") + 1])
        run_dir.mkdir(parents=True, exist_ok=True)
        records = [{"iter": 1, "loss": 5.0, "tokens": 100, "tokens_per_sec": 10.0}, {"iter": 1, "val_loss": 5.1}]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return fake_launches(monkeypatch, variants, write_metrics)


@pytest.mark.parametrize("earlier", [("config.json", "metrics.jsonl"), ("metrics.jsonl",), ("latest",),
                                     ("iter_00000010/mp_rank_00_model_states.pt",)])
def test_an_earlier_run_in_out_is_refused_and_kept(tmp_path, capsys, launches, earlier):
    # Before: shutil.rmtree deleted it, checkpoints included, and launched a new run there.
    out = tmp_path / "compare"
    for name in earlier:
        (out / "rotary" / name).parent.mkdir(parents=True, exist_ok=True)
        (out / "rotary" / name).write_text(f"{name} of the earlier run\n")
    assert run_compare_variants(["--variants", "gpt2", "rotary", "--iters", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--out" in err[0] and "rotary" in err[0], err
    assert launches == []  # not even the variant before it: the comparison would stop halfway
    assert not (out / "gpt2").exists()
    for name in earlier:
        assert (out / "rotary" / name).read_text() == f"{name} of the earlier run\n"


def test_an_empty_or_failed_launch_directory_is_reused(tmp_path, launches):
    out = tmp_path / "compare"
    (out / "gpt2").mkdir(parents=True)
    (out / "gpt2.log").write_text("an earlier failed launch")
    rows = variants.compare(["gpt2"], "tiny", 2, 1, out, [])
    assert [r["variant"] for r in rows] == ["gpt2"] and len(launches) == 1
    assert not (out / "gpt2.log").exists()  # its log described a launch that is not the latest
    # A free port of its own: on the launcher's default it stopped beside another run on the machine.
    port = int(launches[0][launches[0].index("--master_port") + 1])
    assert 1024 <= port < 65536


def test_the_table_counts_the_model_the_passed_on_flags_train(tmp_path, launches):
    extra = ["--set", "n_layer=1", "--set=n_embd=32", "--set", "n_head=2", "--data", "somewhere"]
    rows = variants.compare(["gpt2", "mqa"], "tiny", 2, 1, tmp_path / "compare", extra)
    for row, cmd in zip(rows, launches):
        assert cmd[-len(extra):] == extra
        keys = {**variants.VARIANTS[row["variant"]], "n_layer": 1, "n_embd": 32, "n_head": 2}
        trained = GPT(load_config("tiny", keys).model)
        assert row["parameters"] == sum(p.numel() for p in trained.parameters())


def test_an_out_that_is_a_file_is_one_line(tmp_path, capsys, launches):
    afile = tmp_path / "afile"
    afile.write_text("kept")
    for out in (afile, tmp_path / "compare"):
        (tmp_path / "compare").mkdir(exist_ok=True)
        (tmp_path / "compare" / "gpt2").write_text("kept")
        assert run_compare_variants(["--variants", "gpt2", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --out '{out}'") and "choose another --out" in err[0], err
    assert launches == [] and afile.read_text() == "kept"
