"""Multi-process training under the real deepspeed launcher (CPU, gloo)."""
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from gptx.cli.pretrain import run_pretrain
from tests.helpers.runs import (REPO, make_token_dir, read_metrics, sequence_code, sequence_output, train_losses,
                                write_ds_config, write_model_yaml)

ITERS = 6
PARITY_TOL = 1e-5


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    data = make_token_dir(tmp / "data")
    model = write_model_yaml(tmp / "model.yaml")
    return tmp, data, model


BF16 = dict(bf16={"enabled": True}, zero_optimization={"stage": 1}, data_types={"grad_accum_dtype": "fp32"})
ZERO3 = dict(zero_optimization={"stage": 3})
OFFLOAD = dict(zero_optimization={"stage": 1, "offload_optimizer": {"device": "cpu"}},
               optimizer={"type": "AdamW", "params": {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}})


def argv(work, name, pipe, micro, accum, *extra, ds_extra=None):
    tmp, data, model = work
    ds = write_ds_config(tmp / f"{name}.json", micro=micro, accum=accum, **(ds_extra or {}))
    return ["--model", str(model), "--data", str(data), "--deepspeed_config", str(ds),
            "--save", str(tmp / name), "--pipe-parallel-size", str(pipe), "--train-iters", str(ITERS),
            "--eval-interval", "3", "--eval-iters", "2", "--log-interval", "1", "--lr", "3e-3", "--warmup-iters", "2",
            *extra]


@dataclass
class Run:
    dir: Path
    out: str  # every rank's console output
    code: int | None  # the largest of the ranks that finished it; None: none did


@pytest.fixture(scope="module")
def runs(two_ranks, faults):
    """This file's 2-rank runs, in the shared launches (tests/integration/conftest.py): the ZeRO-3 run
    killed at the end of two_ranks, resumed in the faults' last launch."""
    found = {}
    for name in ("two_stages", "two_dp", "full_bf16", "part_bf16", "part_bf16_resume", "offload", "offload_resume",
                 "bad_flag", "zero3"):
        found[name] = Run(two_ranks / name, sequence_output(two_ranks / "logs", name),
                          sequence_code(two_ranks / "logs", name))
    found["zero3_resume"] = Run(two_ranks / "zero3", sequence_output(faults / "logs_resumed", "zero3_resume"),
                                sequence_code(faults / "logs_resumed", "zero3_resume"))
    for name, run in found.items():
        if name not in ("bad_flag", "zero3"):
            assert run.code == 0, run.out[-3000:]
    return found


@pytest.fixture(scope="module")
def one_stage(work, dist_world1):
    """The reference: one stage in this process."""
    assert run_pretrain(argv(work, "one_stage", 1, 2, 4)) == 0
    return work[0] / "one_stage"


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() == set(range(1, ITERS + 1))
    return max(abs(a[k] - b[k]) for k in a)


def test_two_stages_match_one_stage_and_loss_falls(one_stage, runs):
    two_stages = runs["two_stages"].dir
    a, b = train_losses(one_stage), train_losses(two_stages)
    assert max_diff(a, b) < PARITY_TOL
    assert b[ITERS] < b[1] - 0.1
    val_a = [r["val_loss"] for r in read_metrics(one_stage) if "val_loss" in r]
    val_b = [r["val_loss"] for r in read_metrics(two_stages) if "val_loss" in r]
    assert len(val_a) == len(val_b) == 2 and max(abs(x - y) for x, y in zip(val_a, val_b)) < PARITY_TOL


def test_two_data_parallel_ranks_match_one_stage(one_stage, runs):
    assert max_diff(train_losses(one_stage), train_losses(runs["two_dp"].dir)) < PARITY_TOL


def test_each_stage_builds_only_its_layers_and_tied_weights_stay_equal(runs):
    run_dir, out = runs["two_stages"].dir, runs["two_stages"].out
    stage_lines = [line for line in out.splitlines() if line.strip().startswith("stage ") and "parameters" in line]
    assert len(stage_lines) == 2 and "stage 1: layers 4-7" in out
    saves = [r for r in read_metrics(run_dir) if "checkpoint" in r]
    assert saves and all(r["tied_weight_max_diff"] == 0.0 for r in saves)


def test_bf16_resume_is_exact(runs):
    # bf16's optimizer state lives in other files than fp32's. (fp32 with dropout resumes exactly
    # after each fault of tests/unit/training/test_reliability.py, on 2 stages too.)
    full, part = runs["full_bf16"].dir, runs["part_bf16"].dir
    assert "exit interval 3 reached at iteration 3" in runs["part_bf16"].out
    assert "resumed from" in runs["part_bf16_resume"].out
    resumed = train_losses(part)
    assert resumed == train_losses(full), (resumed, train_losses(full))


