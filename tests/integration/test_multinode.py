"""Two machines, tested on one: two DeepSpeed launchers started separately with --no_ssh, one
per "node" of one rank each, meet at a rendezvous on 127.0.0.1 as the nodes of a cluster meet
at node 0's address (issue 26, item 8). The hostfile names this machine twice (`localhost`
and `127.0.0.1`): under --no_ssh the launcher only counts its lines and their slots, and
--node_rank picks the line it is. docs/parallelism-and-memory.md gives the commands for a
real cluster.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from gptx.parallel.engine import release_shared_memory
from tests.helpers.runs import REPO, free_port, pretrain_args, sequence_code, sequence_output, train_losses
from tests.integration.conftest import MULTINODE_FLAGS, MULTINODE_ITERS

ITERS, FLAGS = MULTINODE_ITERS, MULTINODE_FLAGS


@pytest.fixture(scope="module")
def work(tmp_path_factory, two_ranks):
    """The files of the shared 2-rank launch (tests/integration/conftest.py), whose run "one_node" is these
    runs on one node."""
    tmp = tmp_path_factory.mktemp("multinode")
    hostfile = tmp / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    return tmp, two_ranks / "micro_data", two_ranks / "micro_model.yaml", two_ranks / "ds.json", hostfile


def args(work, save, iters, *extra):
    return pretrain_args(*work[1:4], save, 2, iters, *FLAGS, *extra)


class Nodes:
    """`deepspeed --hostfile H --no_ssh --node_rank N --master_addr 127.0.0.1 --master_port P
    launch/pretrain.py ...` for N = 0 and 1, each its own process group, as on two machines;
    each node's output goes to its own file. `script` replaces launch/pretrain.py; `run_args` may
    also be one list of arguments per node."""

    def __init__(self, work, run_args, name, script="launch/pretrain.py"):
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
        per_node = run_args if isinstance(run_args[0], list) else [run_args, run_args]
        for n, log in enumerate(self.logs):
            cmd = [launcher, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n),
                   "--master_addr", "127.0.0.1", "--master_port", self.port, str(REPO / script), *per_node[n]]
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


@pytest.fixture(scope="module")
def two_nodes(work):
    """On two nodes: a run saving at iteration 3, then one resumed from there, in one start of the two
    launchers (tests/helpers/command_sequence.py)."""
    tmp = work[0]
    full, resumed = tmp / "two_nodes", tmp / "resumed"
    plan = [{"name": "two_nodes", "argv": args(work, full, ITERS, "--save-interval", "3")},
            {"name": "resumed", "argv": args(work, resumed, ITERS, "--load", str(full / "iter_0000003"))}]
    (tmp / "logs").mkdir()
    (tmp / "logs" / "plan.json").write_text(json.dumps(plan))
    nodes = Nodes(work, [str(tmp / "logs" / "plan.json")], "sequence", script="tests/helpers/command_sequence.py")
    codes = nodes.wait()
    outputs = [nodes.output(0), nodes.output(1)]
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    for n, out in enumerate(outputs):  # DeepSpeed's launcher: two nodes of one process each
        assert f"nnodes=2, num_local_procs=1, node_rank={n}" in out, out[-3000:]
    for name in ("two_nodes", "resumed"):
        assert sequence_code(tmp / "logs", name) == 0, sequence_output(tmp / "logs", name)[-3000:]
    assert "pipeline: 2 stage(s) x 1 data-parallel" in sequence_output(tmp / "logs", "two_nodes")
    return full, resumed


def test_two_nodes_train_the_losses_of_one_node(two_ranks, two_nodes):
    losses = train_losses(two_nodes[0])
    assert sorted(losses) == list(range(1, ITERS + 1))
    assert losses == train_losses(two_ranks / "one_node")  # exactly


def test_two_nodes_resume_exactly(work, two_nodes):
    full, resumed = two_nodes
    assert f"resumed from {full / 'iter_0000003'}: iteration 3" in sequence_output(work[0] / "logs", "resumed")
    losses = train_losses(full)
    assert train_losses(resumed) == {i: losses[i] for i in range(4, ITERS + 1)}


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


def test_a_node_missing_its_input_says_so_and_the_other_stops_at_its_timeout_in_one_line(work):
    # Paths are a node's own (a data disk not mounted there): before, node 1 exited without a word
    # and node 0 waited train.dist_timeout (30 minutes by default) to end in a DistStoreError traceback.
    run, missing = work[0] / "half_started", work[0] / "not_mounted"
    node0 = args(work, run, 4, "--dist-timeout", "10")
    node1 = [str(missing) if a == str(work[1]) else a for a in node0]
    nodes = Nodes(work, [node0, node1], "half_started")
    codes = nodes.wait(timeout=120)
    outputs = [nodes.output(0), nodes.output(1)]
    assert codes[0] != 0 and codes[1] != 0, outputs
    assert [line for line in outputs[1].splitlines() if "error:" in line] == [
        f"error: rank 1 (the first on its node): --data '{missing}': not a directory (train.bin, val.bin, meta.json) "
        f"or a mixture file (.yaml)"], outputs[1][-3000:]
    assert [line for line in outputs[0].splitlines() if "error:" in line] == [
        "error: rank 0: 1 of 2 ranks came to the start within train.dist_timeout = 10 s; the others stopped before "
        f"it (their own output says why) or cannot reach 127.0.0.1:{nodes.port}"], outputs[0][-3000:]
    assert "Traceback" not in outputs[0] + outputs[1]
