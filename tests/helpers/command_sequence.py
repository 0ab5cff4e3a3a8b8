"""Several gptx commands one after another in one launch: one process group, one set of imports.

    deepspeed --num_gpus 2 tests/helpers/command_sequence.py PLAN.json

PLAN.json lists runs: {"name", "argv", "env", "command"}. Each run is one of gptx's commands (COMMANDS,
by default "pretrain", launch/pretrain.py's entry) with its argv and extra environment; its console
output (every rank's, stdout and stderr, at the descriptor level so DeepSpeed's and torch's C++ prints
count) goes to NAME.rank<R>.log beside PLAN.json, and its exit code to NAME.rank<R>.code. A run that
kills or crashes its rank (a GPTX_FAULT) ends the launch, so it goes last. The tests read the logs as they read a
launch's output (tests/helpers/runs.py, sequence_output).
"""
import importlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from gptx.parallel.engine import release_shared_memory  # noqa: E402

# name -> "module:function" taking argv and returning an exit code
COMMANDS = {"pretrain": "gptx.cli.pretrain:run_pretrain", "benchmark": "gptx.cli.benchmark:run_benchmark",
            "schedule_bench": "gptx.cli.schedule_bench:run_schedule_bench",
            "schedule_matrix": "tests.helpers.schedule_matrix:run_matrix",
            "precision_matrix": "tests.helpers.precision_matrix:run_precisions",
            "variants_matrix": "tests.helpers.variants_matrix:run_variants"}


def command(name: str):
    module, function = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), function)


def run_one(folder: Path, run: dict, rank: int) -> None:
    saved_env = dict(os.environ)
    os.environ.update(run.get("env", {}))
    log = folder / f"{run['name']}.rank{rank}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            code = command(run.get("command", "pretrain"))(run["argv"])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    (folder / f"{run['name']}.rank{rank}.code").write_text(str(code))
    # A pipeline engine leaves its grid in deepspeed.utils.groups.mpu, where a later engine without a
    # pipeline would read it as model parallelism; a run in a process of its own starts without it.
    deepspeed.utils.groups.mpu = None
    os.environ.clear()
    os.environ.update(saved_env)
    dist.barrier()  # the next run starts together


def main(plan: str) -> None:
    deepspeed.init_distributed(verbose=False)
    folder = Path(plan).parent
    for run in json.loads(Path(plan).read_text()):
        run_one(folder, run, dist.get_rank())
    dist.barrier()
    dist.destroy_process_group()
    release_shared_memory()


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
