"""The launcher and subprocess half of tests.unit.analysis.test_strategies."""
import json

import pytest

from gptx.analysis.strategies import render_table, run_table
from gptx.config import load_config
from gptx.parallel.ds_config import DS_CONFIG_DIR, read_ds_config
from tests.helpers.runs import MICRO_MODEL


def test_one_strategy_launches_and_reports_measured_and_predicted_memory(tmp_path, monkeypatch):
    """ZeRO-3 on 2 ranks, where the gathered layers and the prefetch buffer count (with one rank
    they are absent): small buckets, so that they are not drowned by a 2 GB one."""
    monkeypatch.delenv("RANK", raising=False)
    cfg = load_config(None, dict(MICRO_MODEL))
    model_args = [f for k, v in MICRO_MODEL.items() for f in ("--set", f"{k}={v}")]
    base = read_ds_config(DS_CONFIG_DIR / "cpu_fp32.json")
    base["zero_optimization"] = {"reduce_bucket_size": 10_000, "stage3_prefetch_bucket_size": 10_000}
    rows = run_table(cfg, model_args, base, world=2, micro=2, accum=1, iters=1, warmup=2, work=tmp_path,
                     only=["no pipeline, ZeRO-3"], log=lambda m: None)
    assert len(rows) == 1 and "error" not in rows[0], rows
    row = rows[0]
    assert row["device"] == "cpu" and 0 < row["loss"] < 10
    assert row["predicted_bytes"] == pytest.approx(row["allocated_bytes"], rel=0.1)
    # RSS also holds the process's own memory, which no tensor accounts for
    assert row["rss_growth_bytes"] > row["predicted_resident_bytes"] > 0
    saved = json.loads((tmp_path / "no-pipeline_ZeRO-3" / "ds.json").read_text())
    assert saved["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 10_000, "stage3_prefetch_bucket_size": 10_000}
    assert "no pipeline, ZeRO-3" in render_table(rows, 2)
