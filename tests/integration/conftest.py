"""Launches shared across this directory's files. A launch costs about 10 s before it trains anything
(DeepSpeed's runner, its launcher and every rank import torch and DeepSpeed in turn), so the runs that
need the same number of ranks and no launch of their own go into one (tests/helpers/command_sequence.py),
each with its own log and exit code. A run that kills or crashes a rank ends its launch: each of the
2-rank launches ends with one, and the resumes of the killed runs share the last launch."""
import json
import os
import shutil
import signal
import time

import pytest

from gptx.testing import CPU_FP16_ENV
from gptx.training.checkpoint_files import MANIFEST
from tests.helpers.faults import faulted_run, run_step
from tests.helpers.runs import (REPO, launch_sequence, make_token_dir, mount_tmpfs, pretrain_args, run_files,
                                sequence_code, sequence_run, unmount, write_ds_config, write_model_yaml)
from tests.integration.test_train import BF16, OFFLOAD, ZERO3
from tests.integration.test_train import argv as train_argv
from tests.unit.parallel.test_engine import write_ds
from tests.unit.training.test_checkpoint import args as checkpoint_args
from tests.unit.training.test_checkpoint import bf16_config
from tests.unit.training.test_reliability import ITERS
from tests.unit.training.test_reliability import args as fault_args

PARTITION_METHODS = ("parameters", "compute")
# test_multinode.py's runs: dropout on, so a resume also needs each node's random streams back.
MULTINODE_ITERS = 6
MULTINODE_FLAGS = ("--eval-interval", "0", "--log-interval", "1", "--set", "dropout=0.1")
ODD = ("--set", "n_embd=33", "--set", "n_head=3")  # norms and biases of 33 values: 2 ranks cut them unevenly


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory):
    """2 ranks: the engine's layout under both partition methods (test_partition_report.py), the
    benchmark of 2 stages (test_benchmark.py), 1F1B against ZB-H1 side by side (test_zero_bubble.py),
    the shipped GPU fp16 JSON against fp32 and every precision path (test_engine.py), every
    architecture variant (test_variants.py), the runs of test_multinode.py on one node and those under
    ZB-H1 and resumed across schedules (test_zero_bubble.py), a bf16 and a fp32 run on 2
    replicas that test_checkpoint.py resumes on one, and test_train.py's runs: 2 stages, 2
    replicas, bf16 and optimizer offload stopped and resumed, a bad flag, and last a ZeRO-3 run without
    a pipeline whose rank 1 is killed inside a save (resumed in `faults`' last launch). Returns the
    folder: logs/ holds each run's output."""
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
    work = (tmp, micro_data, micro_model)
    plan += [sequence_run("two_stages", train_argv(work, "two_stages", 2, 2, 4)),
             sequence_run("two_dp", train_argv(work, "two_dp", 1, 2, 2)),  # the same global batch: 2 x 2 x 2 ranks
             sequence_run("full_bf16", train_argv(work, "full_bf16", 2, 2, 2, ds_extra=BF16)),
             sequence_run("part_bf16", train_argv(work, "part_bf16", 2, 2, 2, "--exit-interval", "3", ds_extra=BF16)),
             sequence_run("part_bf16_resume", train_argv(work, "part_bf16", 2, 2, 2, "--load", str(tmp / "part_bf16"),
                                                      ds_extra=BF16)),
             # test_checkpoint.py resumes these on 1 replica (DeepSpeed's ZeRO load refuses the bf16 one)
             sequence_run("bf16_dp2", train_argv(work, "bf16_dp2", 1, 2, 1, "--exit-interval", "3", ds_extra=BF16)),
             sequence_run("fp32_dp2", train_argv(work, "fp32_dp2", 1, 2, 1, "--exit-interval", "3")),
             # test_checkpoint.py: parameters of 33 values, which 2 ranks do not divide, moved onto ZeRO-3
             sequence_run("odd_full", train_argv(work, "odd_full", 1, 2, 1, *ODD)),
             sequence_run("odd_dp2", train_argv(work, "odd_dp2", 1, 2, 1, *ODD, "--exit-interval", "3")),
             sequence_run("odd_zero3", train_argv(work, "odd_zero3", 0, 2, 1, *ODD, "--load", str(tmp / "odd_dp2"),
                                                  "--save", str(tmp / "odd_dp2"), ds_extra=ZERO3)),
             sequence_run("offload", train_argv(work, "offload", 2, 2, 4, "--save-interval", "2", "--exit-interval", "3",
                                             ds_extra=OFFLOAD)),
             sequence_run("offload_resume", train_argv(work, "offload", 2, 2, 4, "--load", str(tmp / "offload"),
                                                    ds_extra=OFFLOAD)),
             sequence_run("bad_flag", train_argv(work, "bad_flag", 2, 2, 2, "--lr-decay", "5")),
             sequence_run("zero3", train_argv(work, "zero3", 0, 2, 2, "--save-interval", "2", ds_extra=ZERO3),
                       fault="kill,save,4,1")]
    result = launch_sequence(2, plan, tmp / "logs")
    unfinished = [run["name"] for run in plan[:-1] if sequence_code(tmp / "logs", run["name"]) is None]
    assert result.returncode != 0 and not unfinished, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp


