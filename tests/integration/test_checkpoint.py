"""The launcher and subprocess half of tests.unit.training.test_checkpoint."""

import pytest

from gptx.cli.pretrain import run_pretrain
from tests.helpers.runs import read_metrics, sequence_code, sequence_output, train_losses
from tests.integration.test_train import BF16
from tests.integration.test_train import argv as train_argv
from tests.unit.training.test_checkpoint import (args, assert_masters_round_to_the_layer_files,  # noqa: F401 (fixtures)
                                                 assert_same_masters, one_stage_run, resume_and_save_at_once, work)


def test_resume_on_another_number_of_stages(dist_world1, work, one_stage_run, four_ranks):
    """4 stages for iterations 1-3, 2 stages x 2 replicas for 4-5 (runs of the shared 4-rank launch,
    tests/integration/conftest.py), then 1 stage in this process for iteration 6."""
    run, logs = four_ranks / "relayout", four_ranks / "logs"
    for name in ("relayout_4_stages", "relayout_2x2"):
        assert sequence_code(logs, name) == 0, sequence_output(logs, name)[-3000:]
    assert "Adam's moments and step count" in sequence_output(logs, "relayout_2x2")  # what carries over
    assert run_pretrain(args(work, run, 1, 6, "--load", str(run))) == 0
    full, resumed = train_losses(one_stage_run), train_losses(run)
    assert resumed.keys() == full.keys()
    # Weights, Adam's state and LR schedule carry over: the loss goes on as on one stage all along, to
    # the rounding of fp32 sums taken in another order (restarted moments fail it).
    assert all(resumed[i] == pytest.approx(full[i], abs=1e-5) for i in full)
    lrs = {r["iter"]: r["lr"] for r in read_metrics(run) if "lr" in r}
    assert lrs == {r["iter"]: r["lr"] for r in read_metrics(one_stage_run) if "lr" in r}


def test_master_weights_of_a_bf16_run_on_two_stages_and_two_data_parallel_ranks(four_ranks):
    """A run of the shared 4-rank launch (tests/integration/conftest.py)."""
    logs = four_ranks / "logs"
    assert sequence_code(logs, "bf16_pp2_dp2") == 0, sequence_output(logs, "bf16_pp2_dp2")[-3000:]
    assert_masters_round_to_the_layer_files(four_ranks / "bf16_pp2_dp2")


def test_resume_on_another_data_parallel_size_with_the_optimizer_state_split(dist_world1, two_ranks, capsys):
    """bf16 with ZeRO-1 on 1 stage x 2 replicas for iterations 1-3 (a run of two_ranks' launch), then on
    1 replica in this process with twice the micro-batches: the same global batch. DeepSpeed's own load
    stops there (ZeRORuntimeException: the optimizer state is split by replica); gptx carries the fp32
    master weights, Adam's moments and its step count over exactly."""
    logs, run = two_ranks / "logs", two_ranks / "bf16_dp2"
    assert sequence_code(logs, "bf16_dp2") == 0, sequence_output(logs, "bf16_dp2")[-3000:]
    work = (two_ranks, two_ranks / "micro_data", two_ranks / "micro_model.yaml")
    resume_and_save_at_once(train_argv(work, "bf16_dp1_resaved", 1, 2, 2, "--load", str(run), ds_extra=BF16))
    assert "split across 2 data-parallel replicas and this run has 1" in capsys.readouterr().out
    assert_masters_round_to_the_layer_files(run)  # the reader of 2 replicas' files, checked on its own
    assert_same_masters(run, two_ranks / "bf16_dp1_resaved")
    assert run_pretrain(train_argv(work, "bf16_dp1", 1, 2, 2, "--load", str(run), ds_extra=BF16)) == 0
    full, before, after = (train_losses(two_ranks / name) for name in ("full_bf16", "bf16_dp2", "bf16_dp1"))
    assert before.keys() == {1, 2, 3} and after.keys() == {4, 5, 6}
    # bf16 runs on other layouts agree to about 1e-5 (2 stages against 2 replicas, iterations 1-3), and so does
    # the run resumed on 1 replica (restarted moments fail it).
    assert all(loss == pytest.approx(full[i], abs=1e-4) for i, loss in {**before, **after}.items())


