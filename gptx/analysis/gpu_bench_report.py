"""The GPU benchmark's result files: its JSON, and the Markdown table with each row's ratio to the
reference loop and what each speed lever buys."""
from __future__ import annotations

import json
from pathlib import Path

from gptx.atomic import atomic_write


def write_report(report: dict, json_path: Path, md_path: Path) -> None:
    atomic_write(json_path, (json.dumps(report, indent=1) + "\n").encode())
    atomic_write(md_path, render_markdown(report).encode())


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def render_markdown(report: dict) -> str:
    # By where it ran, not by torch's build: a CUDA build of torch on a CPU measures the CPU's peak.
    peak_source = "fp32 matmul, measured" if report["device"] == "cpu" else "bf16 dense, datasheet"
    lines = [f"# Speed on {report['device']}, {report['date']}", "",
             f"torch {report['torch']}, CUDA {report['cuda']}, DeepSpeed {report['deepspeed']}; "
             f"{report['iters']} timed iterations per row after {report['warmup']}, rows alternating; "
             f"MFU against {_fmt(report['peak_flops'] and report['peak_flops'] / 1e12, '.3g')} TFLOP/s "
             f"({peak_source}); the levers: "
             f"{', '.join(report['levers'])}; the reference: {report['reference']}. "
             f"Command: `{report['command']}`", "",
             "| model | precision | loop | setting | micro-batch x accumulation | tokens/s | MFU | peak GiB | "
             "vs reference |", "|---|---|---|---|---|---|---|---|---|"]
    references = {r["model"]: r["tokens_per_sec"] for r in report["rows"] if r["loop"] == "reference"}
    for r in report["rows"]:
        ref = references.get(r["model"])
        ratio = f"{r['tokens_per_sec'] / ref:.2f}x" if ref and r["tokens_per_sec"] else "-"
        error = (r["error"] or "").replace("|", "/")  # a table cell
        tps = _fmt(r["tokens_per_sec"], ",.0f", missing=f"failed: {error}" if error else "-")
        lines.append(f"| {r['model']} | {r['precision']} | {r['loop']} | {r['setting']} | "
                     f"{r['micro_batch']} x {r['grad_accum']} | {tps} | "
                     f"{_fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | "
                     f"{_fmt(r['peak_memory_gib'], '.2f')} | {ratio} |")
    buys = lever_gains(report["rows"])
    if buys:
        lines += ["", "What each lever buys (all levers' tokens/s over the same row without it):", ""]
        lines += [f"- {model} {precision}: {lever} {gain:.2f}x" for (model, precision, lever), gain in buys.items()]
    lines += [f"- skipped: {s}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"


def lever_gains(rows: list[dict]) -> dict:
    fastest = {(r["model"], r["precision"]): r["tokens_per_sec"] for r in rows
               if r["loop"] == "gptx" and r["setting"] == "all levers" and r["tokens_per_sec"]}
    gains = {}
    for r in rows:
        key = (r["model"], r["precision"])
        if r["loop"] == "gptx" and r["setting"].startswith("all but ") and r["tokens_per_sec"] and key in fastest:
            gains[(*key, r["setting"][len("all but "):])] = fastest[key] / r["tokens_per_sec"]
    return gains
