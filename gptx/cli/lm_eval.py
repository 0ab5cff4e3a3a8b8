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
        cli_evaluate()
    return guarded(main)
