"""The launcher and subprocess half of tests.unit.parallel.test_engine."""
import json

from gptx.analysis.precision_check import Trace, max_loss_diff, max_norm_rel_diff
from tests.helpers.runs import read_metrics, sequence_code, sequence_output
from tests.unit.parallel.test_engine import BF16_LOSS_TOL, BF16_NORM_TOL, LOSS_TOL, NORM_TOL


def test_every_precision_path_follows_fp32_with_two_stages_and_two_replicas(two_ranks):
    """tests/helpers/precision_matrix.py: a run of the shared 2-rank launch (tests/integration/conftest.py)."""
    logs = two_ranks / "logs"
    assert sequence_code(logs, "precisions") == 0, sequence_output(logs, "precisions")[-3000:]
    traces = {k: Trace(**v) for k, v in json.loads((two_ranks / "precisions.json").read_text()).items()}
    assert max_loss_diff(traces["pipe1/fp32"], traces["pipe2/fp32"]) < 1e-5
    # train.fused_loss (tests/unit/model/test_fused_loss.py): the same losses; its fp16 run follows fp32 like the others.
    assert max_loss_diff(traces["pipe2/fp32"], traces["pipe2/fp32-fused"]) < 1e-5
    for key, trace in traces.items():
        layout, name = key.split("/")
        reference = traces[f"{layout}/fp32"]
        loss_tol, norm_tol = (BF16_LOSS_TOL, BF16_NORM_TOL) if name == "bf16" else (LOSS_TOL, NORM_TOL)
        assert trace.skipped[-1] == 0, key
        assert max_loss_diff(reference, trace) < loss_tol, (key, reference.losses, trace.losses)
        # With 2 stages the tied embedding lives on both: counted twice, the norm would be off by far more.
        assert max_norm_rel_diff(reference, trace) < norm_tol, (key, reference.grad_norms, trace.grad_norms)


def test_the_shipped_gpu_fp16_config_trains_like_fp32_on_two_stages(two_ranks):
    """The issue's command: GPTX_CPU_FP16=1 deepspeed --num_gpus 2 launch/pretrain.py
    --deepspeed_config ds_configs/gpu_fp16.json (on the micro model), against the same JSON without fp16:
    two runs of the shared 2-rank launch."""
    logs = two_ranks / "logs"
    runs = {}
    for name in ("fp16", "fp32"):
        assert sequence_code(logs, f"gpu_{name}") == 0, sequence_output(logs, f"gpu_{name}")[-3000:]
        runs[name] = [r for r in read_metrics(two_ranks / f"gpu_{name}") if "loss" in r]
    out = sequence_output(logs, "gpu_fp16")
    assert ", fp16, " in out and "gptx does (see gptx/parallel/engine.py)" in out
    fp16, fp32 = runs["fp16"], runs["fp32"]
    assert [r["iter"] for r in fp16] == [r["iter"] for r in fp32] == list(range(1, 7))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(fp16, fp32)) < LOSS_TOL
    assert max(abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] for a, b in zip(fp16, fp32)) < NORM_TOL
    assert fp16[-1]["loss"] < fp16[0]["loss"] - 0.1 and fp16[-1]["loss_scale"] == 2 ** 16
    assert all(r["skipped_steps"] == 0 for r in fp16)
