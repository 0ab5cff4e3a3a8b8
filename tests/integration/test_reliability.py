"""The launcher and subprocess half of tests.unit.training.test_reliability."""
import os
import signal
import subprocess
import time

import psutil
import pytest

from gptx.parallel.engine import release_shared_memory
from gptx.training.checkpoint import MANIFEST
from tests.helpers.runs import launch, launcher_command, read_metrics, train_losses
from tests.unit.training.test_reliability import CURRICULUM, ITERS, args, small_fs, work  # noqa: F401 (fixtures)


def popen(work, run_args, env=None):
    cmd, full_env, port = launcher_command(2, run_args, env=env)
    proc = subprocess.Popen(cmd, cwd=work[0], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=full_env, start_new_session=True)
    return proc, port


def read_until(proc, needle, timeout=120) -> str:
    seen, start = [], time.time()
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return "".join(seen)
        assert time.time() - start < timeout, "".join(seen)[-3000:]
    raise AssertionError("".join(seen)[-3000:])


def rank_pid(proc, local_rank: int) -> int:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            command = " ".join(child.cmdline())
        except psutil.Error:  # another rank that has just exited
            continue
        if f"--local_rank={local_rank}" in command:
            return child.pid
    raise AssertionError("rank process not found")


@pytest.fixture(scope="module")
def full_run(work):
    run = work[0] / "full"
    result = launch(2, args(work, run, 2, ITERS, "--save-interval", "2", *CURRICULUM), cwd=work[0])
    assert result.returncode == 0, result.stdout[-3000:]
    assert "iter      7 | sequence length 32" in result.stdout and "iter      9 | batch size 4 sequences" in result.stdout
    return train_losses(run)


def resume_and_compare(work, run, full_losses, expect_from: int):
    result = launch(2, args(work, run, 2, ITERS, "--save-interval", "2", *CURRICULUM, "--load", str(run)), cwd=work[0])
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"iter_{expect_from:07d}: iteration {expect_from}" in result.stdout
    # The losses of the resumed iterations equal the uninterrupted run's.
    resumed = {r["iter"]: r["loss"] for r in read_metrics(run) if "loss" in r and r["iter"] > expect_from}
    assert resumed == {i: full_losses[i] for i in range(expect_from + 1, ITERS + 1)}


def faulted_run(work, run, env=None, until=None, fault=None, extra=()) -> tuple[int, str]:
    """A 2-stage run under the real launcher; `fault(proc)` once a line containing `until` is out."""
    proc, port = popen(work, args(work, run, 2, ITERS, "--save-interval", "2", *CURRICULUM, *extra), env)
    try:
        out = read_until(proc, until) if until else ""
        if fault:
            fault(proc)
        out += proc.stdout.read()
        return proc.wait(timeout=150), out
    finally:
        release_shared_memory(port)


def test_sigterm_to_one_rank_stops_all_with_a_checkpoint_and_exit_0(work, full_run):
    run = work[0] / "sigterm"
    code, out = faulted_run(work, run, until="iter      3 |",
                            fault=lambda proc: os.kill(rank_pid(proc, 1), signal.SIGTERM))
    assert code == 0, out[-3000:]
    stopped_at = int(out.split("stopped by SIGTERM at iteration ")[1].split(";")[0])
    assert stopped_at < ITERS and (run / "latest").read_text() == f"iter_{stopped_at:07d}"
    resume_and_compare(work, run, full_run, stopped_at)


def test_ctrl_c_stops_every_rank_with_a_checkpoint(work):
    """Ctrl-C in a terminal: SIGINT to the whole process group, DeepSpeed's runner included."""
    run = work[0] / "ctrl_c"
    code, out = faulted_run(work, run, until="iter      3 |", fault=lambda proc: os.killpg(proc.pid, signal.SIGINT))
    stopped_at = int(out.split("stopped by SIGINT at iteration ")[1].split(";")[0])
    assert stopped_at < ITERS and (run / "latest").read_text() == f"iter_{stopped_at:07d}"
    assert "rank 0: received SIGINT" in out and "rank 1: received SIGINT" in out
    # Not gptx's code: DeepSpeed's runner dies of the signal (its own KeyboardInterrupt), or, when
    # its child launcher exits first ("Main process received SIGINT, exiting"), passes on its 1.
    assert code in (-signal.SIGINT, 1), out[-3000:]


def test_kill_9_of_everything_loses_only_the_iterations_since_the_last_checkpoint(work, full_run):
    run = work[0] / "kill9"
    code, out = faulted_run(work, run, until="iter      5 |", fault=lambda proc: os.killpg(proc.pid, signal.SIGKILL))
    assert code == -signal.SIGKILL
    latest = int((run / "latest").read_text().split("_")[1])
    assert latest >= 4
    resume_and_compare(work, run, full_run, latest)


def test_kill_9_during_a_checkpoint_write_is_never_loaded(work, full_run):
    run = work[0] / "kill_in_save"
    code, out = faulted_run(work, run, env={"GPTX_FAULT": "kill,save,4,1"})
    assert code != 0, out[-3000:]
    assert (run / "iter_0000004").is_dir() and not (run / "iter_0000004" / MANIFEST).exists()
    assert (run / "latest").read_text() == "iter_0000002"
    resume_and_compare(work, run, full_run, 2)


def test_a_rank_that_raises_ends_the_whole_run_quickly(work):
    start = time.time()
    code, out = faulted_run(work, work[0] / "raises", env={"GPTX_FAULT": "raise,step,3,1"})
    assert code != 0 and "injected fault at step of iteration 3 on rank 1" in out
    assert time.time() - start < 90  # the other rank does not wait for it forever
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                   for p in psutil.Process().children(recursive=True))


def test_a_hung_rank_times_out_the_others_instead_of_blocking_forever(work):
    start = time.time()
    timed_out = "error: rank 0: a collective waited train.dist_timeout = 5 s for the other ranks"

    def end_the_hung_rank(proc):
        # Rank 0 has timed out and exits; DeepSpeed's launcher would now give the hung rank 30 s
        # after its SIGTERM before a SIGKILL (launcher behaviour, not gptx's): the test sends it.
        try:
            os.kill(rank_pid(proc, 1), signal.SIGKILL)
        except ProcessLookupError:
            pass
    code, out = faulted_run(work, work[0] / "hangs", env={"GPTX_FAULT": "hang,step,3,1"}, until=timed_out,
                            fault=end_the_hung_rank, extra=["--dist-timeout", "5"])
    assert code != 0
    assert timed_out in out, out[-3000:]
    assert time.time() - start < 100


def test_a_disk_that_fills_during_a_save_is_one_line_from_every_rank(work, small_fs):
    # Room for the run's small files, not for a 2-stage checkpoint: the save fails halfway,
    # inside torch's writer on both ranks.
    run = small_fs("full", 400) / "run"
    result = launch(2, args(work, run, 2, 2, "--save-interval", "2"), cwd=work[0])
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "warning: checkpoint iter_0000002 needs about" in out
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1, out[-3000:]
    assert (f"could not write checkpoint iter_0000002 to {run}: No space left on device" in errors[0]
            and f"no checkpoint was completed in {run}" in errors[0] and "bytes needed, " in errors[0])
    assert "Traceback" not in out and "unexpected pos" not in out, out[-3000:]
    assert "exits with return code = 2" in out  # a rank's own exit, not the launcher's kill
    assert not (run / "iter_0000002").exists() and not (run / "latest").exists()
