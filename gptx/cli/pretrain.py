"""launch/pretrain.py: parse the training flags into a Config and RunPaths, check the launch, train."""
from __future__ import annotations

import argparse
import os
import sys

from gptx.cli.common import Parser, config_overrides, guarded
from gptx.errors import ConfigError


def _train_flag_help(name: str, doc: str) -> str:
    from gptx.config import TrainConfig
    from gptx.presets import DEFAULT_PRESET, PRESETS
    default = TrainConfig.__dataclass_fields__[name].default
    preset = PRESETS[DEFAULT_PRESET].get("train", {})
    note = f"; the {DEFAULT_PRESET} preset sets {preset[name]:g}" if preset.get(name, default) != default else ""
    if default is None:  # its doc says what unset means
        return doc.replace("%", "%%")
    shown = "''" if default == "" else f"{default:g}" if isinstance(default, float) else str(default)
    return f"{doc.rstrip('.')} (default: {shown}{note})".replace("%", "%%")


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """A --flag for every key of the config's `train` section (dest: the key)."""
    from dataclasses import fields

    from gptx.config import TrainConfig, field_docs
    docs = field_docs(TrainConfig)
    group = p.add_argument_group("training keys (override the preset or YAML file's train: section)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        base = f.type.replace(" | None", "")
        if base == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=_train_flag_help(f.name, docs[f.name]))
        else:
            group.add_argument(flag, dest=f.name, type={"int": int, "float": float, "str": str}[base], default=None,
                               metavar={"int": "N", "float": "X", "str": "TEXT"}[base],
                               help=_train_flag_help(f.name, docs[f.name]))


def pretrain_parser() -> argparse.ArgumentParser:
    import deepspeed

    from gptx.config import MODEL_KEYS
    p = Parser(
        prog="launch/pretrain.py",
        description="Pipeline-parallel GPT pretraining. Run under the launcher: deepspeed --num_gpus N launch/pretrain.py")
    p.add_argument("--model", default=None,
                   help="preset name (default: tiny; with --load, the checkpoint's model) or a YAML file")
    p.add_argument("--data", default=None,
                   help="directory with train.bin/val.bin, or a mixture file (default: the embedded Python "
                        "documentation corpus; with --load, the checkpoint's data)")
    p.add_argument("--save", default=None, help="run directory for checkpoints and metrics (default: "
                                                "runs/NAME-YYYYMMDD-HHMMSS, or the --load directory); refused if it "
                                                "holds another run")
    p.add_argument("--load", default=None,
                   help="continue a run: its directory (the latest checkpoint) or one checkpoint folder (RUN/iter_N). "
                        "The model, training keys, data and DeepSpeed JSON are the checkpoint's unless given again")
    p.add_argument("--override-lr-schedule", action="store_true",
                   help="with --load: continue on this run's LR schedule where it differs from the checkpoint's")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model or training key, e.g. --set n_layer=6 (repeatable); model keys: "
                        + ", ".join(sorted(MODEL_KEYS)))
    p.add_argument("--ds-log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="level of DeepSpeed's own logger; info also shows its start-up prints (topology, each "
                        "stage's layer names, STAGE_PARAMS)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    add_train_flags(p)
    deepspeed.add_config_arguments(p)
    return p


def parse_pretrain_args(argv: list[str] | None = None):
    """argv -> (Config, RunPaths), validated."""
    from gptx.config import TRAIN_KEYS, load_config
    from gptx.training.plan import RunPaths

    args = pretrain_parser().parse_args(argv)
    if args.deepscale_config:  # DeepSpeed's old name for it, which its own parser still adds
        if args.deepspeed_config not in (None, args.deepscale_config):
            raise ConfigError("--deepscale_config is DeepSpeed's old name for --deepspeed_config; give one of them")
        args.deepspeed_config = args.deepscale_config
    overrides = config_overrides(args, TRAIN_KEYS)  # only what was given: flags default to None, --set to []
    load, tag = args.load, None
    if load is None:
        cfg = load_config(args.model, overrides)
    else:
        # Resume the run as it was: the checkpoint's config is the layer under --model (if given
        # again) and the overrides; data and DeepSpeed JSON follow in plan_run the same way.
        from gptx.training import resume
        from gptx.training.metrics import log
        resume.check_save_dir(args.save, resume.run_dir_of(load))  # before reading another run
        run_dir, tag, meta = resume.resolve_load(load, warn=log, save=args.save)
        load = str(run_dir)
        cfg = load_config(args.model, overrides, saved=meta.get("config"))
    return cfg, RunPaths(data=args.data, save=args.save, load=load, load_tag=tag,
                         deepspeed_config=args.deepspeed_config, ds_log_level=args.ds_log_level,
                         override_lr_schedule=args.override_lr_schedule)


def run_pretrain(argv: list[str] | None = None, as_script: bool = False) -> int:
    """launch/pretrain.py; `as_script`: this process is the script itself (not a test calling in),
    so it may check the launcher's port and, without a launcher, make itself a world of one."""
    def main():
        from gptx.parallel.launching import (adopt_mpi_ranks, check_master_port, check_world_known, single_process_env,
                                             under_launcher)
        adopt_mpi_ranks()
        check_world_known()
        launched = under_launcher()
        if as_script:
            # First, before the heavy imports: a taken port stops rank 0 while the other ranks are still
            # importing, so the launcher ends them before they reach the other run's rendezvous.
            check_master_port()
            single_process_env()  # `python launch/pretrain.py`: one process, as `deepspeed --num_gpus 1`
        from gptx.training.trainer import pretrain
        cfg, paths = parse_pretrain_args(argv)
        if "WORLD_SIZE" in os.environ:  # else DeepSpeed discovers the world (a cluster's variables)
            check_stages_fit(cfg.train.pipe_parallel_size, int(os.environ["WORLD_SIZE"]), launched)
        pretrain(cfg, paths)
    return guarded(main)


def check_stages_fit(stages: int, world: int, launched: bool) -> None:
    """More pipeline stages than processes: name the launcher line that starts them (a stage is a process)."""
    if stages <= world:
        return  # a count that does not divide the world is plan_run's error
    started = f", {world} launched" if launched else ""
    raise ConfigError(f"{stages} pipeline stages need {stages} processes{started}: run deepspeed --num_gpus {stages} "
                      f"launch/pretrain.py, or --pipe-parallel-size {world}")


def main() -> None:
    """The script's whole life (launch/pretrain.py, python -m gptx.cli.pretrain): train, then exit with its code."""
    code = run_pretrain(as_script=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is saved and the process group is gone. Skip interpreter teardown: a gloo or
    # DeepSpeed thread still being destroyed there sometimes aborts a finished run
    # ("terminate called without an active exception", seen on a rank of a finished bf16 run).
    os._exit(code)


if __name__ == "__main__":
    main()
