"""tools/plot_runs.py: what it reads from metrics.jsonl, and that it draws."""
import json
import sys

import pytest

from gptx.analysis.plots import plot_runs, read_run, smooth
from gptx.cli.plot_runs import run_plot_runs
from gptx.errors import ConfigError, DataError


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
