"""Every precision path on 2 ranks, as 2 pipeline stages and as 2 data-parallel replicas, on the same
batches; writes the traces as JSON. A command of tests/helpers/command_sequence.py
(tests/integration/conftest.py runs it for tests/integration/test_engine.py); alone:

    GPTX_CPU_FP16=1 deepspeed --num_gpus 2 tests/helpers/precision_matrix.py DATA_DIR OUT.json
"""
import dataclasses
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
from gptx.parallel.engine import release_shared_memory  # noqa: E402
from tests.helpers.runs import MICRO_MODEL, precision_ds  # noqa: E402

ITERS = 8
# The scale grows on steps 3 and 6 (window 2), where DeepSpeed would unscale by the new scale.
GROWING = dict(initial_scale_power=12, loss_scale_window=2)
PRECISIONS = {"fp32": {}, "bf16": {}, "fp16-zero0-torch": GROWING, "fp16-zero0-fused": {},
              "fp16-zero1-torch": GROWING, "fp16-zero1-fused": {}}
FUSED = ("fp32", "fp16-zero0-torch")


def run_precisions(argv: list[str]) -> int:
    """argv: DATA_DIR OUT.json. Collective, in a process group of 2 ranks."""
    from deepspeed.utils.logging import set_log_level_from_string
    set_log_level_from_string("warning")
    data, out = argv
    tokens = open_tokens(data, "train")
    results = {}
    for pipe in (2, 1):  # 2 stages x 1 replica, then 1 stage x 2 replicas: the same global batch
        cfg = load_config(None, dict(MICRO_MODEL, lr=3e-3, warmup_iters=1, train_iters=ITERS,
                                     pipe_parallel_size=pipe))
        accum = 4 // (2 // pipe)
        for name, scaling in PRECISIONS.items():
            trace = train_trace(cfg, precision_ds(name, micro=2, accum=accum, **scaling), tokens, ITERS)
            results[f"pipe{pipe}/{name}"] = asdict(trace)
        if pipe == 2:  # the fused head + loss (train.fused_loss): the tied table's gradient crosses stages
            fused = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fused_loss=True))
            for name in FUSED:
                trace = train_trace(fused, precision_ds(name, micro=2, accum=accum, **PRECISIONS[name]), tokens, ITERS)
                results[f"pipe2/{name}-fused"] = asdict(trace)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    deepspeed.init_distributed(verbose=False)
    run_precisions([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    dist.barrier()
    dist.destroy_process_group()
    release_shared_memory()
