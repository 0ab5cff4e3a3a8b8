"""The launcher and subprocess half of tests.unit.training.test_reliability."""
import os
import signal
import subprocess
import time

import psutil
import pytest

from gptx.parallel.engine import release_shared_memory
from gptx.training.checkpoint import MANIFEST
from tests.helpers.runs import (launch_sequence, launcher_command, mount_tmpfs, sequence_code, sequence_output,
                                train_losses, unmount)
from tests.unit.training.test_reliability import CURRICULUM, ITERS, args, work  # noqa: F401 (fixtures)


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


def run_step(work, name, run, *extra, fault=None):
    return {"name": name, "argv": args(work, run, 2, ITERS, "--save-interval", "2", *CURRICULUM, *extra),
            "env": {"GPTX_FAULT": fault} if fault else {}}


# Room for the run's small files, not for a 2-stage checkpoint: the save fails halfway, inside
# torch's writer on both ranks.
FULL_DISK_KIB = 400


@pytest.fixture(scope="module")
def faults(work):
    """The faults that need the launcher, in three launches (tests/helpers/command_sequence.py):
    - the uninterrupted run, then SIGTERM to rank 1 (sent by the rank itself at iteration 3), a disk
      that fills during a save (where a tmpfs can be mounted) and a kill -9 of rank 1 inside a
      checkpoint write, which ends the launch;
    - kill -9 of the whole process group from outside, runner included;
    - the three resumes, then rank 1 raising at iteration 3, which ends that launch.
    What each fault left is recorded before the resumes write over it."""
    tmp = work[0]
    runs = {name: tmp / name for name in ("full", "sigterm", "kill_in_save", "kill9")}
    disk = tmp / "small_disk"
    found = {"full_disk_skipped": mount_tmpfs(disk, FULL_DISK_KIB)}
    first = [run_step(work, "full", runs["full"]), run_step(work, "sigterm", runs["sigterm"], fault="term,step,3,1")]
    if not found["full_disk_skipped"]:
        first.append({"name": "full_disk", "env": {},
                      "argv": args(work, disk / "run", 2, 2, "--save-interval", "2")})
    first.append(run_step(work, "kill_in_save", runs["kill_in_save"], fault="kill,save,4,1"))
    try:
        result = launch_sequence(2, first, tmp / "logs_first")
    finally:
        if not found["full_disk_skipped"]:
            unmount(disk)
    logs = tmp / "logs_first"
    for name in ("full", "sigterm"):
        assert sequence_code(logs, name) == 0, sequence_output(logs, name)[-3000:]
    full_out = sequence_output(logs, "full")
    assert "iter      7 | sequence length 32" in full_out and "iter      9 | batch size 4 sequences" in full_out
    found["full"] = train_losses(runs["full"])
    found["sigterm"] = dict(out=sequence_output(logs, "sigterm"))
    found["full_disk"] = dict(out=sequence_output(logs, "full_disk"), run=disk / "run",
                              codes=sorted(int(p.read_text()) for p in logs.glob("full_disk.rank*.code")))
    found["kill_in_save"] = dict(code=result.returncode, out=sequence_output(logs, "kill_in_save"))
    found["kill9"] = dict(zip(("code", "out"), faulted_run(
        work, runs["kill9"], until="iter      5 |", fault=lambda proc: os.killpg(proc.pid, signal.SIGKILL))))
    faulted = ("sigterm", "kill_in_save", "kill9")
    for name in faulted:  # before the resumes write over it
        found[name].update(latest=(runs[name] / "latest").read_text(),
                           checkpoints={p.name: (p / MANIFEST).exists() for p in runs[name].glob("iter_*")})
    logs = tmp / "logs_resumed"
    raises = dict(run_step(work, "raises", tmp / "raises"), env={"GPTX_FAULT": "raise,step,3,1"})
    result = launch_sequence(2, [run_step(work, name, runs[name], "--load", str(runs[name])) for name in faulted]
                             + [raises], logs)
    ended = time.time()
    for name in faulted:
        out = sequence_output(logs, name)
        assert sequence_code(logs, name) == 0, out[-3000:]
        found[name].update(resumed_out=out, losses=train_losses(runs[name]))
    # The launch's own output holds rank 1's traceback: it leaves the run's log as it leaves the rank.
    found["raises"] = dict(code=result.returncode, out=sequence_output(logs, "raises") + result.stdout + result.stderr,
                           seconds=ended - (logs / f"{faulted[-1]}.rank0.code").stat().st_mtime)
    return found


def assert_resumed_exactly(faults, name, expect_from: int):
    assert f"iter_{expect_from:07d}: iteration {expect_from}" in faults[name]["resumed_out"]
    # The losses of the resumed iterations equal the uninterrupted run's.
    resumed = {i: loss for i, loss in faults[name]["losses"].items() if i > expect_from}
    assert resumed == {i: faults["full"][i] for i in range(expect_from + 1, ITERS + 1)}


def test_sigterm_to_one_rank_stops_all_with_a_checkpoint_and_exit_0(faults):
    out = faults["sigterm"]["out"]
    assert "rank 1: received SIGTERM" in out and "stopped by SIGTERM at iteration 3;" in out
    assert faults["sigterm"]["latest"] == "iter_0000003"
    assert_resumed_exactly(faults, "sigterm", 3)


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


def test_kill_9_of_everything_loses_only_the_iterations_since_the_last_checkpoint(faults):
    assert faults["kill9"]["code"] == -signal.SIGKILL
    latest = int(faults["kill9"]["latest"].split("_")[1])
    assert latest >= 4
    assert_resumed_exactly(faults, "kill9", latest)


def test_kill_9_during_a_checkpoint_write_is_never_loaded(faults):
    killed = faults["kill_in_save"]
    assert killed["code"] != 0, killed["out"][-3000:]
    assert killed["checkpoints"] == {"iter_0000002": True, "iter_0000004": False}
    assert killed["latest"] == "iter_0000002"
    assert_resumed_exactly(faults, "kill_in_save", 2)


def test_a_rank_that_raises_ends_the_whole_run_quickly(faults):
    """The last run of the resumes' launch: rank 1 raises at iteration 3."""
    raised = faults["raises"]
    assert raised["code"] != 0 and "injected fault at step of iteration 3 on rank 1" in raised["out"]
    assert raised["seconds"] < 90  # the other rank does not wait for it forever
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


def test_a_disk_that_fills_during_a_save_is_one_line_from_every_rank(faults):
    if faults["full_disk_skipped"]:
        pytest.skip(faults["full_disk_skipped"])
    out, run = faults["full_disk"]["out"], faults["full_disk"]["run"]
    assert "warning: checkpoint iter_0000002 needs about" in out
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1, out[-3000:]
    assert (f"could not write checkpoint iter_0000002 to {run}: No space left on device" in errors[0]
            and f"no checkpoint was completed in {run}" in errors[0] and "bytes needed, " in errors[0])
    assert "Traceback" not in out and "unexpected pos" not in out, out[-3000:]
    assert faults["full_disk"]["codes"] == [2, 2]  # every rank's own exit
    assert not (run / "iter_0000002").exists() and not (run / "latest").exists()
