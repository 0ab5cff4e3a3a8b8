"""How launch/pretrain.py starts: under the launcher with its port taken, and without a launcher."""
import os
import socket
from datetime import timedelta

import pytest

from gptx.parallel.launching import PortInUse, port_in_use

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
    from gptx.parallel.launching import WORLD_DISCOVERY_VARIABLES, single_process_env, under_launcher
    monkeypatch.setattr(os, "environ", dict(os.environ))  # single_process_env writes to it: a copy, restored after
    for name in ("RANK", "WORLD_SIZE", "MASTER_PORT", "SLURM_NTASKS", *WORLD_DISCOVERY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert under_launcher() is launched
    single_process_env()
    assert ("WORLD_SIZE" in os.environ) is (not launched)


@pytest.mark.parametrize("flavour", [
    {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
     "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},  # deepspeed --launcher openmpi, mpirun
    {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},  # MPICH, Intel MPI
    {"MV2_COMM_WORLD_RANK": "3", "MV2_COMM_WORLD_SIZE": "4", "MV2_COMM_WORLD_LOCAL_RANK": "1",
     "MV2_COMM_WORLD_LOCAL_SIZE": "2"},
])
def test_an_mpi_launchers_ranks_are_known_before_the_run_is_planned(monkeypatch, flavour):
    # plan_run read WORLD_SIZE (unset under MPI) as 1: it refused 2 stages on 4 ranks, or planned
    # one replica where there were four, so the replicas read overlapping batches.
    from gptx.parallel.launching import adopt_mpi_ranks
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in flavour.items():
        monkeypatch.setenv(name, value)
    adopt_mpi_ranks()
    assert [os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE")] == ["3", "4", "1", "2"]
    monkeypatch.setenv("RANK", "0")  # a launcher's own RANK and WORLD_SIZE win
    monkeypatch.setenv("WORLD_SIZE", "8")
    adopt_mpi_ranks()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("0", "8")


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_master_port_out_of_range_is_one_line(monkeypatch, port):
    from gptx.errors import GptxError
    from gptx.parallel.launching import check_master_port
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_PORT", port)  # before: socket.bind's OverflowError traceback
    with pytest.raises(GptxError, match=f"MASTER_PORT {port} is not a port"):
        check_master_port()


def test_slurm_tasks_nothing_ranked_are_one_line_from_training_and_the_tools(monkeypatch, capsys):
    """`srun` without mpi4py, or a plain `python` in an allocation of several tasks: DeepSpeed's
    ModuleNotFoundError for mpi4py (training) or a KeyError for WORLD_SIZE (the tools), on every task."""
    import importlib.util

    from gptx.cli.pretrain import run_pretrain
    from gptx.cli.schedule_bench import run_schedule_bench
    if importlib.util.find_spec("mpi4py") is not None:
        pytest.skip("with mpi4py DeepSpeed finds the ranks itself")
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    for command in (run_pretrain, run_schedule_bench):
        assert command(["--train-iters", "1"] if command is run_pretrain else ["--iters", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: SLURM_NTASKS=2, but nothing set RANK and WORLD_SIZE") and "\n" not in err, err
    # MPI ranks (deepspeed --launcher openmpi exports no MASTER_ADDR): before, DeepSpeed's traceback for mpi4py.
    monkeypatch.delenv("SLURM_NTASKS")
    mpi = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}
    os.environ.update(mpi)  # os.environ is the test's own copy
    assert run_pretrain(["--train-iters", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: an MPI launch (OMPI_COMM_WORLD_RANK is set) without MASTER_ADDR and MASTER_PORT: "
                          "DeepSpeed would find them through mpi4py, which is not installed") and "\n" not in err, err
    for name in [*mpi, *LAUNCH_ENV]:
        os.environ.pop(name, None)
    # Under a cluster's variables DeepSpeed reads only when it starts, the tools cannot plan their stages.
    monkeypatch.setenv("DLTS_JOB_ID", "1")
    assert run_schedule_bench(["--iters", "1"]) == 2
    assert "error: this tool plans its stages from WORLD_SIZE, which nothing set" in capsys.readouterr().err
