"""The launcher and subprocess half of tests.unit.parallel.test_launching."""
import os
import subprocess
import sys

from gptx.parallel.engine import release_shared_memory
from tests.helpers.runs import REPO, launcher_command, pretrain_args, run_files
from tests.unit.parallel.test_launching import LAUNCH_ENV, listening_socket


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
