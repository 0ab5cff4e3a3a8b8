"""Two machines, tested on one: two DeepSpeed launchers started separately with --no_ssh, one
per "node" of one rank each, meet at a rendezvous on 127.0.0.1 as the nodes of a cluster meet
at node 0's address (issue 26, item 8). The hostfile names this machine twice (`localhost`
and `127.0.0.1`): under --no_ssh the launcher only counts its lines and their slots, and
--node_rank picks the line it is. docs/parallelism-and-memory.md gives the commands for a
real cluster.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from gptx.parallel.engine import release_shared_memory
from tests.helpers.runs import REPO, free_port, launch, pretrain_args, run_files, train_losses


ITERS = 6
# Dropout on, so the resume also needs each node's random streams back.
FLAGS = ("--eval-interval", "0", "--log-interval", "1", "--set", "dropout=0.1")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp, data, model, ds = run_files(tmp_path_factory.mktemp("multinode"))
    hostfile = tmp / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    return tmp, data, model, ds, hostfile


def args(work, save, iters, *extra):
    return pretrain_args(*work[1:4], save, 2, iters, *FLAGS, *extra)


class Nodes:
    """`deepspeed --hostfile H --no_ssh --node_rank N --master_addr 127.0.0.1 --master_port P
    launch/pretrain.py ...` for N = 0 and 1, each its own process group, as on two machines;
    each node's output goes to its own file."""

    def __init__(self, work, run_args, name):
        tmp, hostfile = work[0], work[4]
        beside_python = Path(sys.executable).parent / "deepspeed"
        launcher = str(beside_python) if beside_python.exists() else "deepspeed"
        self.port = str(free_port())
        # The two nodes share this machine's cores: without OMP_NUM_THREADS each rank, alone on
        # its node, would take all of them.
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        self.logs = [tmp / f"{name}.node{n}.log" for n in (0, 1)]
        self.procs = []
        for n, log in enumerate(self.logs):
            cmd = [launcher, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n),
                   "--master_addr", "127.0.0.1", "--master_port", self.port, str(REPO / "launch/pretrain.py"),
                   *run_args]
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(cmd, cwd=tmp, stdout=out, stderr=subprocess.STDOUT, env=env,
                                                   start_new_session=True))

    def output(self, n) -> str:
        return self.logs[n].read_text()

    def wait_for(self, n, needle, timeout=120):
        start = time.time()
        while needle not in self.output(n):
            assert self.procs[n].poll() is None and time.time() - start < timeout, self.output(n)[-3000:]
            time.sleep(0.1)

    def wait(self, timeout=150) -> list[int]:
        try:
            return [proc.wait(timeout=timeout) for proc in self.procs]
        finally:
            self.close()

    def close(self):
        for proc in self.procs:  # whatever is left of either node, after a failure
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        release_shared_memory(self.port)


def run_nodes(work, run_args, name) -> list[str]:
    nodes = Nodes(work, run_args, name)
    codes = nodes.wait()
    outputs = [nodes.output(0), nodes.output(1)]
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    for n, out in enumerate(outputs):  # DeepSpeed's launcher: two nodes of one process each
        assert f"nnodes=2, num_local_procs=1, node_rank={n}" in out, out[-3000:]
    return outputs


@pytest.fixture(scope="module")
def two_nodes(work):
    run = work[0] / "two_nodes"
    out, _ = run_nodes(work, args(work, run, ITERS, "--save-interval", "3"), "two_nodes")
    assert "pipeline: 2 stage(s) x 1 data-parallel" in out
    return run


def test_two_nodes_train_the_losses_of_one_node(work, two_nodes):
    one = work[0] / "one_node"
    result = launch(2, args(work, one, ITERS), cwd=work[0])
    assert result.returncode == 0, result.stdout[-3000:]
    losses = train_losses(two_nodes)
    assert sorted(losses) == list(range(1, ITERS + 1))
    assert losses == train_losses(one)  # exactly


def test_two_nodes_resume_exactly(work, two_nodes):
    resumed = work[0] / "resumed"
    out, _ = run_nodes(work, args(work, resumed, ITERS, "--load", str(two_nodes / "iter_0000003")), "resumed")
    assert f"resumed from {two_nodes / 'iter_0000003'}: iteration 3" in out
    full = train_losses(two_nodes)
    assert train_losses(resumed) == {i: full[i] for i in range(4, ITERS + 1)}


@pytest.mark.parametrize("dead", [1, 0], ids=["node 1 dies", "node 0 (the master) dies"])
def test_a_node_that_dies_takes_the_other_down_with_one_line(work, dead):
    nodes = Nodes(work, args(work, work[0] / f"dies{dead}", 100000), f"dies{dead}")
    survivor = 1 - dead
    try:
        nodes.wait_for(0, "iter      3 |")  # rank 0 prints the iterations
        start = time.time()
        os.killpg(nodes.procs[dead].pid, signal.SIGKILL)  # the node's launcher and its rank, as a machine lost
        code = nodes.procs[survivor].wait(timeout=120)
        took = time.time() - start
    finally:
        nodes.close()
    out = nodes.output(survivor)
    assert code == 2, out[-3000:]  # the rank's own exit, passed on by both launchers
    errors = [line for line in out.splitlines() if "error:" in line]
    assert errors == [f"error: rank {survivor}: another rank went away in the middle of a collective; "
                      f"its own output says why"], out[-3000:]
    assert "Traceback" not in out
    assert took < 60
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                   for p in psutil.Process().children(recursive=True))
