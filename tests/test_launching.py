"""How launch/pretrain.py starts: under the launcher with its port taken, and without a launcher."""
import os
import socket
import subprocess
import sys
from datetime import timedelta

import pytest

from gptx.engine import release_shared_memory
from gptx.launching import PortInUse, port_in_use
from tests.conftest import REPO, free_port, launcher_command, pretrain_args, run_files

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def listening_socket() -> socket.socket:
    """A port held the way another run's rendezvous holds it: listening on all interfaces."""
    s = socket.socket()
    s.bind(("", 0))
    s.listen()
    return s


def test_torchs_error_for_a_taken_port_becomes_one_line(monkeypatch):
    """The text torch raises for a taken port (not one made up here) is recognised."""
    from torch.distributed import TCPStore
    with listening_socket() as held:
        port = held.getsockname()[1]
        monkeypatch.setenv("MASTER_PORT", str(port))
        with pytest.raises(Exception) as caught:
            TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
    failure = port_in_use(caught.value)
    assert isinstance(failure, PortInUse), caught.value
    assert str(failure).startswith(f"port {port} is in use (another run on this machine?): give the launcher "
                                   f"--master_port N, e.g. deepspeed --master_port "), failure
    assert port_in_use(RuntimeError("Connection closed by peer")) is None


@pytest.mark.launcher
def test_a_second_run_on_a_taken_port_is_one_line_from_the_launcher(tmp_path):
    tmp, data, model, ds = run_files(tmp_path)
    cmd, env, _ = launcher_command(2, pretrain_args(data, model, ds, tmp / "run", 2, 2))
    with listening_socket() as held:
        port = str(held.getsockname()[1])
        cmd[cmd.index("--master_port") + 1] = port
        try:
            out = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=180, env=env)
        finally:
            release_shared_memory(port)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    line = (f"error: port {port} is in use (another run on this machine?): give the launcher --master_port N, "
            f"e.g. deepspeed --master_port ")
    assert text.count(line) == 1, text
    assert "--num_gpus 2 launch/pretrain.py" in text, text
    assert "Traceback" not in text and "DistNetworkError" not in text, text
    assert not (tmp / "run").exists()  # stopped before anything was written


def plain_python(args: list[str], cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    """launch/pretrain.py as `python launch/pretrain.py`: no launcher, none of its variables."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_python_launch_pretrain_trains_one_stage_in_one_process_and_resumes(tmp_path):
    tmp, data, model, ds = run_files(tmp_path)
    run = tmp / "run"
    first = plain_python(pretrain_args(data, model, ds, run, 1, 2, "--lr-decay-iters", "3"), tmp)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "pipeline: 1 stage(s) x 1 data-parallel" in first.stdout, first.stdout
    assert "done: 2 iterations" in first.stdout, first.stdout
    assert "resuming" not in first.stdout, first.stdout  # a new run resumes nothing
    assert "mpi4py" not in first.stderr, first.stderr
    again = plain_python(pretrain_args(data, model, ds, run, 1, 3, "--lr-decay-iters", "3", "--load", str(run)),
                         tmp)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming at sample 8 (epoch 0)" in again.stdout, again.stdout  # 2 steps of 2 x 2 sequences


def test_python_launch_pretrain_with_two_stages_names_the_launcher(tmp_path):
    out = plain_python([], tmp_path, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: 2 pipeline stages need 2 processes: run deepspeed --num_gpus 2 launch/pretrain.py, "
                      "or --pipe-parallel-size 1"], out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("variables, launched", [
    ({}, False),
    ({"RANK": "0"}, True),  # deepspeed, torchrun
    ({"OMPI_COMM_WORLD_SIZE": "4"}, True),  # DeepSpeed's OpenMPI runner, mpirun
    ({"PMI_SIZE": "4"}, True),  # MPICH / Intel MPI
    ({"SLURM_NTASKS": "8"}, True),  # srun python launch/pretrain.py
    ({"SLURM_NTASKS": "1"}, False),  # one Slurm task: a single process, as without Slurm
])
def test_a_process_started_by_mpi_or_slurm_is_not_made_a_world_of_one(monkeypatch, variables, launched):
    # Without RANK, DeepSpeed discovers an MPI world itself; making such a process rank 0 of a
    # world of one would start N separate runs writing to one --save.
    from gptx.launching import WORLD_DISCOVERY_VARIABLES, single_process_env, under_launcher
    monkeypatch.setattr(os, "environ", dict(os.environ))  # single_process_env writes to it: a copy, restored after
    for name in ("RANK", "WORLD_SIZE", "MASTER_PORT", "SLURM_NTASKS", *WORLD_DISCOVERY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert under_launcher() is launched
    single_process_env()
    assert ("WORLD_SIZE" in os.environ) is (not launched)
