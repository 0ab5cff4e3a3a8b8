"""The launcher and subprocess half of tests.unit.analysis.test_partition_report."""
import json
import re

import pytest

from tests.helpers.runs import launch, make_token_dir, write_ds_config, write_model_yaml
from tests.unit.analysis.test_partition_report import report


@pytest.mark.parametrize("method", ["parameters", "compute"])
def test_report_layout_is_what_the_engine_does(tmp_path, method):
    # A 1024-token vocabulary makes the head heavy in compute, so the two methods split differently.
    data = make_token_dir(tmp_path / "data", vocab_size=1024)
    model = write_model_yaml(tmp_path / "model.yaml", vocab_size=1024)
    ds = write_ds_config(tmp_path / "ds.json", micro=2, accum=2)
    result = launch(2, ["--model", str(model), "--data", str(data), "--deepspeed_config", str(ds),
                        "--save", str(tmp_path / "run"), "--train-iters", "1", "--eval-interval", "0",
                        "--partition-method", method, "--ds-log-level", "info"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    engine = {}
    for stage, start, stop, params in re.findall(r"STAGE=(\d+) LAYERS=\d+ \[(\d+), (\d+)\) STAGE_PARAMS=(\d+)",
                                                 result.stdout):
        engine[int(stage)] = (int(start), int(stop), int(params))
    r = report(str(model), pipe=2, method=method, ds=json.loads(ds.read_text()))
    planned = {s["stage"]: (s["layers"][0]["index"], s["layers"][-1]["index"] + 1, s["params"]) for s in r["stages"]}
    assert engine == planned
    assert r["methods"]["parameters"]["parts"] != r["methods"]["compute"]["parts"]