def test_no_pipeline_zero3_on_two_ranks_matches_two_stages_and_resumes(runs, faults):
    """--pipe-parallel-size 0: the whole model under DeepSpeed's plain engine, 2 data-parallel
    ranks with ZeRO-3 on the same global batches as 2 stages x 4 micro-batches. Rank 1 is
    killed (SIGKILL) while it writes its ZeRO-3 shards at iteration 4: that checkpoint is never
    loaded, and the run resumes from iteration 2."""
    two_stages, killed = runs["two_stages"].dir, runs["zero3"]
    part = killed.dir
    left = json.loads((faults / "launches.json").read_text())["zero3"]  # before the resume
    assert killed.code != 0 and left["latest"] == "iter_0000002"
    assert left["checkpoints"] == {"iter_0000002": True, "iter_0000004": False}
    assert "no pipeline: the whole model x 2 data-parallel, cpu, fp32, ZeRO-3" in killed.out
    assert "iter_0000002: iteration 2" in runs["zero3_resume"].out
    assert max_diff(train_losses(two_stages), train_losses(part)) < PARITY_TOL
    # iteration 3's evaluation ran before the kill and again after the resume: the last one counts
    val_a = {r["iter"]: r["val_loss"] for r in read_metrics(two_stages) if "val_loss" in r}
    val_b = {r["iter"]: r["val_loss"] for r in read_metrics(part) if "val_loss" in r}
    assert val_a.keys() == val_b.keys() == {3, 6} and max(abs(val_a[i] - val_b[i]) for i in val_a) < PARITY_TOL
    # The tools read its checkpoint like a pipeline's: the layer files gathered from the shards.
    import torch

    from gptx.training.consolidate import load_plain_model
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    a, _ = load_plain_model(two_stages)
    b, _ = load_plain_model(part)
    assert (a(ids) - b(ids)).abs().max().item() < 1e-4


def test_two_stages_with_optimizer_offload_match_and_resume(runs):
    """ZeRO-1 with the optimizer on the host (DeepSpeedCPUAdam) through 2 pipeline stages, stopped
    at iteration 3 (--exit-interval) and resumed from its checkpoint there."""
    stopped = runs["offload"]
    assert "exit interval 3 reached at iteration 3" in stopped.out
    assert "ZeRO-1, optimizer offloaded to cpu" in stopped.out
    assert "iter_0000003: iteration 3" in runs["offload_resume"].out
    assert max_diff(train_losses(runs["two_stages"].dir), train_losses(stopped.dir)) < PARITY_TOL


def test_launcher_reports_bad_input_in_one_line(runs):
    # a flag that does not exist, on both ranks of a launch
    bad = runs["bad_flag"]
    assert bad.code == 2
    errors = [line for line in bad.out.splitlines() if line.startswith("error:")]
    assert errors == ["error: unrecognized arguments: --lr-decay 5 (see launch/pretrain.py --help)"]
    assert "Traceback" not in bad.out and "usage:" not in bad.out  # not argparse's usage once per rank


def test_a_two_stage_run_keeps_deepspeeds_noise_off_the_console(runs):
    out = runs["two_stages"].out
    # gptx/parallel/engine.py, defect 7: without the workaround every rank prints torch's multi-line warning.
    assert "c10d::broadcast_" not in out
    # DeepSpeed's start-up prints (shown with --ds-log-level info); gptx's lines say it with counts.
    assert "SEED_LAYERS" not in out and "Using topology" not in out and "built successfully" not in out
    assert "model.yaml': 4 layers, 2 heads, width 32, context 32, vocabulary 256; GPT-2 architecture" in out


def test_a_run_says_how_long_it_will_take(runs):
    run_dir, out = runs["two_stages"].dir, runs["two_stages"].out
    # The pace is taken from iteration 1's end (its warm-up left out) over 3 iterations, so the estimate
    # appears at iteration 4, once, and the console line carries it from then on.
    assert out.count(f"estimated time to iteration {ITERS}:") == 1
    lines = {int(l.split("iter")[1].split("|")[0]): l for l in out.splitlines() if "| loss " in l}
    assert [i for i in sorted(lines) if "ETA" in lines[i]] == list(range(4, ITERS + 1))
    etas = [r["eta_s"] for r in read_metrics(run_dir) if "loss" in r]
    assert etas[:3] == [None] * 3 and etas[-1] == 0 and all(e > 0 for e in etas[3:-1])


MEMORY_KEPT_AFTER_A_FREE = """
import os, sys, torch
if sys.argv[1] == "keep":
    from gptx.parallel.host import keep_freed_memory
    assert keep_freed_memory()
def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
before = resident_mib()
t = torch.ones(25_000_000)  # 100 MB, written: every page resident
held = resident_mib()
del t
print(held - before, resident_mib() - before)
"""


@pytest.mark.parametrize("mode", ["keep", "default"])
def test_kept_freed_memory_stays_in_the_process_for_the_next_iterations_tensors(mode):
    """Under keep_freed_memory a freed 100 MB tensor's pages stay in the process's heap, where the
    next tensors are served from without faulting pages in; by default glibc unmaps them on free.
    (Which later allocation reuses them depends on the heap's layout, so the test asserts the
    pages kept, not a fault count.)"""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", MEMORY_KEPT_AFTER_A_FREE, mode], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    held, after_free = map(float, out.split()[-2:])
    assert held > 90, out
    assert after_free > 90 if mode == "keep" else after_free < 10, out
