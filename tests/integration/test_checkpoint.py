"""The launcher and subprocess half of tests.unit.training.test_checkpoint."""

import pytest

from gptx.cli.pretrain import run_pretrain
from tests.helpers.runs import read_metrics, sequence_code, sequence_output, train_losses
from tests.unit.training.test_checkpoint import (args, assert_masters_round_to_the_layer_files,  # noqa: F401 (fixtures)
                                                 one_stage_run, work)


def test_resume_on_another_number_of_stages(dist_world1, work, one_stage_run, four_ranks):
    """4 stages for iterations 1-3, 2 stages x 2 replicas for 4-5 (runs of the shared 4-rank launch,
    tests/integration/conftest.py), then 1 stage in this process for iteration 6."""
    run, logs = four_ranks / "relayout", four_ranks / "logs"
    for name in ("relayout_4_stages", "relayout_2x2"):
        assert sequence_code(logs, name) == 0, sequence_output(logs, name)[-3000:]
    assert "optimizer's moments" in sequence_output(logs, "relayout_2x2")  # the warning: what does not carry over
    assert run_pretrain(args(work, run, 1, 6, "--load", str(run))) == 0
    full, resumed = train_losses(one_stage_run), train_losses(run)
    assert resumed.keys() == full.keys()
    # Iteration 4's loss is computed by the weights after step 3: exact across the change of layout.
    assert resumed[4] == pytest.approx(full[4], abs=1e-5)
    assert all(abs(resumed[i] - full[i]) < 0.1 for i in (5, 6))  # Adam restarts; the loss carries on
    lrs = {r["iter"]: r["lr"] for r in read_metrics(run) if "lr" in r}
    assert lrs == {r["iter"]: r["lr"] for r in read_metrics(one_stage_run) if "lr" in r}


def test_master_weights_of_a_bf16_run_on_two_stages_and_two_data_parallel_ranks(four_ranks):
    """A run of the shared 4-rank launch (tests/integration/conftest.py)."""
    logs = four_ranks / "logs"
    assert sequence_code(logs, "bf16_pp2_dp2") == 0, sequence_output(logs, "bf16_pp2_dp2")[-3000:]
    assert_masters_round_to_the_layer_files(four_ranks / "bf16_pp2_dp2")
