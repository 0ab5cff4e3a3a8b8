"""tools/lm_eval_harness.py: lm-evaluation-harness's own command line with the `gptx` model registered."""
from __future__ import annotations

import sys

from gptx.cli.common import guarded, no_engine_accelerator
from gptx.errors import ConfigError


def run_lm_eval(argv: list[str] | None = None) -> int:
    """lm-evaluation-harness's own command line, with the `gptx` model registered."""
    no_engine_accelerator()

    def main():
        try:
            from lm_eval.__main__ import cli_evaluate
        except ImportError:
            raise ConfigError("tools/lm_eval_harness.py needs lm-evaluation-harness: pip install -e \".[eval]\"") from None
        import importlib
        importlib.import_module("gptx.interop.lm_eval_adapter")  # registers --model gptx
        sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
        try:
            cli_evaluate()
        except ValueError as e:
            if not str(e).startswith("Tasks not found"):
                raise
            raise ConfigError(f"--tasks: {e}; a task of your own needs --include_path DIR (the folder of its "
                              f"YAML), and `lm_eval ls tasks` lists the built-in ones") from None
    return guarded(main)
