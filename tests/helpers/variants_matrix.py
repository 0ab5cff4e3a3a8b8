"""Every architecture variant trained on 2 pipeline stages (a few also with compiled blocks), one after
another in one process group; writes each variant's losses as JSON. A command of
tests/helpers/command_sequence.py (tests/integration/conftest.py runs it for
tests/integration/test_variants.py); alone:

    deepspeed --num_gpus 2 tests/helpers/variants_matrix.py DATA_DIR OUT.json
"""
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from gptx.analysis.precision_check import train_trace  # noqa: E402
from gptx.data.tokens import open_tokens  # noqa: E402
from gptx.parallel import pipeline  # noqa: E402
from gptx.parallel.engine import release_shared_memory  # noqa: E402
from tests.helpers.runs import precision_ds  # noqa: E402
from tests.unit.model.test_variants import COMPILED_VARIANTS, ITERS, VARIANTS, variant_config  # noqa: E402


def run_variants(argv: list[str]) -> int:
    """argv: DATA_DIR OUT.json. Collective, in a process group of 2 ranks."""
    from deepspeed.utils.logging import set_log_level_from_string
    set_log_level_from_string("warning")
    data, out = argv
    tokens = open_tokens(data, "train")
    losses = {name: train_trace(variant_config(name, pipe=2), precision_ds("fp32"), tokens, ITERS).losses
              for name in VARIANTS}
    # dynamo's tracing, guards and whole-graph capture across the stage boundary, without inductor's
    # code generation (minutes on 2 cores): tests/unit/parallel/test_compile.py checks inductor's numbers in process.
    backend, pipeline.COMPILE_BACKEND = pipeline.COMPILE_BACKEND, "aot_eager"
    try:
        for name in COMPILED_VARIANTS:
            cfg = variant_config(name, pipe=2)
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile_blocks=True))
            losses[f"{name}+compiled"] = train_trace(cfg, precision_ds("fp32"), tokens, ITERS).losses
    finally:
        pipeline.COMPILE_BACKEND = backend
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(losses))
    return 0


if __name__ == "__main__":
    deepspeed.init_distributed(verbose=False)
    run_variants([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    dist.barrier()
    dist.destroy_process_group()
    release_shared_memory()
