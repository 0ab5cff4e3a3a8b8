"""tools/strategies.py: every strategy is a layout gptx accepts, and one real launch fills a row
with measured and predicted memory."""
import json

import pytest

from gptx.config import load_config
from gptx.ds_config import DS_CONFIG_DIR, check_ds_config, read_ds_config
from gptx.strategies import render_table, run_table, strategies, strategy_ds_config
from tests.conftest import MICRO_MODEL


def test_the_ten_strategies_are_layouts_gptx_accepts():
    names = [s.name for s in strategies(2)]
    assert len(names) == len(set(names)) == 10
    base = read_ds_config(DS_CONFIG_DIR / "cpu_fp32.json")
    for s in strategies(2):
        ds = strategy_ds_config(base, s, 2, 2)
        check_ds_config(ds, 2 // s.pipe if s.pipe else 2, s.pipe, "cpu")
        if s.offload_optimizer:  # DeepSpeedCPUAdam, not the JSON's torch AdamW
            assert "torch_adam" not in ds["optimizer"]["params"] and "fused" not in ds["optimizer"]["params"]


def test_an_unknown_strategy_name_is_one_line(capsys):
    from gptx.cli import run_strategies
    assert run_strategies(["--only", "pipeline ZeRO-1"]) == 2  # the comma is part of the name
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--only 'pipeline ZeRO-1': no such strategy" in err[0] and "pipeline, ZeRO-1;" in err[0]


@pytest.mark.launcher
def test_one_strategy_launches_and_reports_measured_and_predicted_memory(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    cfg = load_config(None, dict(MICRO_MODEL))
    model_args = [f for k, v in MICRO_MODEL.items() for f in ("--set", f"{k}={v}")]
    base = read_ds_config(DS_CONFIG_DIR / "cpu_fp32.json")
    rows = run_table(cfg, model_args, base, world=2, micro=2, accum=1, iters=1, warmup=1, work=tmp_path,
                     only=["no pipeline, ZeRO-3"], log=lambda m: None)
    assert len(rows) == 1 and "error" not in rows[0], rows
    row = rows[0]
    assert row["memory_kind"] == "peak RSS" and row["measured_bytes"] > 0 and row["predicted_bytes"] > 0
    assert len(row["peak_bytes_per_rank"]) == 2 and 0 < row["loss"] < 10
    saved = json.loads((tmp_path / "no-pipeline_ZeRO-3" / "ds.json").read_text())
    assert saved["zero_optimization"]["stage"] == 3
    assert "no pipeline, ZeRO-3" in render_table(rows, 2)
