"""Each case trained under 1F1B and under ZB-H1 on the same batches, on 4 ranks as 4 pipeline stages
and as 2 stages x 2 data-parallel replicas; the traces go to a JSON file. The number of micro-batches
changes from step to step (1, 2, the number of stages, twice that plus one), so one engine covers
m < p, m = p and m > p. A command of tests/helpers/command_sequence.py (tests/integration/conftest.py
runs it); alone:

    GPTX_CPU_FP16=1 deepspeed --num_gpus 4 tests/helpers/schedule_matrix.py DATA_DIR OUT.json
"""
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from gptx.analysis.precision_check import train_trace  # noqa: E402
from gptx.config import load_config  # noqa: E402
from gptx.data.tokens import open_tokens  # noqa: E402
from gptx.parallel import pipeline  # noqa: E402
from gptx.parallel.engine import release_shared_memory  # noqa: E402
from tests.helpers.runs import MICRO_MODEL, precision_ds  # noqa: E402

MICRO = 2
# Llama-style blocks (RMSNorm, SwiGLU, grouped-query rotary attention, untied head) with activation
# checkpointing: the saved weights come back as other tensors, the head's table is not tied.
LLAMA = dict(norm="rmsnorm", mlp="swiglu", position_embedding="rotary", n_kv_head=1, tie_embeddings=False,
             bias=False, activation_checkpoint_interval=1)
# (name, stages, precision, extra config, an inf in a W-computed gradient at step 3)
CASES = [
    ("4x1/fp32", 4, "fp32", {}, False),
    ("4x1/bf16-llama-checkpointing", 4, "bf16", LLAMA, False),
    ("4x1/fp16-zero1-overflow", 4, "fp16-zero1-torch", {}, True),
    ("2x2/fp16-zero1", 2, "fp16-zero1-fused", {}, False),
    # dynamo's graphs as captured (no code generation): ZB-H1's split linear layers run between them
    ("2x2/fp32-compiled", 2, "fp32", dict(compile_blocks=True), False),
]


def micro_batches(stages: int) -> list[int]:
    return [1, 2, stages, 2 * stages + 1]


def run(name: str, stages: int, precision: str, extra: dict, overflow: bool, schedule: str, tokens) -> dict:
    keys = dict(MICRO_MODEL, lr=3e-3, warmup_iters=1, pipe_parallel_size=stages, pipeline_schedule=schedule)
    ms = micro_batches(stages)
    cfg = load_config(None, dict(keys, **extra, train_iters=len(ms)))
    dp = dist.get_world_size() // stages
    hooks = []

    def before_step(engine, it):
        engine.set_train_batch_size(MICRO * dp * ms[it - 1])
        if overflow and it == 3:
            weight = next(p for n, p in engine.module.named_parameters() if n.endswith("c_fc.weight"))
            # (Under ZB-H1 the hook is called twice: without a gradient in B, with it in W.)
            hooks.append(weight.register_hook(lambda g: None if g is None else g * float("inf")))
        elif hooks:
            hooks.pop().remove()

    ds = precision_ds(precision, micro=MICRO, accum=ms[0], **({"initial_scale_power": 12} if overflow else {}))
    return asdict(train_trace(cfg, ds, tokens, len(ms), before_step))


def run_matrix(argv: list[str]) -> int:
    """argv: DATA_DIR OUT.json. Collective, in a process group of 4 ranks."""
    from deepspeed.utils.logging import set_log_level_from_string
    set_log_level_from_string("warning")
    data, out = argv
    tokens = open_tokens(data, "train")
    results = {}
    backend, pipeline.COMPILE_BACKEND = pipeline.COMPILE_BACKEND, "eager"
    try:
        for case in CASES:
            for schedule in ("1f1b", "zb-h1"):
                results[f"{case[0]}/{schedule}"] = run(*case, schedule, tokens)
    finally:
        pipeline.COMPILE_BACKEND = backend
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    deepspeed.init_distributed(verbose=False)
    run_matrix([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    dist.barrier()
    dist.destroy_process_group()
    release_shared_memory()
