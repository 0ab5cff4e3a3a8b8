"""metrics.py: the console line, the run's time estimate, and a metrics file that cannot be written."""
import json

import pytest

from gptx.training.metrics import Metrics, RunClock, console_line, duration


def test_the_estimate_leaves_out_the_first_iterations_warm_up():
    clock = RunClock(last_iteration=100)
    # Iteration 1 took 60 s (compile, first allocations); each after it 2 s.
    assert clock.eta(1, 60.0) is None
    assert [clock.eta(i, 60.0 + 2 * (i - 1)) for i in (2, 3)] == [None, None]
    assert not clock.first_estimate(3)
    assert clock.eta(4, 66.0) == 2.0 * 96
    assert clock.first_estimate(4) and not clock.first_estimate(5)
    assert clock.eta(100, 60.0 + 2 * 99) == 0.0


def test_a_resumed_run_paces_from_its_own_first_iteration():
    clock = RunClock(last_iteration=50)
    assert clock.eta(31, 500.0) is None  # resumed at 30: its first iteration is 31
    assert clock.eta(34, 503.0) == 1.0 * 16


def test_durations_read_as_a_person_would_say_them():
    assert [duration(s) for s in (0, 59.4, 61, 3599, 3600 + 5 * 60, 9 * 86400 + 4 * 3600 + 59)] == \
        ["0 s", "59 s", "1 min", "59 min", "1 h 05 min", "9 d 4 h"]


def record(**extra):
    return {"iter": 7, "loss": 3.25, "lr": 1e-3, "grad_norm": None, "loss_scale": None, "skipped_steps": 0,
            "tokens_per_sec": 1234.0, "mfu": None, "elapsed": 12.0, **extra}


def test_the_console_line_carries_the_estimate_once_there_is_one():
    assert "ETA" not in console_line(record(eta_s=None))
    assert console_line(record(eta_s=7500)).endswith("| 12 s | ETA 2 h 05 min")


def test_a_full_disk_stops_the_metrics_file_not_the_run(tmp_path, capsys):
    metrics = Metrics.__new__(Metrics)  # rank 0's state, without a process group
    metrics.wandb = None
    metrics.path = tmp_path / "metrics.jsonl"
    metrics.file = open("/dev/full", "a", buffering=1)  # every write: ENOSPC
    metrics.write({"iter": 1, "loss": 2.0})
    metrics.write({"iter": 2, "loss": 1.5})
    metrics.close()
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"warning: could not write {metrics.path}: No space left on device; the rest of this run's "
                   f"metrics go to the console only"]


def test_metrics_lines_are_json_one_per_record(tmp_path):
    metrics = Metrics.__new__(Metrics)
    metrics.wandb = None
    metrics.path = tmp_path / "metrics.jsonl"
    metrics.file = open(metrics.path, "a", buffering=1)
    metrics.write({"iter": 1, "loss": 2.0})
    metrics.write({"iter": 2, "loss": 1.5, "eta_s": None})
    metrics.close()
    assert [json.loads(l) for l in metrics.path.read_text().splitlines()] == \
        [{"iter": 1, "loss": 2.0}, {"iter": 2, "loss": 1.5, "eta_s": None}]


def test_non_finite_values_are_written_as_null_so_every_json_reader_takes_the_line(dist_world1, tmp_path):
    from gptx.config import load_config
    metrics = Metrics(tmp_path, load_config(None, {}))
    # An fp16 step skipped for overflow (inf grad norm), a diverged loss, and a nested record.
    metrics.write({"iter": 1, "loss": 2.0, "grad_norm": float("inf"), "skipped_steps": 1})
    metrics.write({"iter": 2, "loss": float("nan"), "val_loss_per_source": {"a": float("-inf"), "b": 1.0}})
    metrics.close()
    strict = lambda token: pytest.fail(f"{token} is not JSON")  # noqa: E731
    assert [json.loads(line, parse_constant=strict) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] \
        == [{"iter": 1, "loss": 2.0, "grad_norm": None, "skipped_steps": 1},
            {"iter": 2, "loss": None, "val_loss_per_source": {"a": None, "b": 1.0}}]


@pytest.mark.parametrize("before,after", [
    ('{"iter": 1}\n{"iter": 2, "lo', '{"iter": 1}\n'),  # a run killed mid-write
    ('{"iter": 1, "lo', ''),
    ('{"iter": 1}\n', '{"iter": 1}\n'),
    ('', ''),
])
def test_a_resume_drops_a_cut_last_line_instead_of_writing_onto_it(dist_world1, tmp_path, before, after):
    from gptx.config import load_config
    (tmp_path / "metrics.jsonl").write_text(before)
    metrics = Metrics(tmp_path, load_config(None, {}))
    metrics.write({"iter": 3})
    metrics.close()
    assert (tmp_path / "metrics.jsonl").read_text() == after + '{"iter": 3}\n'


def test_wandb_runs_in_the_mode_the_user_set(dist_world1, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from gptx.config import load_config
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: without WANDB_MODE gptx would pick offline
    monkeypatch.setenv("WANDB_MODE", "disabled")
    metrics = Metrics(tmp_path, load_config(None, {"wandb_project": "gptx-test"}))
    try:
        assert metrics.wandb.settings.mode == "disabled"
    finally:
        metrics.close()
    assert not (tmp_path / "wandb").exists()  # an offline run would have written its files there


def test_a_console_whose_reader_went_away_is_dropped_not_raised(monkeypatch):
    # Ctrl-C also ends the `| tee log` reading a run's output: before, the next line raised
    # BrokenPipeError and the run ended without the checkpoint the signal asked for.
    import os
    import sys

    from gptx.training.metrics import log
    read_end, write_end = os.pipe()
    os.close(read_end)
    stdout = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setenv("RANK", "0")
    try:
        log("iter 4 | saved checkpoint")
        log("stopped by SIGINT at iteration 4")
        assert os.path.samefile(f"/proc/self/fd/{write_end}", os.devnull)
    finally:
        stdout.close()
