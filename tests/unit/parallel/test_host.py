"""When gptx.parallel.host keeps freed host memory in the process (the subprocess check of what it
keeps is in tests/integration/test_train.py), and how many threads a rank runs."""
import os
import subprocess
import sys

import pytest

from tests.helpers.runs import REPO


def test_freed_memory_is_kept_only_where_iterations_would_map_tensors_afresh(monkeypatch):
    import gptx.parallel.host
    from gptx.config import load_config
    calls = []
    monkeypatch.setattr(gptx.parallel.host, "keep_freed_memory", lambda: calls.append(1) or True)
    shape = dict(n_layer=4, n_embd=256, n_head=4, seq_len=256, vocab_size=50257, pad_vocab_to_multiple=64)
    gptx.parallel.host.configure_host("cpu", load_config(None, shape).model, 8)  # logits: 8 x 256 x 50304 x 4 = 393 MiB
    assert calls == [1]
    gptx.parallel.host.configure_host("cpu", load_config(None, dict(shape, vocab_size=8192)).model, 2)  # 16 MiB
    gptx.parallel.host.configure_host("cpu")  # tools that measure memory pass no model
    gptx.parallel.host.configure_host("cuda", load_config(None, shape).model, 8)
    assert calls == [1]


def test_16_bit_training_on_a_gpu_runs_its_fp32_matmuls_in_tf32_and_fp32_training_does_not():
    import torch

    from gptx.parallel.host import configure_host
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for accelerator, precision, tf32 in (("cuda", "fp32", False), ("cpu", "bf16", False), ("cuda", "fp16", True),
                                             ("cuda", "bf16", True)):
            torch.backends.cuda.matmul.allow_tf32 = False
            configure_host(accelerator, precision=precision)
            assert torch.backends.cuda.matmul.allow_tf32 == tf32, (accelerator, precision)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs a choice of 2 or more cores")
def test_threads_follow_the_cores_the_process_may_use_not_the_machines():
    """Under a cpuset of one core (taskset, Slurm, docker --cpuset-cpus) a rank started a thread per
    core of the machine."""
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from gptx.parallel.host import configure_host; print(configure_host('cpu'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_SIZE", "LOCAL_WORLD_SIZE")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert done.stdout.strip().splitlines()[-1] == "1", done.stdout + done.stderr
