"""Which checkpoint --load means, and whether this run may continue it: the newest complete
folder (a damaged `latest` falls back with a warning), a --save directory that holds another
run refused, and the checkpoint's model, layout and LR schedule checked against this run's."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from gptx.config import Config, ModelConfig, TrainConfig
from gptx.errors import CheckpointError
from gptx.training.checkpoint_files import (LATEST, MANIFEST, META, TAG_PREFIX, checkpoint_folders, incomplete_reason,
                                            read_latest)
from gptx.training.schedule import schedule_of

SCHEDULE_FLAGS = {"lr": "--lr", "min_lr": "--min-lr", "warmup_iters": "--warmup-iters",
                  "decay_iters": "--lr-decay-iters"}


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def find_latest(load_dir: str | Path, warn=_to_stderr) -> tuple[str, dict]:
    """The newest complete checkpoint's tag and its gptx.json, or a CheckpointError.

    `latest` names the newest complete checkpoint unless something went wrong after it was
    written (a damaged disk, a copy that stopped halfway); then the newest folder that is
    complete by its manifest is used instead, with a warning.
    """
    load_dir = Path(load_dir)
    if not load_dir.is_dir():
        raise CheckpointError(f"--load '{load_dir}': no such directory")
    named = read_latest(load_dir)
    candidates = checkpoint_folders(load_dir)
    if named:
        candidates.sort(key=lambda f: f.name != named)  # the one `latest` names first
    problems = []
    for folder in candidates:
        reason = _unusable(folder)
        if reason and folder.name == named and _predates_manifests(folder):
            # `latest` only ever named complete checkpoints, also before manifests existed.
            warn(f"warning: '{folder}' has no {MANIFEST} (saved by an older gptx); trusting '{LATEST}'")
            reason = None
        if reason is None:
            if folder.name != named:
                pointed = f"'{LATEST}' names '{named}'" if named else f"there is no '{LATEST}' file"
                warn(f"warning: {pointed} but {'; '.join(problems) or 'it is not there'}; "
                     f"using '{folder}', the newest complete checkpoint")
            return folder.name, json.loads((folder / META).read_text())
        problems.append(f"'{folder.name}': {reason}")
    if not candidates:
        raise CheckpointError(f"--load '{load_dir}': no checkpoint folders ({TAG_PREFIX}*) to resume from")
    raise CheckpointError(f"--load '{load_dir}': no complete checkpoint; " + "; ".join(problems))


def is_checkpoint_folder(path: str | Path) -> bool:
    """RUN/iter_N, or any folder with a gptx.json, as opposed to a run directory (a checkpoint folder
    that lost its gptx.json is still one: check_complete then names the file)."""
    path = Path(path)
    named = path.name.startswith(TAG_PREFIX) and path.name[len(TAG_PREFIX):].isdigit()
    return path.is_dir() and (named or (path / META).is_file())


def run_dir_of(load: str | Path) -> Path:
    """The run directory that --load names: itself, or the parent of a checkpoint folder."""
    load = Path(load)
    return load.parent if is_checkpoint_folder(load) else load


def resolve_load(load: str | Path, warn=_to_stderr, save: str | Path | None = None) -> tuple[Path, str, dict]:
    """--load as given -> (run directory, checkpoint tag, that checkpoint's gptx.json).

    A run directory resumes from its newest complete checkpoint (find_latest). A checkpoint
    folder, which every tool accepts too, resumes from that one if it is complete; when
    `latest` names a later one, one line says so, and that this run's checkpoints go to the
    same directory (where they replace the later ones as the run reaches them).
    """
    load = Path(load)
    if not is_checkpoint_folder(load):
        tag, meta = find_latest(load, warn)
        return load, tag, meta
    run_dir = load.parent
    check_complete(load, warn)
    pointer = run_dir / LATEST
    named = read_latest(run_dir) or ""
    if named[len(TAG_PREFIX):].isdigit() and int(named[len(TAG_PREFIX):]) > int(load.name[len(TAG_PREFIX):]):
        elsewhere = save is not None and Path(save).resolve() != run_dir.resolve()
        goes = (f"new checkpoints go to {save}" if elsewhere else f"new checkpoints go to {run_dir} and replace "
                f"later ones as the run reaches them: pass --save DIR to keep them")
        warn(f"note: resuming from {load.name} as asked, though '{pointer}' names the later {named} (--load "
             f"{run_dir} resumes from there); {goes}")
    return run_dir, load.name, json.loads((load / META).read_text())


def check_complete(folder: Path, warn=_to_stderr) -> None:
    """Refuse a checkpoint folder named on the command line that its manifest says is incomplete
    (a save that stopped halfway, a copy that did not finish)."""
    reason = _unusable(folder)
    if reason and _predates_manifests(folder):
        warn(f"warning: '{folder}' has no {MANIFEST} (saved by an older gptx); loading it as asked")
        reason = None
    if reason:
        raise CheckpointError(f"--load '{folder}': an incomplete checkpoint ({reason}); pass the run directory "
                              f"'{folder.parent}' for its newest complete one")


def _predates_manifests(folder: Path) -> bool:
    if (folder / MANIFEST).exists():
        return False
    try:
        return "checkpoint_format" not in json.loads((folder / META).read_text())
    except (OSError, ValueError, TypeError):  # unreadable, not JSON, not an object
        return False


def _unusable(folder: Path) -> str | None:
    reason = incomplete_reason(folder)
    if reason is None:
        try:
            if not isinstance(json.loads((folder / META).read_text()), dict):
                return f"{META} is not a JSON object"
        except (OSError, ValueError):
            return f"{META} is missing or not valid JSON"
    return reason


RUN_FILES = ("config.json", "metrics.jsonl", LATEST)
"""What a run directory holds besides its checkpoint folders."""


def check_save_dir(save: str | Path | None, load: str | Path | None) -> None:
    """Refuse, before anything is written, a --save directory that holds another run.

    Writing there would replace its config.json, move its `latest` and append to its
    metrics.jsonl. Saving into the directory being resumed (--load) is a continuation.
    """
    if save is None:
        return
    save = Path(save)
    if load is not None and save.resolve() == Path(load).resolve():
        return
    if save.exists() and not save.is_dir():
        raise CheckpointError(f"--save '{save}': exists and is not a directory")
    if not save.exists():
        return
    found = [name for name in RUN_FILES if (save / name).exists()]
    folders = checkpoint_folders(save)
    if folders:
        found.append(f"{len(folders)} checkpoint folder(s), newest {folders[0].name}")
        raise CheckpointError(f"--save '{save}' already holds another run ({', '.join(found)}); choose a new "
                              f"--save directory, or pass --load {save} to continue that run (nothing was written)")
    if found and not _recorded_a_step(save):
        return  # a start that failed before its first step (a bad flag DeepSpeed met): nothing to lose
    if found:  # a run that stopped before its first checkpoint: nothing to resume, but its files are there
        raise CheckpointError(f"--save '{save}' holds a run that saved no checkpoint ({', '.join(found)}); "
                              f"delete the directory to start again there, or choose a new --save directory "
                              f"(nothing was written)")


def _recorded_a_step(run_dir: Path) -> bool:
    try:
        return (run_dir / LATEST).exists() or bool((run_dir / "metrics.jsonl").read_text().strip())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):  # unreadable: keep it
        return True


def keep_saved_padding(meta: dict, cfg: Config, where: str) -> tuple[Config, str | None]:
    """The config to resume `meta`'s checkpoint with, and a line for the log when it changed.

    The GPT-2-vocabulary presets pad their table to a multiple of 64 since a later version:
    a checkpoint saved before has its own row count, which it keeps unless the padding was
    asked for by a file or the command line (then check_compatible refuses the other shape).
    """
    import dataclasses
    saved = meta.get("config", {}).get("model", {}).get("pad_vocab_to_multiple", 1)
    m = cfg.model
    if not cfg.padding_from_preset or saved == m.pad_vocab_to_multiple:
        return cfg, None
    kept = dataclasses.replace(m, pad_vocab_to_multiple=saved)
    line = (f"note: checkpoint '{where}' has a table of {kept.padded_vocab_size:,} rows where "
            f"'{cfg.name}' now pads to {m.padded_vocab_size:,}: it keeps its {kept.padded_vocab_size:,} rows")
    return dataclasses.replace(cfg, model=kept, padding_from_preset=False), line


def check_compatible(meta: dict, cfg: Config, pipe_size: int, where: str) -> None:
    """Refuse, before any heavy work, a checkpoint of another model shape."""
    import dataclasses

    # Keys added since the checkpoint was written had their default then; keys this version does
    # not know are left out, as before. Both sides are compared with their widths resolved, so a
    # default and the value it stands for are the same shape.
    written = meta.get("config", {}).get("model", {})
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    saved = dataclasses.asdict(ModelConfig(**{k: v for k, v in written.items() if k in known}).resolved())
    current = dataclasses.asdict(cfg.model.resolved())
    changed = [k for k in current if k != "dropout" and saved.get(k) != current[k]]
    if changed:
        diffs = "; ".join(f"{k} {saved.get(k)!r} (checkpoint) vs {current[k]!r} (now)" for k in changed)
        # --load takes the model from the checkpoint: a shape differs only when it was given again.
        raise CheckpointError(f"checkpoint '{where}' is of another model: {diffs}; leave {', '.join(changed)} out "
                              f"of --model/--set to resume with the checkpoint's (--load restores the model), "
                              f"or train a new run without --load for another shape")


def _shown(value) -> str:
    if value is None:
        return "default"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def config_changes(meta: dict, cfg: Config) -> list[str]:
    """'KEY OLD -> NEW' for each model or training key where `cfg` (the checkpoint's config with
    what was given again on top) differs from the checkpoint's, for the start-up log.

    Called after check_compatible, so the model keys left are those that keep the shape
    (dropout). Training keys added since the checkpoint compare with their defaults. A
    weights-only checkpoint (converted weights) starts a new run: its training keys are not
    the run's, so only its model counts.
    """
    import dataclasses

    saved = meta.get("config") or {}
    lines = []
    if saved.get("name") and saved["name"] != cfg.name and not meta.get("weights_only"):
        lines.append(f"model {saved['name']} -> {cfg.name}")
    written = saved.get("model") or {}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    old = dataclasses.asdict(ModelConfig(**{k: v for k, v in written.items() if k in known}).resolved())
    new = dataclasses.asdict(cfg.model.resolved())
    lines += [f"{k} {_shown(old[k])} -> {_shown(new[k])}" for k in new if k in written and old[k] != new[k]]
    if saved.get("train") is not None and not meta.get("weights_only"):
        for f in dataclasses.fields(TrainConfig):
            before, after = saved["train"].get(f.name, f.default), getattr(cfg.train, f.name)
            if before != after:
                lines.append(f"{f.name} {_shown(before)} -> {_shown(after)}")
    return lines


def check_schedule(meta: dict, cfg: Config, where: str, override: bool) -> str | None:
    """Refuse, before any heavy work, a resume whose LR schedule differs from the checkpoint's.

    The schedule's step count resumes, its shape comes from the config: a changed shape
    (typically a larger train_iters, which lr_decay_iters follows by default) would make
    the LR jump at the resume. With `override` the new shape is used; returns the warning.
    """
    import dataclasses

    saved = meta.get("config", {}).get("train")
    if meta.get("weights_only") or not saved:
        return None  # converted weights: a new run, with its own schedule
    old, new = schedule_of(saved), schedule_of(dataclasses.asdict(cfg.train))
    changed = [k for k in old if old[k] != new[k]]
    if not changed:
        return None
    diffs = "; ".join(f"{k} {old[k]:g} (checkpoint) vs {new[k]:g} (now)" for k in changed)
    if override:
        return f"warning: the learning-rate schedule changes at this resume ({diffs}); --override-lr-schedule"
    why = " (lr_decay_iters defaults to train_iters)" if "decay_iters" in changed and not cfg.train.lr_decay_iters else ""
    head = f"checkpoint '{where}' was trained on another learning-rate schedule: {diffs}{why}"
    if "decay_iters" in changed and old["decay_iters"] == old["warmup_iters"]:
        # No flag keeps it: lr_decay_iters must lie beyond warmup_iters.
        raise CheckpointError(f"{head}; the checkpoint's run ended within its warmup, so pass --override-lr-schedule "
                              f"to continue on the new one")
    keep = " ".join(f"{SCHEDULE_FLAGS[k]} {old[k]:g}" for k in changed)
    raise CheckpointError(f"{head}; pass {keep} to keep the checkpoint's, or --override-lr-schedule to continue on the "
                          f"new one (the LR jumps at the resume)")
