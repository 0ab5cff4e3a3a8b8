"""tools/strategies.py: every strategy is a layout gptx accepts, the planner's prediction matches
the bytes the real engine allocates under each, and one real launch fills a row with measured
and predicted memory."""

import pytest

from gptx.analysis.strategies import strategies, strategy_ds_config
from gptx.config import load_config
from gptx.parallel.ds_config import DS_CONFIG_DIR, check_ds_config, read_ds_config


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
    from gptx.cli.strategies import run_strategies
    assert run_strategies(["--only", "pipeline ZeRO-1"]) == 2  # the comma is part of the name
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--only 'pipeline ZeRO-1': no such strategy" in err[0] and "pipeline, ZeRO-1;" in err[0]


SMALL_MODEL = dict(vocab_size=512, seq_len=64, n_layer=4, n_head=4, n_embd=128)  # 0.9M parameters


@pytest.mark.parametrize("bucket,tolerance", [(100_000, 0.2), (500_000_000, 0.01)], ids=["small-bucket", "default"])
def test_predicted_memory_matches_the_bytes_the_engine_allocates(dist_world1, bucket, tolerance):
    """Each strategy's engine built and trained two steps in this process: the peak of bytes its
    tensors held against the partition report's device + host bytes. With DeepSpeed's default
    bucket (5e8 elements) the buckets are nearly all of it and must be counted exactly (two
    through the pipeline, one without); with a small one the model's own terms show."""
    from gptx.analysis.benchmark import AllocatedPeak, random_batches
    from gptx.analysis.precision_check import release
    from gptx.analysis.strategies import predicted_bytes
    from gptx.parallel.engine import build_engine
    base = read_ds_config(DS_CONFIG_DIR / "cpu_fp32.json")
    for s in strategies(1):
        cfg = load_config(None, dict(SMALL_MODEL, pipe_parallel_size=s.pipe, activation_checkpoint_interval=s.checkpoint))
        ds = strategy_ds_config(base, s, 2, 2)
        ds["zero_optimization"]["reduce_bucket_size"] = bucket
        with AllocatedPeak() as peak:
            engine = build_engine(cfg, ds)
            batches = random_batches(cfg, 2, seed=0)
            for _ in range(2):
                engine.train_batch(batches)
        release(engine)
        predicted = predicted_bytes(cfg, s, ds, world=1, on_cpu=True)
        assert predicted == pytest.approx(peak.bytes, rel=tolerance), s.name
