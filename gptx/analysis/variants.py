"""Named architecture variants and a same-budget comparison of them through the real trainer."""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from gptx.config import load_config, parse_override
from gptx.errors import CheckpointError, GptxError
from gptx.parallel.launching import deepspeed_launcher, free_port
from gptx.parallel.pipeline import unique_param_count
from gptx.training.resume import check_save_dir

# Model-key overrides on top of a preset; "gpt2" is the plain baseline.
VARIANTS: dict[str, dict] = {
    "gpt2": {},
    "alibi": dict(position_embedding="alibi"),
    "rotary": dict(position_embedding="rotary"),
    "nopos": dict(position_embedding="none"),
    "parallel": dict(residual="parallel"),
    "rezero": dict(norm="rezero"),
    "macaron": dict(macaron=True),
    "realformer": dict(residual_attention=True),
    "topk8": dict(attention_topk=8),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu", ffn_multiple_of=32),
    "mqa": dict(n_kv_head=1),
    # Llama's block with every head keeping its keys and values (as Llama 2 7B), valid for any
    # head count. SwiGLU's width rounds to 32, not Llama's 256: at small widths 256 would give the
    # MLP half again GPT-2's parameters instead of the same.
    "llama": dict(norm="rmsnorm", mlp="swiglu", ffn_multiple_of=32, position_embedding="rotary", bias=False),
}


def set_overrides(extra: list[str]) -> dict:
    """The config keys that the flags passed on to every run set with --set KEY=VALUE (later ones win)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--set", action="append", default=[])
    sets, _ = parser.parse_known_args(extra)
    return dict(parse_override(text) for text in sets.set)


def refuse_earlier_runs(variants: list[str], out: Path) -> None:
    """Stop before the first launch if any variant's run directory already holds a run: launching
    there would fail halfway through the comparison, and deleting it would lose that run."""
    for path in (out, *(out / name for name in variants)):
        if path.exists() and not path.is_dir():
            raise CheckpointError(f"--out '{out}': {path} is a file, not a folder; choose another --out "
                                  f"(nothing was launched)")
    for name in variants:
        run_dir = out / name
        try:
            check_save_dir(run_dir, None)
        except CheckpointError:
            raise CheckpointError(f"--out '{out}': {run_dir} already holds a gptx run; choose another --out "
                                  f"(nothing was launched or deleted)") from None


def compare(variants: list[str], model: str, iters: int, nprocs: int, out: Path, extra: list[str]) -> list[dict]:
    """Train each variant for the same iterations (same data, seed, batch) and collect the results."""
    refuse_earlier_runs(variants, out)
    # Each run gets the variant's keys, then the passed-on --set flags (which win, as they come later).
    parameters = {name: unique_param_count(load_config(model, {**VARIANTS[name], **set_overrides(extra)}).model)
                  for name in variants}
    rows = []
    for name in variants:
        run_dir = out / name
        log = out / f"{name}.log"
        log.unlink(missing_ok=True)  # this tool's own log of an earlier failed launch
        sets = [arg for key, value in VARIANTS[name].items() for arg in ("--set", f"{key}={json.dumps(value)}")]
        # A free port of its own, as strategies.py takes: beside another run on the launcher's default
        # 29500 it stopped ("port 29500 is in use"), and its flags go to pretrain, not the launcher.
        cmd = [deepspeed_launcher(), "--num_gpus", str(nprocs), "--master_port", str(free_port()),
               "--module", "gptx.cli.pretrain", "--model", model,
               "--train-iters", str(iters), "--eval-interval", str(iters), "--save", str(run_dir), *sets, *extra]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(result.stdout + result.stderr)
            errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
            raise GptxError(f"variant {name}: its run exited {result.returncode}"
                            + (f" ({errors[0]})" if errors else "") + f"; its output is in {log}")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if "loss" in r]
        timed = train[1:] or train  # the first iteration carries start-up costs
        rows.append({"variant": name, "parameters": parameters[name],
                     "final_train_loss": train[-1]["loss"],
                     "val_loss": [r["val_loss"] for r in records if "val_loss" in r][-1],
                     "tokens": train[-1]["tokens"],
                     "tokens_per_sec": sum(r["tokens_per_sec"] for r in timed) / len(timed)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| variant | keys | parameters | tokens | final train loss | val loss | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        keys = ", ".join(f"{k}: {v}" for k, v in VARIANTS[r["variant"]].items()) or "(GPT-2 defaults)"
        lines.append(f"| {r['variant']} | {keys} | {r['parameters']:,} | {r['tokens']:,} | {r['final_train_loss']:.3f} | "
                     f"{r['val_loss']:.3f} | {r['tokens_per_sec']:,.0f} |")
    return "\n".join(lines)
