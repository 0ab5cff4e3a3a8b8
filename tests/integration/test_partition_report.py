"""The launcher and subprocess half of tests.unit.analysis.test_partition_report."""
import json
import re

import pytest

from tests.helpers.runs import (launch_sequence, make_token_dir, sequence_code, sequence_output, write_ds_config,
                                write_model_yaml)
from tests.unit.analysis.test_partition_report import report

METHODS = ("parameters", "compute")


@pytest.fixture(scope="module")
def engine_layouts(tmp_path_factory):
    """Where the engine put each layer under both partition methods: two runs in one launch."""
    tmp = tmp_path_factory.mktemp("partition")
    # A 1024-token vocabulary makes the head heavy in compute, so the two methods split differently.
    data = make_token_dir(tmp / "data", vocab_size=1024)
    model = write_model_yaml(tmp / "model.yaml", vocab_size=1024)
    ds = write_ds_config(tmp / "ds.json", micro=2, accum=2)
    plan = [{"name": method, "env": {},
             "argv": ["--model", str(model), "--data", str(data), "--deepspeed_config", str(ds),
                      "--save", str(tmp / method), "--train-iters", "1", "--eval-interval", "0",
                      "--partition-method", method, "--ds-log-level", "info"]} for method in METHODS]
    result = launch_sequence(2, plan, tmp / "logs")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    layouts = {}
    for method in METHODS:
        out = sequence_output(tmp / "logs", method)
        assert sequence_code(tmp / "logs", method) == 0, out[-3000:]
        layouts[method] = {int(stage): (int(start), int(stop), int(params)) for stage, start, stop, params in
                           re.findall(r"STAGE=(\d+) LAYERS=\d+ \[(\d+), (\d+)\) STAGE_PARAMS=(\d+)", out)}
    return model, ds, layouts


@pytest.mark.parametrize("method", METHODS)
def test_report_layout_is_what_the_engine_does(engine_layouts, method):
    model, ds, layouts = engine_layouts
    r = report(str(model), pipe=2, method=method, ds=json.loads(ds.read_text()))
    planned = {s["stage"]: (s["layers"][0]["index"], s["layers"][-1]["index"] + 1, s["params"]) for s in r["stages"]}
    assert layouts[method] == planned
    assert r["methods"]["parameters"]["parts"] != r["methods"]["compute"]["parts"]