# Room for a fault run's small files, not for a 2-stage checkpoint: the save fails halfway, inside
# torch's writer on both ranks.
FULL_DISK_KIB = 400


@pytest.fixture(scope="session")
def faults(tmp_path_factory, two_ranks):
    """The faults of test_reliability.py that need the launcher, in three launches:
    - the uninterrupted run, SIGTERM to rank 1 (sent by the rank itself at iteration 3), a disk that
      fills during a save (where a tmpfs can be mounted) and a kill -9 of rank 1 inside a checkpoint
      write, which ends the launch;
    - kill -9 of the whole process group from outside, runner included;
    - the resumes of the three and of two_ranks' ZeRO-3 run (test_train.py), a resume of a copy of the
      uninterrupted run with a damaged file that rank 1 checks, then rank 1 raising at iteration 3,
      which ends that launch.
    Returns the folder: runs/NAME holds each run, logs_first/ and logs_resumed/ the sequences' logs,
    and the result of each launch from outside (code and output) is in launches.json."""
    tmp = tmp_path_factory.mktemp("faults_launched")
    work = run_files(tmp)
    runs = tmp / "runs"
    disk = tmp / "small_disk"
    full_disk_skipped = mount_tmpfs(disk, FULL_DISK_KIB)
    first = [run_step(work, "full", runs / "full"),
             run_step(work, "sigterm", runs / "sigterm", fault="term,step,3,1")]
    if not full_disk_skipped:
        first.append(sequence_run("full_disk", fault_args(work, disk / "run", 2, 2, "--save-interval", "2")))
    first.append(run_step(work, "kill_in_save", runs / "kill_in_save", fault="kill,save,4,1"))
    try:
        result = launch_sequence(2, first, tmp / "logs_first")
        # what the failed save left on the full disk, read before the tmpfs goes
        full_disk_left = sorted(p.name for p in (disk / "run").iterdir()) if not full_disk_skipped else []
    finally:
        if not full_disk_skipped:
            unmount(disk)
    launches = {"first": result.returncode, "full_disk_skipped": full_disk_skipped, "full_disk_left": full_disk_left}
    code, out = faulted_run(work, runs / "kill9", until="iter      5 |",
                            fault=lambda proc: os.killpg(proc.pid, signal.SIGKILL))
    launches["kill9"] = {"code": code, "out": out}
    # What each fault left, before the resumes write over it.
    for name in ("sigterm", "kill_in_save", "kill9", "zero3"):
        run = two_ranks / name if name == "zero3" else runs / name
        launches.setdefault(name, {}).update(latest=(run / "latest").read_text(),
                                             checkpoints={p.name: (p / MANIFEST).exists() for p in run.glob("iter_*")})
    train_work = (two_ranks, two_ranks / "micro_data", two_ranks / "micro_model.yaml")
    resumes = [sequence_run("zero3_resume", train_argv(train_work, "zero3", 0, 2, 2, "--load", str(two_ranks / "zero3"),
                                                    ds_extra=ZERO3))]
    resumes += [run_step(work, name, runs / name, "--load", str(runs / name)) for name in ("sigterm", "kill_in_save", "kill9")]
    shutil.copytree(runs / "full", runs / "damaged")
    # The second file in name order: rank 1's to check (checkpoint.load gives rank r every r-th of 2).
    damaged = sorted((runs / "damaged" / f"iter_{ITERS:07d}").glob("*.pt"))[1]
    damaged.write_bytes(damaged.read_bytes()[:-100] + bytes(100))  # the same size: the manifest cannot tell
    launches["damaged_file"] = damaged.name
    resumes.append(run_step(work, "damaged", runs / "damaged", "--load", str(runs / "damaged")))
    resumes.append(run_step(work, "raises", runs / "raises", fault="raise,step,3,1"))
    result = launch_sequence(2, resumes, tmp / "logs_resumed")
    ended = time.time()
    launches["resumed"] = {"code": result.returncode, "out": result.stdout + result.stderr,
                           "raise_seconds": ended - (tmp / "logs_resumed" / "kill9.rank0.code").stat().st_mtime}
    (tmp / "launches.json").write_text(json.dumps(launches))
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
