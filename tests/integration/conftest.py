"""Launches shared across this directory's files. A launch costs about 10 s before it trains anything
(DeepSpeed's runner, its launcher and every rank import torch and DeepSpeed in turn), so the runs that
need the same number of ranks and no launch of their own go into one (tests/helpers/command_sequence.py),
each with its own log and exit code."""
import json

import pytest

from gptx.testing import CPU_FP16_ENV
from tests.helpers.runs import (REPO, launch_sequence, make_token_dir, pretrain_args, run_files, write_ds_config,
                                write_model_yaml)
from tests.unit.parallel.test_engine import write_ds
from tests.unit.training.test_checkpoint import args as checkpoint_args
from tests.unit.training.test_checkpoint import bf16_config

PARTITION_METHODS = ("parameters", "compute")
# test_multinode.py's runs: dropout on, so a resume also needs each node's random streams back.
MULTINODE_ITERS = 6
MULTINODE_FLAGS = ("--eval-interval", "0", "--log-interval", "1", "--set", "dropout=0.1")


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory):
    """2 ranks: the engine's layout under both partition methods (test_partition_report.py), the
    benchmark of 2 stages (test_benchmark.py), 1F1B against ZB-H1 side by side (test_zero_bubble.py),
    the shipped GPU fp16 JSON against fp32 and every precision path (test_engine.py), every
    architecture variant (test_variants.py), the runs of test_multinode.py on one node and those under
    ZB-H1 and resumed across schedules (test_zero_bubble.py). Returns the folder: logs/ holds each run's output."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    # A 1024-token vocabulary makes the head heavy in compute, so the two methods split differently.
    data = make_token_dir(tmp / "data", vocab_size=1024)
    model = write_model_yaml(tmp / "model.yaml", vocab_size=1024)
    ds = write_ds_config(tmp / "ds.json", micro=2, accum=2)
    bench_ds = write_ds_config(tmp / "bench_ds.json", micro=2, accum=4)
    plan = [{"name": method, "env": {},
             "argv": ["--model", str(model), "--data", str(data), "--deepspeed_config", str(ds),
                      "--save", str(tmp / method), "--train-iters", "1", "--eval-interval", "0",
                      "--partition-method", method, "--ds-log-level", "info"]} for method in PARTITION_METHODS]
    plan.append({"name": "benchmark", "command": "benchmark", "env": {},
                 "argv": ["--model", str(model), "--deepspeed_config", str(bench_ds), "--iters", "2", "--warmup", "1",
                          "--json"]})
    plan.append({"name": "schedule_bench", "command": "schedule_bench", "env": {},
                 "argv": ["--model", str(model), "--deepspeed_config", str(ds), "--micro-batches", "2,4",
                          "--iters", "2", "--warmup", "1", "--breakdown-iters", "1", "--json"]})
    micro_data, micro_model = make_token_dir(tmp / "micro_data"), write_model_yaml(tmp / "micro_model.yaml")
    shipped = REPO / "ds_configs" / "gpu_fp16.json"
    fp32_json = json.loads(shipped.read_text())
    del fp32_json["fp16"]
    for name, ds_json in (("gpu_fp16", shipped), ("gpu_fp32", write_ds(tmp, "gpu_fp32", fp32_json))):
        plan.append({"name": name, "env": {CPU_FP16_ENV: "1"},
                     "argv": pretrain_args(micro_data, micro_model, ds_json, tmp / name, 2, 6, "--eval-interval", "0",
                                           "--log-interval", "1")})
    plan.append({"name": "one_node", "env": {},  # test_multinode.py's runs, on one node
                 "argv": pretrain_args(micro_data, micro_model, ds, tmp / "one_node", 2, MULTINODE_ITERS,
                                       *MULTINODE_FLAGS, "--save-interval", "3")})
    # test_zero_bubble.py: both schedules with evaluation (its sends go through ZB-H1's too); the same run
    # under ZB-H1, and each schedule resuming the other's checkpoint.
    for schedule in ("1f1b", "zb-h1"):
        plan.append({"name": f"eval_{schedule}", "env": {},
                     "argv": pretrain_args(micro_data, micro_model, ds, tmp / f"eval_{schedule}", 2, 4,
                                           "--eval-interval", "2", "--eval-iters", "2",
                                           "--pipeline-schedule", schedule)})
    for name, schedule, extra in (("zb_full", "zb-h1", ("--save-interval", "3")),
                                  ("zb_from_1f1b", "zb-h1", ("--load", str(tmp / "one_node" / "iter_0000003"))),
                                  ("1f1b_from_zb", "1f1b", ("--load", str(tmp / "zb_full" / "iter_0000003")))):
        plan.append({"name": name, "env": {},
                     "argv": pretrain_args(micro_data, micro_model, ds, tmp / name, 2, MULTINODE_ITERS,
                                           *MULTINODE_FLAGS, "--pipeline-schedule", schedule, *extra)})
    plan.append({"name": "precisions", "command": "precision_matrix", "env": {CPU_FP16_ENV: "1"},
                 "argv": [str(micro_data), str(tmp / "precisions.json")]})
    plan.append({"name": "variants", "command": "variants_matrix", "env": {},
                 "argv": [str(micro_data), str(tmp / "variants.json")]})
    result = launch_sequence(2, plan, tmp / "logs")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp


@pytest.fixture(scope="session")
def four_ranks(tmp_path_factory):
    """4 ranks: a bf16 run on 2 stages x 2 data-parallel ranks and a run that changes its layout
    from 4 stages to 2 x 2 (test_checkpoint.py), and the 1F1B against ZB-H1 matrix (test_zero_bubble.py)."""
    tmp = tmp_path_factory.mktemp("four_ranks")
    work = run_files(tmp)
    # 2 x 2 takes half the micro-batches per replica: the global batch (4 sequences) stays the same.
    half_accum = write_ds_config(tmp / "ds_dp2.json", micro=2, accum=1)
    plan = [{"name": "bf16_pp2_dp2", "env": {},
             "argv": checkpoint_args(work, tmp / "bf16_pp2_dp2", 2, 3, "--deepspeed_config", str(bf16_config(tmp)))},
            {"name": "relayout_4_stages", "env": {},  # iterations 1-3
             "argv": checkpoint_args(work, tmp / "relayout", 4, 6, "--exit-interval", "3")},
            {"name": "relayout_2x2", "env": {},  # iterations 4-5
             "argv": checkpoint_args(work, tmp / "relayout", 2, 6, "--load", str(tmp / "relayout"),
                                     "--deepspeed_config", str(half_accum), "--exit-interval", "5")},
            {"name": "schedules", "command": "schedule_matrix", "env": {CPU_FP16_ENV: "1"},
             "argv": [str(work[1]), str(tmp / "schedules.json")]}]
    result = launch_sequence(4, plan, tmp / "logs")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp
