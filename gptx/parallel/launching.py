"""How the processes of a run find each other, and the one-line errors when they cannot.

Kept free of torch and DeepSpeed imports: launch/pretrain.py checks the master port before
those imports, so that a run whose port is taken stops in a fraction of a second, before its
other ranks (still importing) could reach the other run's rendezvous on that port.
"""
from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path

from gptx.errors import GptxError, PeerFailure

REPO = Path(__file__).resolve().parents[2]


class PortInUse(GptxError):
    """The master port is taken: rank 0 cannot open the rendezvous there."""


def port_is_free(port: int) -> bool:
    """Whether rank 0's rendezvous (torch's TCPStore) could listen on this port now.

    SO_REUSEADDR as the TCPStore sets it, so a port left in TIME_WAIT by a finished run counts
    as free (the store can take it), and all interfaces, as the store listens on.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher() -> str:
    """The `deepspeed` launcher of this interpreter's environment (a venv's, even when not activated),
    else the one on PATH."""
    beside = Path(sys.executable).parent / "deepspeed"
    return str(beside) if beside.exists() else "deepspeed"


def script_name() -> str:
    """The running script as the README names it (launch/pretrain.py), else as it was given."""
    path = Path(sys.argv[0]).resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return sys.argv[0]


def port_in_use_error(port: int) -> PortInUse:
    nearby = next((p for p in range(port + 1, min(port + 20, 65536)) if port_is_free(p)), None)
    processes = os.environ.get("LOCAL_SIZE") or os.environ.get("WORLD_SIZE") or "1"
    return PortInUse(f"port {port} is in use (another run on this machine?): give the launcher --master_port N, "
                     f"e.g. deepspeed --master_port {nearby or free_port()} --num_gpus {processes} {script_name()}")


def _agent_store() -> bool:
    """torchrun's agent opens the rendezvous itself: the port is then rightly taken by it."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"


def check_master_port() -> None:
    """On rank 0 under a launcher, before anything heavy: the port its rendezvous will listen on is free.

    The check races with whatever takes the port next; `port_in_use` catches the rest where the
    process group starts.
    """
    if os.environ.get("RANK") != "0" or "MASTER_PORT" not in os.environ or _agent_store():
        return
    try:
        port = int(os.environ["MASTER_PORT"])
    except ValueError:
        return  # torch names a malformed port itself
    if not 0 < port < 65536:  # socket.bind raises OverflowError, torch fails deeper still
        raise GptxError(f"MASTER_PORT {port} is not a port (1-65535): give the launcher --master_port N, "
                        f"e.g. --master_port {free_port()}")
    dist = sys.modules.get("torch.distributed")  # read only if already imported: this check stays light
    if dist is not None and dist.is_available() and dist.is_initialized():
        return  # this process's group already holds the port; no rendezvous will be opened
    if not port_is_free(port):
        raise port_in_use_error(port)


def port_in_use(error: BaseException) -> PortInUse | None:
    """torch's DistNetworkError for a taken master port (a traceback through every layer of the
    rendezvous) as one line; None for any other error."""
    text = str(error)
    if "EADDRINUSE" not in text and "address already in use" not in text.lower():
        return None
    port = os.environ.get("MASTER_PORT", "")
    return port_in_use_error(int(port)) if port.isdigit() else PortInUse(
        "the master port is in use (another run on this machine?): give the launcher --master_port N")


def rendezvous_timeout(error: BaseException, timeout: int) -> PeerFailure | None:
    """torch's DistStoreError when not every rank came to the rendezvous within the timeout (another
    node's rank stopped before it, or cannot reach this one) as one line; None for any other error."""
    found = re.search(r"waiting for clients\. (\d+)/(\d+) clients joined", str(error))
    if found is None:
        return None
    came, world = found.groups()
    return PeerFailure(f"rank {os.environ.get('RANK', '0')}: {came} of {world} ranks came to the start within "
                       f"train.dist_timeout = {timeout} s; the others stopped before it (their own output says why) "
                       f"or cannot reach {os.environ.get('MASTER_ADDR', 'MASTER_ADDR')}:"
                       f"{os.environ.get('MASTER_PORT', 'MASTER_PORT')}")


# Set by MPI launchers (OpenMPI, MPICH/Intel PMI, PMIx, MVAPICH) and by the clusters whose
# environment DeepSpeed's init_distributed reads (AzureML, SageMaker, DLTS): there DeepSpeed
# discovers the world itself, though RANK is not set yet.
WORLD_DISCOVERY_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE",
                             "AZUREML_EXPERIMENT_ID", "SM_TRAINING_ENV", "DLTS_JOB_ID")


# (rank, world size, local rank, local size) as each MPI flavour names them.
MPI_RANK_VARIABLES = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),  # MPICH, Intel MPI
)


def adopt_mpi_ranks() -> None:
    """Under an MPI launcher (deepspeed --launcher openmpi/mvapich/impi), which sets no RANK or
    WORLD_SIZE: take them from MPI's own variables before anything reads them. DeepSpeed would
    find the same numbers, but only inside init_distributed, after gptx has planned the batch
    layout and the threads per rank from a world of one."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    for names in MPI_RANK_VARIABLES:
        if names[0] in os.environ and names[1] in os.environ:
            values = [os.environ.get(name) for name in names]
            for key, value in zip(("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE"), values):
                if value is not None:
                    os.environ[key] = value
            return


def under_launcher() -> bool:
    """Started by deepspeed or torchrun (RANK set), by an MPI launcher or cluster DeepSpeed
    discovers the world from, or as one of several Slurm tasks (srun)."""
    if "RANK" in os.environ or any(v in os.environ for v in WORLD_DISCOVERY_VARIABLES):
        return True
    tasks = os.environ.get("SLURM_NTASKS", "")
    return tasks.isdigit() and int(tasks) > 1


def check_world_known() -> None:
    """Several Slurm tasks with no RANK or WORLD_SIZE (srun, or a plain `python` inside an allocation
    of several tasks), or MPI ranks with no rendezvous address: DeepSpeed would look for them
    through mpi4py and stop with its ModuleNotFoundError (a traceback on every rank) where it is
    not installed."""
    import importlib.util
    mpi = next((names[0] for names in MPI_RANK_VARIABLES if names[0] in os.environ), None)
    if (mpi and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ)
            and importlib.util.find_spec("mpi4py") is None):
        # DeepSpeed's MPI launchers export no rendezvous address: it asks MPI for one, through mpi4py.
        raise GptxError(f"an MPI launch ({mpi} is set) without MASTER_ADDR and MASTER_PORT: DeepSpeed would find "
                        f"them through mpi4py, which is not installed; pip install mpi4py, or export MASTER_ADDR "
                        f"(rank 0's host) and MASTER_PORT to every rank")
    tasks = os.environ.get("SLURM_NTASKS", "")
    if ("RANK" in os.environ or any(v in os.environ for v in WORLD_DISCOVERY_VARIABLES) or not tasks.isdigit()
            or int(tasks) < 2 or importlib.util.find_spec("mpi4py") is not None):
        return
    raise GptxError(f"SLURM_NTASKS={tasks}, but nothing set RANK and WORLD_SIZE, and DeepSpeed would find the ranks "
                    f"through mpi4py, which is not installed: start them with deepspeed (--num_gpus N on one node, "
                    f"--hostfile for several), or pip install mpi4py to use srun; one process: SLURM_NTASKS=1")


def single_process_env() -> None:
    """Outside a launcher: be rank 0 of a world of one, as `deepspeed --num_gpus 1` would make it
    (without these, DeepSpeed looks for MPI to discover the world and fails on mpi4py)."""
    if under_launcher():
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_SIZE="1")
