"""tools/strategies.py's --work folder, with the launches faked: what an earlier run there leaves, and a
--work that cannot be written."""
import errno
import json
from pathlib import Path

import pytest

import gptx.analysis.strategies as strategies_module
from gptx.cli.strategies import run_strategies
from tests.helpers.runs import fake_launches

ONLY = ["--only", "no pipeline, ZeRO-2"]


@pytest.fixture
def launches(monkeypatch):
    """Every command launched; each fake launch succeeds and every rank writes its record."""
    def write_ranks(cmd):
        out = Path(cmd[cmd.index("--worker-out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        for rank in range(int(cmd[cmd.index("--num_gpus") + 1])):
            (out / f"rank{rank}.json").write_text(json.dumps({
                "rank": rank, "device": "cpu", "allocated_bytes": 1 << 30, "rss_growth_bytes": 1 << 29,
                "seconds_per_iteration": 1.0, "loss": 5.0}))
    return fake_launches(monkeypatch, strategies_module, write_ranks)


def test_a_reused_work_folder_reads_only_this_launchs_ranks(tmp_path, launches, capsys):
    # Before: the --gpus 2 run's rank1.json was counted in the --gpus 1 run, which was reported as failed.
    work = tmp_path / "work"
    assert run_strategies([*ONLY, "--gpus", "2", "--work", str(work), "--json"]) == 0
    capsys.readouterr()
    mine = work / "mine.txt"
    mine.write_text("not the tool's")
    assert run_strategies([*ONLY, "--gpus", "1", "--work", str(work), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert "error" not in row and row["seconds_per_iteration"] == 1.0
    assert mine.read_text() == "not the tool's" and len(launches) == 2


def test_work_at_a_file_is_one_line_before_any_launch(tmp_path, launches, capsys):
    afile = tmp_path / "afile"
    afile.write_text("kept")
    for work in (afile, afile / "below"):
        assert run_strategies([*ONLY, "--work", str(work)]) == 2
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --work '{work}': cannot write"), captured.err
        assert "Traceback" not in captured.err
    assert launches == [] and afile.read_text() == "kept"


def test_a_read_only_work_is_one_line_before_any_launch(tmp_path, launches, capsys, monkeypatch):
    def read_only(self, *args, **kwargs):  # what a read-only disk answers (root ignores permission bits)
        raise OSError(errno.EROFS, "Read-only file system", str(self))
    monkeypatch.setattr(Path, "mkdir", read_only)
    assert run_strategies([*ONLY, "--work", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--work" in err[0] and "Read-only file system" in err[0], err
    assert launches == []
