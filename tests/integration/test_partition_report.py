"""The launcher half of tests.unit.analysis.test_partition_report: where the engine put each layer."""
import json
import re

import pytest

from tests.helpers.runs import sequence_code, sequence_output
from tests.integration.conftest import PARTITION_METHODS
from tests.unit.analysis.test_partition_report import report


@pytest.fixture(scope="module")
def engine_layouts(two_ranks):
    """Where the engine put each layer under both partition methods (two runs of the shared 2-rank launch)."""
    tmp = two_ranks
    model, ds = tmp / "model.yaml", tmp / "ds.json"
    layouts = {}
    for method in PARTITION_METHODS:
        out = sequence_output(tmp / "logs", method)
        assert sequence_code(tmp / "logs", method) == 0, out[-3000:]
        layouts[method] = {int(stage): (int(start), int(stop), int(params)) for stage, start, stop, params in
                           re.findall(r"STAGE=(\d+) LAYERS=\d+ \[(\d+), (\d+)\) STAGE_PARAMS=(\d+)", out)}
    return model, ds, layouts


@pytest.mark.parametrize("method", PARTITION_METHODS)
def test_report_layout_is_what_the_engine_does(engine_layouts, method):
    model, ds, layouts = engine_layouts
    r = report(str(model), pipe=2, method=method, ds=json.loads(ds.read_text()))
    planned = {s["stage"]: (s["layers"][0]["index"], s["layers"][-1]["index"] + 1, s["params"]) for s in r["stages"]}
    assert layouts[method] == planned
    assert r["methods"]["parameters"]["parts"] != r["methods"]["compute"]["parts"]
