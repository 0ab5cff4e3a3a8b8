"""tools/schedule_bench.py in process (one stage, where both schedules have no bubble) and its errors.
Two stages, under the launcher: tests/integration/test_zero_bubble.py."""
import json
import math
import random

import pytest

from gptx.analysis.schedule_bench import median_interval
from gptx.cli.schedule_bench import run_schedule_bench
from tests.helpers.runs import write_ds_config, write_model_yaml


def test_one_stage_runs_both_schedules_on_the_same_batches(dist_world1, tmp_path, capsys):
    model, ds = write_model_yaml(tmp_path / "model.yaml"), write_ds_config(tmp_path / "ds.json", micro=2, accum=2)
    assert run_schedule_bench(["--model", str(model), "--deepspeed_config", str(ds), "--micro-batches", "1,3",
                               "--iters", "2", "--warmup", "1", "--breakdown-iters", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["stages"] == 1 and [row["micro_batches"] for row in r["rows"]] == [1, 3]
    for row in r["rows"]:
        one, zero = row["schedules"]["1f1b"], row["schedules"]["zb-h1"]
        assert zero["losses"] == one["losses"]
        assert one["theory_idle"] == zero["theory_idle"] == 0  # one stage: no bubble under either schedule
        # ... so each schedule's theory is its own work: m micro-batches of F + B + W, and the optimizer.
        m = row["micro_batches"]
        assert one["theory_s"] == pytest.approx(m * (row["f_1f1b_s"] + row["backward_1f1b_s"]) + row["shared_s"])
        assert zero["theory_s"] == pytest.approx(m * (row["f_s"] + row["b_s"] + row["w_s"]) + row["shared_s"])
        assert row["speedup_interval"] is None  # 2 rounds: too few for an interval


def test_the_interval_holds_the_median_95_times_in_100_whatever_the_distribution():
    gen = random.Random(0)
    for n in (6, 9, 20, 41):
        covered = 0
        for _ in range(4000):
            lo, hi = median_interval([gen.expovariate(1.0) for _ in range(n)])  # skewed; median ln 2
            covered += lo <= math.log(2) <= hi
        assert 0.95 <= covered / 4000 < 0.985, (n, covered)  # no wider than it needs to be
    assert median_interval([1.0] * 5) is None


@pytest.mark.parametrize("flags,line", [
    (["--micro-batches", "2,x"], "error: --micro-batches: expected positive integers separated by commas, got '2,x'"),
    (["--micro-batches", "0"], "error: --micro-batches: expected positive integers separated by commas, got '0'"),
    (["--iters", "0"], "error: --iters: must be >= 1, got 0"),
])
def test_bad_flags_are_one_line(dist_world1, flags, line, capsys):
    assert run_schedule_bench(flags) == 2
    assert capsys.readouterr().err.strip().splitlines() == [line]
