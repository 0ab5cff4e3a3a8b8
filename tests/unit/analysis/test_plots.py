"""tools/plot_runs.py: what it reads from metrics.jsonl, and that it draws."""
import json
import sys

import pytest

from gptx.analysis.plots import plot_runs, read_run, smooth
from gptx.cli.plot_runs import run_plot_runs
from gptx.errors import ConfigError, DataError
from tests.helpers.runs import one_error_line


def write_run(path, iters, fp16=False, resumed_from=None, resumed_to=None):
    path.mkdir(parents=True)
    lines = []
    for i in range(1, iters + 1):
        record = {"iter": i, "loss": 10 - 0.05 * i, "lr": 1e-3 * min(1, i / 5), "grad_norm": 2.0 / i,
                  "loss_scale": 2.0 ** (16 - (i > iters // 2)) if fp16 else None,
                  "skipped_steps": int(fp16 and i > iters // 2), "tokens": 1024 * i, "tokens_per_sec": 900.0 + i,
                  "mfu": 0.2}
        lines.append(record)
        if i % 10 == 0:
            lines.append({"iter": i, "val_loss": 9.5 - 0.05 * i, "val_ppl": 1.0})
    if resumed_from is not None:  # a crash after iteration `iters`, resumed from an earlier checkpoint
        lines += [{**r, "loss": r["loss"] - 1} if "loss" in r else r for r in lines
                  if resumed_from < r["iter"] <= (resumed_to or iters)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_a_resumed_runs_later_records_win_and_val_losses_sit_at_their_tokens(tmp_path):
    run = read_run(write_run(tmp_path / "a", 30, resumed_from=20))
    assert run["iters"] == list(range(1, 31)) and run["tokens"] == [1024 * i for i in range(1, 31)]
    assert run["train"][24]["loss"] == pytest.approx(10 - 0.05 * 25 - 1)  # the resumed trajectory's
    assert run["train"][9]["loss"] == pytest.approx(10 - 0.05 * 10)
    assert run["val"] == [(10240, pytest.approx(9.0)), (20480, pytest.approx(8.5)), (30720, pytest.approx(8.0))]


def test_a_resume_that_has_not_caught_up_drops_the_abandoned_records(tmp_path):
    run = read_run(write_run(tmp_path / "a", 30, resumed_from=10, resumed_to=15))
    assert run["iters"] == list(range(1, 16))  # 16-30 belonged to the trajectory that was abandoned
    assert run["train"][-1]["loss"] == pytest.approx(10 - 0.05 * 15 - 1)
    assert run["val"] == [(10240, pytest.approx(9.0))]
    with open(tmp_path / "a" / "metrics.jsonl", "a") as f:
        f.write('{"iter": 16, "lo')  # a last line cut short: left out
    assert read_run(tmp_path / "a")["iters"] == list(range(1, 16))


def test_smoothing_is_bias_corrected():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([1.0, 3.0], 0.0) == [1.0, 3.0]
    assert smooth([0.0, 10.0], 0.5) == pytest.approx([0.0, 0.5 * 10 / 0.75])


def test_two_runs_draw_one_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = plot_runs([write_run(tmp_path / "x" / "run", 40), write_run(tmp_path / "y" / "run", 30, fp16=True)],
                    tmp_path / "plots" / "runs.png")
    import matplotlib.image
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (935, 1760)  # 16 x 8.5 inches at 110 dpi
    assert image[..., :3].std() > 0.05  # something was drawn


def test_bad_runs_and_a_missing_matplotlib_are_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    assert run_plot_runs([str(tmp_path / "empty"), "--out", str(tmp_path / "p.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    bad = write_run(tmp_path / "bad", 3)
    with open(bad / "metrics.jsonl", "a") as f:
        f.write('{not json\n{"iter": 4, "loss": 1.0, "tokens": 4096}\n')
    with pytest.raises(DataError, match="line 4: not valid JSON"):
        read_run(bad)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[plot\]"'):
        plot_runs([write_run(tmp_path / "ok", 3)], tmp_path / "p.png")


@pytest.mark.parametrize("line", ["5", '"a note"', "[1, 2]", "null"])
def test_a_line_that_is_not_an_object_names_the_file_and_line(tmp_path, capsys, line):
    # Before: a TypeError traceback ("argument of type 'int' is not iterable").
    run = write_run(tmp_path / "run", 3)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(line + '\n{"iter": 4, "loss": 1.0, "tokens": 4096}\n')
    assert run_plot_runs([str(run), "--out", str(tmp_path / "p.png")]) == 2
    error = one_error_line(capsys)
    assert str(run / "metrics.jsonl") in error and "line 4" in error
    assert not (tmp_path / "p.png").exists()


def test_records_without_a_usable_iteration_are_skipped_and_counted(tmp_path, capsys):
    # Before: KeyError 'iter', TypeError comparing a str 'iter', TypeError smoothing a null loss.
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run", 20)
    with open(run / "metrics.jsonl", "a") as f:
        for record in ({"loss": 1.0, "tokens": 1}, {"iter": "21", "loss": 1.0, "tokens": 1}, {"iter": 21, "loss": 1.0},
                       {"iter": True, "val_loss": 1.0}, {"iter": 21, "val_loss": None},
                       {"iter": 22, "loss": None, "lr": None, "tokens": 22 * 1024, "tokens_per_sec": None}):
            f.write(json.dumps(record) + "\n")
    read = read_run(run)
    assert read["skipped"] == 5 and read["iters"] == list(range(1, 21)) + [22]  # a null loss keeps its record
    out = tmp_path / "p.png"
    assert run_plot_runs([str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "left out 5 record(s)" in printed and f"wrote {out}" in printed and out.stat().st_size > 0


def test_metrics_jsonl_that_is_a_directory_is_one_line(tmp_path, capsys):
    # Before: IsADirectoryError.
    (tmp_path / "run" / "metrics.jsonl").mkdir(parents=True)
    assert run_plot_runs([str(tmp_path / "run"), "--out", str(tmp_path / "p.png")]) == 2
    assert str(tmp_path / "run" / "metrics.jsonl") in one_error_line(capsys)
    with pytest.raises(DataError, match="metrics.jsonl"):  # a user error for every caller, not only the command's
        read_run(tmp_path / "run")


def test_an_out_matplotlib_cannot_write_is_one_line_before_drawing(tmp_path, capsys):
    # Before: matplotlib's ValueError ("Format 'txt' is not supported").
    pytest.importorskip("matplotlib")
    assert run_plot_runs([str(write_run(tmp_path / "run", 3)), "--out", str(tmp_path / "x.txt")]) == 2
    assert "--out" in one_error_line(capsys) and not (tmp_path / "x.txt").exists()


def test_an_out_without_a_suffix_prints_the_file_written(tmp_path, capsys):
    # Before: it printed 'wrote runs' and matplotlib wrote runs.png.
    pytest.importorskip("matplotlib")
    out = tmp_path / "runs"
    assert run_plot_runs([str(write_run(tmp_path / "run", 3)), "--out", str(out)]) == 0
    written = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("wrote ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "runs.png"] and written == str(tmp_path / "runs.png")


def test_an_out_that_cannot_be_written_is_one_line_and_keeps_the_file_there(tmp_path, capsys, monkeypatch):
    # Before: an OSError traceback (a read-only disk).
    import errno
    import tempfile
    pytest.importorskip("matplotlib")
    out = tmp_path / "p.png"
    out.write_bytes(b"an earlier picture")

    def read_only(*args, **kwargs):  # what a read-only disk answers (root ignores permission bits)
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert run_plot_runs([str(write_run(tmp_path / "run", 3)), "--out", str(out)]) == 2
    error = one_error_line(capsys)
    assert f"--out {out}" in error and "Read-only file system" in error
    assert out.read_bytes() == b"an earlier picture"
