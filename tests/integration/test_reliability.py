"""The launcher and subprocess half of tests.unit.training.test_reliability."""
import json
import os
import signal
import time

import psutil
import pytest

from tests.helpers.faults import faulted_run, rank_pid
from tests.helpers.runs import sequence_code, sequence_output, train_losses
from tests.unit.training.test_reliability import ITERS, work  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def found(faults):
    """What the shared fault launches left (tests/integration/conftest.py), by run."""
    launches = json.loads((faults / "launches.json").read_text())
    first, resumed = faults / "logs_first", faults / "logs_resumed"
    for name in ("full", "sigterm"):
        assert sequence_code(first, name) == 0, sequence_output(first, name)[-3000:]
    full_out = sequence_output(first, "full")
    assert "iter      7 | sequence length 32" in full_out and "iter      9 | batch size 4 sequences" in full_out
    by_run = {"full": train_losses(faults / "runs" / "full"),
             "full_disk_skipped": launches["full_disk_skipped"],
             "full_disk": dict(out=sequence_output(first, "full_disk"), run=faults / "small_disk" / "run",
                               left=launches["full_disk_left"],
                               codes=sorted(int(p.read_text()) for p in first.glob("full_disk.rank*.code"))),
             "sigterm": dict(launches["sigterm"], out=sequence_output(first, "sigterm")),
             "kill_in_save": dict(launches["kill_in_save"], code=launches["first"],
                                  out=sequence_output(first, "kill_in_save")),
             "kill9": launches["kill9"],
             "raises": dict(code=launches["resumed"]["code"], seconds=launches["resumed"]["raise_seconds"],
                            # rank 1's traceback leaves the run's log as it leaves the rank
                            out=sequence_output(resumed, "raises") + launches["resumed"]["out"])}
    by_run["damaged"] = dict(out=sequence_output(resumed, "damaged"), file=launches["damaged_file"],
                             codes=sorted(int(p.read_text()) for p in resumed.glob("damaged.rank*.code")))
    for name in ("sigterm", "kill_in_save", "kill9"):
        out = sequence_output(resumed, name)
        assert sequence_code(resumed, name) == 0, out[-3000:]
        by_run[name].update(resumed_out=out, losses=train_losses(faults / "runs" / name))
    return by_run


def assert_resumed_exactly(found, name, expect_from: int):
    assert f"iter_{expect_from:07d}: iteration {expect_from}" in found[name]["resumed_out"]
    # The losses of the resumed iterations equal the uninterrupted run's.
    resumed = {i: loss for i, loss in found[name]["losses"].items() if i > expect_from}
    assert resumed == {i: found["full"][i] for i in range(expect_from + 1, ITERS + 1)}


def test_sigterm_to_one_rank_stops_all_with_a_checkpoint_and_exit_0(found):
    out = found["sigterm"]["out"]
    assert "rank 1: received SIGTERM" in out and "stopped by SIGTERM at iteration 3;" in out
    assert found["sigterm"]["latest"] == "iter_0000003"
    assert_resumed_exactly(found, "sigterm", 3)


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


def test_kill_9_of_everything_loses_only_the_iterations_since_the_last_checkpoint(found):
    assert found["kill9"]["code"] == -signal.SIGKILL
    latest = int(found["kill9"]["latest"].split("_")[1])
    assert latest >= 4
    assert_resumed_exactly(found, "kill9", latest)


def test_kill_9_during_a_checkpoint_write_is_never_loaded(found):
    killed = found["kill_in_save"]
    assert killed["code"] != 0, killed["out"][-3000:]
    assert killed["checkpoints"] == {"iter_0000002": True, "iter_0000004": False}
    assert killed["latest"] == "iter_0000002"
    assert_resumed_exactly(found, "kill_in_save", 2)


def test_a_rank_that_raises_ends_the_whole_run_quickly(found):
    """The last run of the resumes' launch: rank 1 raises at iteration 3."""
    raised = found["raises"]
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


def test_a_disk_that_fills_during_a_save_is_one_line_from_every_rank(found):
    if found["full_disk_skipped"]:
        pytest.skip(found["full_disk_skipped"])
    out, run = found["full_disk"]["out"], found["full_disk"]["run"]
    assert "warning: checkpoint iter_0000002 needs about" in out
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1, out[-3000:]
    assert (f"could not write checkpoint iter_0000002 to {run}: No space left on device" in errors[0]
            and f"no checkpoint was completed in {run}" in errors[0] and "bytes needed, " in errors[0])
    assert "Traceback" not in out and "unexpected pos" not in out, out[-3000:]
    assert found["full_disk"]["codes"] == [2, 2]  # every rank's own exit
    # The run's small files stay; the partial checkpoint folder went and no `latest` names it.
    assert "metrics.jsonl" in found["full_disk"]["left"], found["full_disk"]["left"]
    assert "iter_0000002" not in found["full_disk"]["left"] and "latest" not in found["full_disk"]["left"]


def test_a_damaged_file_rank_1_checks_is_one_line_from_it_and_every_rank_stops(found):
    """Rank 1 names the file (only rank 0 prints otherwise); rank 0 says another rank failed,
    instead of going on into a collective that rank 1 never joins."""
    out, name = found["damaged"]["out"], found["damaged"]["file"]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "Traceback" not in out, out[-3000:]
    assert any(f"{name}': a file cannot be read" in line for line in errors), errors
    assert any("another rank could not read its part (its line names the file)" in line for line in errors), errors
    assert found["damaged"]["codes"] == [2, 2]
