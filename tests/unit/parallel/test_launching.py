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