def test_resume_on_another_data_parallel_size_is_exact_where_the_optimizer_state_is_whole(dist_world1, two_ranks):
    """fp32 without ZeRO keeps the whole optimizer state on every replica: 2 replicas for iterations 1-3
    (two_ranks' launch), 1 in this process for 4-6 go on as one replica all along, Adam's moments included.
    This path is DeepSpeed's own load, as before relayout.py: the test guards that a change of replicas
    goes to relayout.py only where the state is split."""
    logs, run = two_ranks / "logs", two_ranks / "fp32_dp2"
    assert sequence_code(logs, "fp32_dp2") == 0, sequence_output(logs, "fp32_dp2")[-3000:]
    work = (two_ranks, two_ranks / "micro_data", two_ranks / "micro_model.yaml")
    assert run_pretrain(train_argv(work, "fp32_dp1", 1, 2, 2, "--load", str(run))) == 0
    assert run_pretrain(train_argv(work, "fp32_one_replica", 1, 2, 2)) == 0
    full, before, after = (train_losses(two_ranks / name) for name in ("fp32_one_replica", "fp32_dp2", "fp32_dp1"))
    assert after.keys() == {4, 5, 6}
    assert all(a == pytest.approx(full[i], abs=1e-5) for i, a in {**before, **after}.items())


def test_a_zero3_checkpoint_of_two_ranks_resumes_on_one_pipeline_stage(dist_world1, two_ranks, capsys):
    """ZeRO-3 cuts every parameter into one chunk per rank, Adam's moments too. Its checkpoint of
    iteration 2 on 2 ranks (two_ranks' launch, the zero3 run) resumed on 1 stage and 1 rank goes on
    as 2 stages did all along (the same global batches, tests/integration/test_train.py), so the
    moments were put back together right: restarted, they move iterations 4-6 by about 1e-2."""
    from tests.integration.test_train import ITERS, PARITY_TOL
    work = (two_ranks, two_ranks / "micro_data", two_ranks / "micro_model.yaml")
    saved = two_ranks / "zero3" / "iter_0000002"
    assert run_pretrain(train_argv(work, "zero3_on_one_stage", 1, 2, 4, "--load", str(saved))) == 0
    assert "Adam's moments and step count, iteration" in capsys.readouterr().out
    resumed, two_stages = train_losses(two_ranks / "zero3_on_one_stage"), train_losses(two_ranks / "two_stages")
    assert resumed.keys() == set(range(3, ITERS + 1))
    assert max(abs(resumed[i] - two_stages[i]) for i in resumed) < PARITY_TOL, (resumed, two_stages)


def test_a_resume_onto_zero3_where_the_ranks_do_not_divide_a_parameter(two_ranks):
    """1 stage x 2 replicas for iterations 1-3, then ZeRO-3 on the 2 ranks for 4-6, on a model whose
    norms and biases hold 33 values: DeepSpeed's ZeRO-3 setter cuts rank 1's chunk past their end
    (defect 10, gptx/parallel/engine.py). The moments land in the right chunks: the run goes on as
    the uninterrupted one on 1 stage."""
    from tests.integration.test_train import PARITY_TOL
    logs = two_ranks / "logs"
    for name in ("odd_full", "odd_dp2", "odd_zero3"):
        assert sequence_code(logs, name) == 0, sequence_output(logs, name)[-3000:]
    assert "Adam's moments and step count, iteration" in sequence_output(logs, "odd_zero3")
    resumed, full = train_losses(two_ranks / "odd_dp2"), train_losses(two_ranks / "odd_full")
    assert resumed.keys() == full.keys() == set(range(1, 7))
    assert max(abs(resumed[i] - full[i]) for i in full) < PARITY_TOL, (resumed, full)
