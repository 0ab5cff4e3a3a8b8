"""Pictures of runs from their metrics.jsonl: loss curves, LR, grad norm, loss scale, throughput.

Needs matplotlib (the `plot` extra); it draws off-screen, so it works on a headless node.
"""
from __future__ import annotations

import json
from pathlib import Path

from gptx.atomic import atomic_write
from gptx.errors import ConfigError, DataError


def number(value) -> float | None:
    """A record's numeric field, or None when it is missing, null or not a number."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def metrics_lines(run_dir: str | Path) -> tuple[Path, list[str]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise DataError(f"run '{run_dir}': no metrics.jsonl (expected a run directory written by launch/pretrain.py)")
    if not path.is_file():
        raise DataError(f"'{path}': is not a file (expected the metrics.jsonl that launch/pretrain.py writes)")
    try:
        return path, path.read_text(errors="replace").splitlines()  # a damaged byte fails that line's JSON
    except OSError as e:
        raise DataError(f"'{path}': cannot be read ({e.strerror})") from None


def read_run(run_dir: str | Path) -> dict:
    """A run's metrics.jsonl as columns: train records by iteration, val records, and tokens seen
    at each iteration. When a resume went back to an earlier checkpoint, the records after it
    that the abandoned trajectory wrote are dropped: the picture is the run that continued. A
    last line cut short (a run killed, or still writing) is left out, and so are records without
    a whole-number iteration (or a train record without its tokens), counted in "skipped"; a
    train record with a null loss stays, without a point on the loss curve."""
    path, lines = metrics_lines(run_dir)
    train, val, skipped = {}, {}, 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if lineno == len(lines):
                break
            raise DataError(f"'{path}' line {lineno}: not valid JSON") from None
        if not isinstance(record, dict):
            raise DataError(f"'{path}' line {lineno}: not a metrics record (expected a JSON object, got "
                            f"{type(record).__name__})")
        it = record.get("iter")
        if not isinstance(it, int) or isinstance(it, bool):
            skipped += 1
        elif "loss" in record:
            if number(record.get("tokens")) is None:  # no place on the x axis
                skipped += 1
                continue
            if train and it <= max(train):  # a resume from an earlier checkpoint
                train = {i: r for i, r in train.items() if i < it}
                val = {i: v for i, v in val.items() if i < it}
            train[it] = record
        elif "val_loss" in record:
            if number(record["val_loss"]) is None:
                skipped += 1
                continue
            val[it] = record["val_loss"]
    if not train:
        raise DataError(f"'{path}': no training iterations logged yet")
    iters = sorted(train)
    tokens = {i: train[i]["tokens"] for i in iters}
    return {"name": Path(run_dir).resolve().name, "path": path, "iters": iters, "train": [train[i] for i in iters],
            "tokens": [tokens[i] for i in iters], "skipped": skipped,
            "val": [(tokens[i], v) for i, v in sorted(val.items()) if i in tokens]}


def smooth(values: list[float], weight: float) -> list[float]:
    """An exponential moving average, bias-corrected so its start is not pulled toward 0."""
    out, avg = [], 0.0
    for n, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** n))
    return out


def _token_unit(most: int) -> tuple[float, str]:
    for scale, unit in ((1e9, "billions"), (1e6, "millions"), (1e3, "thousands")):
        if most >= scale:
            return scale, f"tokens seen ({unit})"
    return 1.0, "tokens seen"


def figure_path(out: str | Path) -> Path:
    """The file --out names, with matplotlib's default .png added when it has no suffix (as savefig
    would add it), refused in one line when matplotlib cannot write that format."""
    from matplotlib.backend_bases import FigureCanvasBase
    out = Path(out)
    if not out.suffix:
        return out.with_name(out.name + ".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix[1:].lower() not in formats:
        raise ConfigError(f"--out {out}: matplotlib cannot write a '{out.suffix}' file; give a name ending in .png "
                          f"(or one of {', '.join('.' + f for f in sorted(formats))})")
    return out


def save_figure(fig, out: Path) -> None:
    """Whole or not at all: a write that fails leaves an earlier file at `out` as it was."""
    import io
    image = io.BytesIO()
    fig.savefig(image, format=out.suffix[1:].lower(), dpi=110)
    try:
        atomic_write(out, image.getvalue())
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write it there ({e.strerror}); choose another --out") from None


def plot_runs(run_dirs: list[str | Path], out: str | Path, smoothing: float = 0.9, log=print) -> Path:
    """One PNG: train loss (smoothed, raw faint) and val loss, LR, grad norm, loss scale and
    skipped steps, tokens/s and MFU, each against tokens seen, every run in its own colour.
    Returns the path written."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError('plotting needs matplotlib: pip install -e ".[plot]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = figure_path(out)
    runs = [read_run(d) for d in run_dirs]
    for run in runs:
        if run["skipped"]:
            log(f"note: '{run['path']}': left out {run['skipped']} record(s) that have no whole-number 'iter', "
                f"or no 'tokens' (train) or a numeric 'val_loss' (validation)")
    names = [r["name"] for r in runs]
    for r, d in zip(runs, run_dirs):  # runs/a/run and runs/b/run: name them a/run and b/run
        if names.count(r["name"]) > 1:
            r["name"] = "/".join(Path(d).resolve().parts[-2:])
    scale, xlabel = _token_unit(max(t for r in runs for t in r["tokens"]))
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), constrained_layout=True)
    (loss_ax, lr_ax, norm_ax), (scale_ax, tps_ax, mfu_ax) = axes
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    any_scale = False
    for k, run in enumerate(runs):
        c = colours[k % len(colours)]
        x = [t / scale for t in run["tokens"]]
        col = {key: [number(r.get(key)) for r in run["train"]] for key in  # None: missing, null or not a number
               ("loss", "lr", "grad_norm", "loss_scale", "skipped_steps", "tokens_per_sec", "mfu")}
        gaps = {key: [float("nan") if v is None else v for v in col[key]] for key in ("lr", "tokens_per_sec")}
        losses = [(xi, v) for xi, v in zip(x, col["loss"]) if v is not None]
        loss_x, loss_y = [xi for xi, _ in losses], [v for _, v in losses]
        loss_ax.plot(loss_x, loss_y, color=c, alpha=0.25, linewidth=0.8)
        loss_ax.plot(loss_x, smooth(loss_y, smoothing), color=c, linewidth=1.8, label=f"{run['name']} train")
        if run["val"]:
            loss_ax.plot([t / scale for t, _ in run["val"]], [v for _, v in run["val"]], color=c, linestyle="--",
                         marker="o", markersize=4, label=f"{run['name']} val")
        lr_ax.plot(x, gaps["lr"], color=c, label=run["name"])
        norms = [(xi, n) for xi, n in zip(x, col["grad_norm"]) if n is not None and n > 0]
        if norms:
            norm_ax.plot(*zip(*norms), color=c, linewidth=1, label=run["name"])
        scales = [(xi, s) for xi, s in zip(x, col["loss_scale"]) if s is not None]
        if scales:
            any_scale = True
            scale_ax.plot(*zip(*scales), color=c, label=f"{run['name']} loss scale")
            skips = [xi for xi, now, before in zip(x[1:], col["skipped_steps"][1:], col["skipped_steps"])
                     if (now or 0) > (before or 0)]
            scale_ax.plot(skips, [dict(scales).get(xi, 1) for xi in skips], linestyle="none", marker="x",
                          color=c, markersize=7, label=f"{run['name']} skipped step ({len(skips)})")
        tps_ax.plot(x[1:], gaps["tokens_per_sec"][1:], color=c, label=run["name"])  # the first carries start-up
        if any(m is not None for m in col["mfu"]):
            mfu_ax.plot(x[1:], [100 * m if m is not None else float("nan") for m in col["mfu"][1:]], color=c,
                        label=run["name"])

    loss_ax.set(title="loss (train smoothed, raw faint; val dashed)", ylabel="cross-entropy (nats/token)")
    lr_ax.set(title="learning rate", ylabel="LR")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    norm_ax.set(title="gradient norm (before clipping)", ylabel="global L2 norm", yscale="log")
    scale_ax.set(title="fp16 loss scale and skipped steps", ylabel="loss scale")
    if any_scale:
        scale_ax.set_yscale("log", base=2)
    else:
        scale_ax.text(0.5, 0.5, "no fp16 run: no loss scale", ha="center", va="center", transform=scale_ax.transAxes,
                      color="0.4")
    tps_ax.set(title="throughput", ylabel="tokens/s (all ranks)")
    mfu_ax.set(title="model FLOPs utilisation", ylabel="MFU (%)")
    for ax in axes.flat:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(", ".join(r["name"] for r in runs), fontsize=12)
    try:
        save_figure(fig, out)
    finally:
        plt.close(fig)
    return out
