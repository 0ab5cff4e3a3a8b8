"""The launcher and subprocess half of tests.unit.analysis.test_benchmark."""
import json

import pytest

from tests.helpers.runs import launch
from tests.unit.analysis.test_benchmark import files  # noqa: F401 (fixtures)


def test_two_stage_breakdown_shows_the_pipeline(files):
    tmp, model, ds = files
    result = launch(2, ["--model", str(model), "--deepspeed_config", str(ds), "--iters", "2", "--warmup", "1",
                        "--json"], cwd=tmp, script="tools/benchmark.py")
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("{")]  # the launcher logs around it
    r = json.loads(line)
    assert r["pipe_parallel_size"] == 2 and len(r["stages"]) == 2
    assert r["theoretical_bubble"] == pytest.approx(1 / (4 + 1))  # (p - 1) / (m + p - 1)
    for stage in r["stages"]:
        assert stage["seconds"]["send/recv"] > 0 and stage["seconds"]["forward"] > 0
