"""ZB-H1 against 1F1B under the real launcher: on 4 ranks as 4 stages and as 2 stages x 2 data-parallel
replicas, every case on the same batches with 1, 2, p and 2p + 1 micro-batches in successive steps
(tests/helpers/schedule_matrix.py, a run of the shared 4-rank launch); tools/schedule_bench.py on 2
stages (a run of the shared 2-rank launch)."""
import json

import pytest

from gptx.analysis.precision_check import Trace
from tests.helpers.runs import read_metrics, sequence_code, sequence_output, sequence_report, train_losses
from tests.helpers.schedule_matrix import CASES


def test_zb_h1_trains_the_losses_of_1f1b_on_4_stages_and_2x2(four_ranks):
    logs = four_ranks / "logs"
    assert sequence_code(logs, "schedules") == 0, sequence_output(logs, "schedules")[-3000:]
    traces = {k: Trace(**v) for k, v in json.loads((four_ranks / "schedules.json").read_text()).items()}
    for name, *_ in CASES:
        one, zero = traces[f"{name}/1f1b"], traces[f"{name}/zb-h1"]
        # The same sums in the same order (each weight's micro-batches in turn), so the same bits,
        # in every precision: losses, logged gradient norms, loss scales and skipped steps.
        assert zero.losses == one.losses, (name, one.losses, zero.losses)
        assert zero.grad_norms == one.grad_norms, (name, one.grad_norms, zero.grad_norms)
        assert zero.scales == one.scales and zero.skipped == one.skipped, name
        assert one.losses[-1] < one.losses[0], name  # both learn: the comparison is not between idle runs
    # The inf in a weight gradient that ZB-H1 computes in W was seen: step 3 skipped, training went on.
    assert traces["4x1/fp16-zero1-overflow/zb-h1"].skipped == [0, 0, 1, 1]


def test_the_schedule_benchmark_times_both_on_the_same_batches(two_ranks):
    r = sequence_report(two_ranks / "logs", "schedule_bench")
    assert r["stages"] == 2 and [row["micro_batches"] for row in r["rows"]] == [2, 4]
    for row in r["rows"]:
        one, zero = row["schedules"]["1f1b"], row["schedules"]["zb-h1"]
        assert zero["losses"] == one["losses"]  # same model, same batches: equal work
        assert row["w_s"] > 0 and row["f_s"] > 0 and row["b_s"] > 0
        # The theory, each schedule from its own measured times: ZB-H1's bubble is the smaller, and
        # 1F1B's step is the textbook (m + p - 1)(F + B) with its B holding the W.
        assert zero["theory_idle"] < one["theory_idle"]
        m = row["micro_batches"]
        assert one["theory_s"] == pytest.approx((m + 1) * (row["f_1f1b_s"] + row["backward_1f1b_s"]) + row["shared_s"])
        for x in (one, zero):
            assert x["step_s"] > 0 and len(x["idle"]) == len(x["peak_bytes"]) == 2 and min(x["peak_bytes"]) > 0


def test_either_schedule_resumes_the_others_checkpoint_exactly(two_ranks):
    """2 stages, dropout on: a run under 1F1B and the same under ZB-H1 (equal to the bit), each saving at
    iteration 3, and each resumed from there under the other schedule (runs of the shared 2-rank launch)."""
    logs = two_ranks / "logs"
    for name in ("one_node", "zb_full", "zb_from_1f1b", "1f1b_from_zb"):
        assert sequence_code(logs, name) == 0, sequence_output(logs, name)[-3000:]
    one, zero = train_losses(two_ranks / "one_node"), train_losses(two_ranks / "zb_full")
    assert sorted(one) == list(range(1, 7)) and zero == one
    assert train_losses(two_ranks / "zb_from_1f1b") == {i: one[i] for i in (4, 5, 6)}
    assert train_losses(two_ranks / "1f1b_from_zb") == {i: zero[i] for i in (4, 5, 6)}
    assert "changed since the checkpoint: pipeline_schedule '1f1b' -> 'zb-h1'" in sequence_output(logs, "zb_from_1f1b")


def test_evaluation_between_steps_gives_the_same_numbers_under_both_schedules(two_ranks):
    logs = two_ranks / "logs"
    runs = {}
    for schedule in ("1f1b", "zb-h1"):
        assert sequence_code(logs, f"eval_{schedule}") == 0, sequence_output(logs, f"eval_{schedule}")[-3000:]
        metrics = read_metrics(two_ranks / f"eval_{schedule}")
        runs[schedule] = [(r["iter"], r.get("loss"), r.get("val_loss")) for r in metrics
                          if "loss" in r or "val_loss" in r]
    assert [i for i, _, val in runs["zb-h1"] if val is not None] == [2, 4]
    assert runs["zb-h1"] == runs["1f1b"]
