"""Runs of the fault tests (tests/unit/training/test_reliability.py's flags: 2 stages, a curriculum,
dropout) under the real launcher, with a fault from outside (a signal to a rank or to the whole
launch) or one a rank injects itself (GPTX_FAULT) inside a shared launch."""
import subprocess
import time

import psutil

from gptx.parallel.engine import release_shared_memory
from tests.helpers.runs import launcher_command, sequence_run
from tests.unit.training.test_reliability import CURRICULUM, ITERS, args


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
    """A fault test's 2-stage run (tests/unit/training/test_reliability.py's flags) under the real
    launcher; `fault(proc)` once a line containing `until` is out. Returns (exit code, output)."""
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
    """A fault test's run as a step of a shared launch (tests/helpers/command_sequence.py)."""
    return sequence_run(name, args(work, run, 2, ITERS, "--save-interval", "2", *CURRICULUM, *extra), fault)
