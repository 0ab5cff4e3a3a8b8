"""What the tests share: tiny models, synthetic token data, DeepSpeed JSONs, short runs under the real launcher."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from gptx.parallel.engine import release_shared_memory

REPO = Path(__file__).resolve().parents[2]


# A model small enough that a launcher test trains several steps in seconds.
MICRO_MODEL = dict(vocab_size=256, seq_len=32, n_layer=4, n_head=2, n_embd=32)


def one_error_line(capsys) -> str:
    """What a command printed on stderr: one line, `error: ...`, no traceback."""
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    return err[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_token_dir(path: Path, vocab_size: int = 256, n_train: int = 20000, n_val: int = 4000,
                   seed: int = 0, dtype: str = "uint16") -> Path:
    """Learnable synthetic tokens: a noisy repeating ramp, so the loss has somewhere to go."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        ramp = (np.arange(n) * 7) % vocab_size
        noise = rng.integers(0, vocab_size, n)
        tokens = np.where(rng.random(n) < 0.2, noise, ramp).astype(dtype)
        tokens.tofile(path / f"{split}.bin")
    (path / "meta.json").write_text(json.dumps({"vocab_size": vocab_size, "dtype": dtype}))
    return path


def write_model_yaml(path: Path, **overrides) -> Path:
    body = dict(MICRO_MODEL)
    body.update(overrides)
    path.write_text(yaml.safe_dump(body))
    return path


def write_ds_config(path: Path, micro: int, accum: int, **extra) -> Path:
    cfg = json.loads((REPO / "ds_configs" / "cpu_fp32.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum, **extra)
    path.write_text(json.dumps(cfg))
    return path


ADAMW = {"type": "AdamW", "params": {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}}


def precision_ds(name: str, micro: int = 2, accum: int = 2, **fp16) -> dict:
    """A DeepSpeed JSON for the precision tests: fp32, bf16, or fp16 'fp16-zero{0,1}-{torch,fused}'
    (torch: torch's AdamW, DeepSpeed's FP16_UnfusedOptimizer without ZeRO; fused: DeepSpeed's
    FusedAdam, FP16_Optimizer). `fp16` overrides the loss-scale keys (default: dynamic from 2^16)."""
    torch_adam = name in ("fp32", "bf16") or name.endswith("torch")
    optimizer = {"type": "AdamW", "params": dict(ADAMW["params"], torch_adam=torch_adam)}
    cfg = dict(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum, optimizer=optimizer,
               gradient_clipping=1.0, steps_per_print=10 ** 9)
    if name == "bf16":
        cfg.update(bf16={"enabled": True}, zero_optimization={"stage": 1}, data_types={"grad_accum_dtype": "fp32"})
    elif name.startswith("fp16"):
        scaling = dict(loss_scale=0, initial_scale_power=16, loss_scale_window=1000, hysteresis=2, min_loss_scale=1)
        scaling.update(fp16)
        cfg.update(fp16={"enabled": True, **scaling}, zero_optimization={"stage": int(name.split("-")[1][-1])})
    return cfg


def launcher_command(nprocs: int, args: list[str], script: str = "launch/pretrain.py",
                     env: dict | None = None) -> tuple[list[str], dict, str]:
    """(command, environment, master port) to run a script under the real deepspeed launcher."""
    beside_python = Path(sys.executable).parent / "deepspeed"
    launcher = str(beside_python) if beside_python.exists() else "deepspeed"
    port = str(free_port())
    cmd = [launcher, "--num_gpus", str(nprocs), "--master_port", port, str(REPO / script), *args]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full_env.pop("RANK", None)
    full_env.pop("WORLD_SIZE", None)
    return cmd, full_env, port


def launch(nprocs: int, args: list[str], cwd: Path, timeout: int = 300,
           script: str = "launch/pretrain.py", env: dict | None = None) -> subprocess.CompletedProcess:
    """launch/pretrain.py (or another script) under the real deepspeed launcher, on CPU with gloo."""
    cmd, env, port = launcher_command(nprocs, args, script, env)
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    finally:
        release_shared_memory(port)  # also after a crash


def run_files(tmp: Path) -> tuple[Path, Path, Path, Path]:
    """(directory, token data, model YAML, DeepSpeed JSON of 2 x 2 micro-batches) for short runs."""
    return tmp, make_token_dir(tmp / "data"), write_model_yaml(tmp / "model.yaml"), \
        write_ds_config(tmp / "ds.json", micro=2, accum=2)


def pretrain_args(data: Path, model: Path, ds: Path, save: Path, pipe: int, iters: int, *extra: str) -> list[str]:
    """Flags of a short launch/pretrain.py run on test data (later flags win)."""
    return ["--model", str(model), "--data", str(data), "--deepspeed_config", str(ds), "--save", str(save),
            "--pipe-parallel-size", str(pipe), "--train-iters", str(iters), "--lr", "3e-3", "--warmup-iters", "1",
            *extra]


def mount_tmpfs(path: Path, kib: int, read_only: bool = False) -> str:
    """A tmpfs of `kib` KiB at `path` (made here): a full or read-only disk at no cost. Returns why it
    could not be mounted ("" when it was): mounting needs root or CAP_SYS_ADMIN. unmount() removes it."""
    path.mkdir()
    opts = f"size={kib}k" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    return f"cannot mount a tmpfs here ({done.stderr.strip()}): a full or read-only disk needs one" \
        if done.returncode else ""


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["iter"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def launch_sequence(nprocs: int, runs: list[dict], folder: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Several gptx commands ({"name", "argv", "env"}, and "command" where it is not launch/pretrain.py's)
    in one launch, one after another (tests/helpers/command_sequence.py); sequence_output and
    sequence_code read each run's result."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = folder / "plan.json"
    plan.write_text(json.dumps(runs))
    return launch(nprocs, [str(plan)], cwd=folder, timeout=timeout, script="tests/helpers/command_sequence.py")


def sequence_run(name: str, argv: list[str], fault: str | None = None) -> dict:
    """One run of a launch_sequence plan: launch/pretrain.py's flags, and a GPTX_FAULT where given."""
    return {"name": name, "argv": argv, "env": {"GPTX_FAULT": fault} if fault else {}}


def sequence_output(folder: Path, name: str) -> str:
    """A run's console output from a sequence, rank 0's then the others', as a launch would merge them."""
    return "".join(p.read_text() for p in sorted(folder.glob(f"{name}.rank*.log")))


def sequence_report(folder: Path, name: str) -> dict:
    """The one JSON object a `--json` tool printed in a sequence run that exited 0 (the launcher logs around it)."""
    out = sequence_output(folder, name)
    assert sequence_code(folder, name) == 0, out[-3000:]
    (line,) = [x for x in out.splitlines() if x.startswith("{")]
    return json.loads(line)


def sequence_code(folder: Path, name: str) -> int | None:
    """A run's exit code: the largest over the ranks that finished it, or None where none did."""
    codes = [int(p.read_text()) for p in folder.glob(f"{name}.rank*.code")]
    return max(codes) if codes else None


def fake_launches(monkeypatch, module, write_outputs) -> list[list[str]]:
    """`module`'s subprocess.run replaced by a launch that succeeds at once after write_outputs(cmd)
    has written what the real one would; returns the commands launched, in order."""
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        write_outputs(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(module.subprocess, "run", fake_run)
    return seen
