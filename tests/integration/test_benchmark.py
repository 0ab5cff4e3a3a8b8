"""The launcher half of tests.unit.analysis.test_benchmark: 2 stages (a run of the shared 2-rank launch)."""
import pytest

from tests.helpers.runs import sequence_report


def test_two_stage_breakdown_shows_the_pipeline(two_ranks):
    r = sequence_report(two_ranks / "logs", "benchmark")
    assert r["pipe_parallel_size"] == 2 and len(r["stages"]) == 2
    assert r["theoretical_bubble"] == pytest.approx(1 / (4 + 1))  # (p - 1) / (m + p - 1)
    for stage in r["stages"]:
        assert stage["seconds"]["send/recv"] > 0 and stage["seconds"]["forward"] > 0
