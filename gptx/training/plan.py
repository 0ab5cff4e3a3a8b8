"""A run's plan: every input checked and resolved (DeepSpeed JSON, batch layout, data sources,
the checkpoint to resume and what changed since it) before torch.distributed starts or any
layer is built. gptx.training.trainer runs the plan.
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from gptx.config import Config
from gptx.data.default_corpus import default_data_dir
from gptx.data.mixture import Source, as_record, check_sources, sources_for, token_count_changes
from gptx.data.tokens import gpt2_encoding, reads_gpt2_bpe
from gptx.errors import ConfigError, DataError
from gptx.parallel.ds_config import (BatchLayout, check_ds_config, default_ds_config_path, offload_devices, precision,
                                     read_ds_config, zero_stage)
from gptx.parallel.host import accelerator_name
from gptx.training import checkpoint_files, resume
from gptx.training.metrics import log
from gptx.training.schedule import BatchRamp, SeqLenWarmup


@dataclass(frozen=True)
class RunPaths:
    """Where things are: CLI-only settings that are not part of the model or schedule."""

    data: str | None = None
    save: str | None = None
    load: str | None = None
    """A run directory or one of its checkpoint folders (RUN/iter_N)."""
    load_tag: str | None = None
    """The checkpoint folder in `load` (a run directory) that the command line already chose; None:
    plan_run chooses (find_latest) and warns as it does."""
    deepspeed_config: str | None = None
    ds_log_level: str = "warning"
    """DeepSpeed's own logger; 'info' shows its STAGE=... LAYERS=... STAGE_PARAMS=... start-up lines."""
    override_lr_schedule: bool = False
    """On --load, continue on this config's LR schedule even if it differs from the checkpoint's."""


@dataclass
class Plan:
    """Everything validated before the heavy work starts."""

    cfg: Config
    ds_config: dict
    ds_config_path: str
    layout: BatchLayout
    data: Path
    """--data as given: a directory or a mixture YAML file (the default corpus when not given)."""
    sources: list[Source]
    resume_tag: str | None
    accelerator: str
    resume_meta: dict | None = None
    load_dir: Path | None = None
    """The run directory resumed from (--load, or the parent of the checkpoint folder it names)."""
    changes: tuple[str, ...] = ()
    """'KEY OLD -> NEW' for what this resume changes since the checkpoint (logged at start-up)."""
    encoding: object | None = None
    """GPT-2 BPE for training-time samples (None: print ids, or samples off)."""
    ramp: BatchRamp | None = None
    """The batch-size ramp (None: every step is the DeepSpeed JSON's train_batch_size)."""
    warmup: SeqLenWarmup | None = None
    """The sequence-length warmup (None: every step at model.seq_len)."""

    def batch_at(self, consumed: int) -> int:
        return self.ramp.size_at(consumed) if self.ramp else self.layout.global_batch


def batch_change(meta: dict, layout, accelerator: str) -> list[str]:
    """The global batch, when it is not the checkpoint's: more or fewer ranks resuming a JSON that
    fixes micro-batch and accumulation change it (a JSON's train_batch_size keeps it)."""
    saved_dp, saved_json = meta.get("data_parallel_size"), meta.get("ds_config")
    if not (isinstance(saved_dp, int) and isinstance(saved_json, dict)):
        return []
    try:
        saved = check_ds_config(saved_json, dp_size=saved_dp, pipe_size=meta.get("pipe_parallel_size") or 0,
                                accelerator_name=accelerator)
    except ConfigError:  # a JSON this version checks otherwise; the JSON line says it changed
        return []
    if saved.global_batch == layout.global_batch:
        return []
    return [f"global batch {saved.global_batch} -> {layout.global_batch} sequences (micro-batch "
            f"{saved.micro_batch} -> {layout.micro_batch}, accumulation {saved.grad_accum} -> {layout.grad_accum}, "
            f"data-parallel {saved.dp_size} -> {layout.dp_size}); set train_batch_size in the DeepSpeed JSON to keep "
            f"it"]


def check_wandb(cfg: Config) -> None:
    """train.wandb_project needs wandb: said before any rank builds an engine."""
    if cfg.train.wandb_project:
        try:
            importlib.import_module("wandb")
        except ImportError:
            raise ConfigError(f"train.wandb_project {cfg.train.wandb_project!r}: wandb cannot be imported here; "
                              f"pip install wandb, or leave the key out") from None


def plan_run(cfg: Config, paths: RunPaths) -> Plan:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pp = cfg.train.pipe_parallel_size
    if pp and world % pp:
        raise ConfigError(f"--pipe-parallel-size {pp} does not divide the world size {world} "
                          f"(processes launched); launch a multiple of {pp} processes or change it")
    accelerator = accelerator_name()
    load_dir, tag, meta = None, None, None
    if paths.load:
        resume.check_save_dir(paths.save, resume.run_dir_of(paths.load))
        if paths.load_tag:  # parse_pretrain_args chose it (and said what it had to)
            load_dir, tag = Path(paths.load), paths.load_tag
            meta = json.loads((load_dir / tag / checkpoint_files.META).read_text())
        else:
            load_dir, tag, meta = resume.resolve_load(paths.load, warn=log, save=paths.save)
    where = str(load_dir / tag) if tag else None
    # What the checkpoint's run trained with, unless given again (a weights-only checkpoint is
    # converted weights: a new run, with today's defaults for what it does not hold).
    from_checkpoint = meta is not None and not meta.get("weights_only")
    changes = []
    if paths.deepspeed_config or not (from_checkpoint and isinstance(meta.get("ds_config"), dict)):
        ds_path = paths.deepspeed_config or str(default_ds_config_path(accelerator))
        ds_config, ds_where = read_ds_config(ds_path), ds_path
        if from_checkpoint and isinstance(meta.get("ds_config"), dict) and ds_config != meta["ds_config"]:
            keys = sorted(k for k in set(ds_config) | set(meta["ds_config"])
                          if ds_config.get(k) != meta["ds_config"].get(k))
            changes.append(f"deepspeed_config {meta.get('ds_config_path')} -> {ds_path} ({', '.join(keys)})")
    else:  # the JSON as the run read it: the file may have changed or gone since
        ds_path = meta.get("ds_config_path") or "ds_config"
        ds_config, ds_where = json.loads(json.dumps(meta["ds_config"])), f"the DeepSpeed JSON in '{where}'"
    layout = check_ds_config(ds_config, dp_size=data_parallel_size(world, pp), pipe_size=pp,
                             accelerator_name=accelerator, path=ds_where)
    if from_checkpoint:
        changes += batch_change(meta, layout, accelerator)
    if paths.data:
        data = Path(paths.data)
        if not data.exists():
            raise DataError(f"--data '{data}': not a directory (train.bin, val.bin, meta.json) or a mixture file (.yaml)")
        sources = sources_for(data)
        if from_checkpoint:
            changes += _data_change(meta, data, sources)
    elif from_checkpoint and (meta.get("data_sources") or meta.get("data")):
        data, sources = checkpoint_data(meta, where)
        changes += _data_change(meta, data, sources)
    else:
        data = default_data_dir()
        sources = sources_for(data)
        if from_checkpoint:
            log(f"note: checkpoint '{where}' does not record its data (saved by an older gptx): training on the "
                f"default corpus; pass --data DIR to train on the run's own data")
    # A resumed model keeps its table: one padded by hand (50304 rows for GPT-2 data) trains on.
    check_sources(sources, cfg.model.vocab_size, cfg.model.seq_len, allow_smaller_vocabulary=bool(paths.load))
    if not paths.load:  # a resume checked it first, before reading its checkpoint
        resume.check_save_dir(paths.save, None)
    if meta is not None:
        cfg, note = resume.keep_saved_padding(meta, cfg, where)
        if note:
            log(note)
        resume.check_compatible(meta, cfg, pp, where)
        warning = resume.check_schedule(meta, cfg, where, paths.override_lr_schedule)
        if warning:
            log(warning)
        changes = resume.config_changes(meta, cfg) + changes
        for line in changes:  # every check passed: what this resume changes, once
            log(f"changed since the checkpoint: {line}")
    check_wandb(cfg)
    encoding = None
    if cfg.train.sample_tokens and not cfg.train.eval_interval:
        log("note: train.sample_tokens samples at each evaluation, and train.eval_interval 0 runs none")
    if cfg.train.sample_tokens:
        if reads_gpt2_bpe(cfg.model.vocab_size):
            encoding = gpt2_encoding()
        elif cfg.train.sample_prompt:
            raise ConfigError(f"train.sample_prompt is text for GPT-2 BPE, but this model has "
                              f"{cfg.model.vocab_size} tokens; leave it empty to sample from token 0")
    ramp = (BatchRamp.parse(cfg.train.rampup_batch_size, layout.global_batch, layout.micro_batch * layout.dp_size)
            if cfg.train.rampup_batch_size else None)
    warmup = _seq_len_warmup(cfg)
    return Plan(cfg, ds_config, ds_path, layout, data, sources, tag, accelerator, meta, load_dir, tuple(changes),
                encoding, ramp, warmup)


def _seq_len_warmup(cfg: Config) -> SeqLenWarmup | None:
    """The warmup the config asks for; a note when it never reaches model.seq_len."""
    if not cfg.train.seq_len_warmup:
        return None
    warmup = SeqLenWarmup.parse(cfg.train.seq_len_warmup, cfg.model.seq_len)
    (start, length), full = warmup.stages[-1], cfg.model.seq_len
    if length < full:
        log(f"note: train.seq_len_warmup ends at {length} tokens, below model.seq_len {full}: from iteration "
            f"{start + 1} on, every step trains on {length}; end it with ITER:{full} to reach the full length")
    return warmup


def _describe_data(data, records: list[dict]) -> str:
    """One directory as its path; a mixture as its file and each source's share."""
    if len(records) == 1:
        return records[0]["path"]
    return f"{data} (" + ", ".join(f"{Path(r['path']).name} {r['weight']:.3f}" for r in records) + ")"


def _data_change(meta: dict, data: Path, sources: list[Source]) -> list[str]:
    """The 'changed' lines of a resume's data: other directories or shares than the checkpoint's
    run read (a --data given again), and splits that have grown or shrunk since."""
    saved, now = meta.get("data_sources"), as_record(sources)
    if saved is None:  # recorded before mixtures: the path as given then
        if meta.get("data") is None or Path(meta["data"]).resolve() == data.resolve():
            return []
        return [f"data {meta['data']} -> {_describe_data(data, now)}"]
    shares = [[(r["path"], r["weight"]) for r in records] for records in (saved, now)]
    moved = [f"data {_describe_data(meta.get('data'), saved)} -> {_describe_data(data, now)}"]
    return (moved if shares[0] != shares[1] else []) + token_count_changes(saved, now)


def checkpoint_data(meta: dict, where: str) -> tuple[Path, list[Source]]:
    """The data the checkpoint's run trained on: its recorded sources (absolute directories and
    shares, so an edited mixture file or another working directory changes nothing), or, for a
    checkpoint saved before they were recorded, its --data path as given then."""
    recorded = meta.get("data_sources")
    if recorded:
        sources = [Source(Path(r["path"]), float(r["weight"])) for r in recorded]
        gone = [s.path for s in sources if not s.path.is_dir()]
        if gone:
            raise DataError(f"checkpoint '{where}' trained on '{gone[0]}', which is not there now; pass --data DIR "
                            f"(or a mixture file) to resume on data that is")
        return Path(meta.get("data") or sources[0].path), sources
    data = Path(meta["data"])
    if not data.exists():
        raise DataError(f"checkpoint '{where}' trained on --data '{data}' (as given then, relative to where it "
                        f"started), which is not there from here; pass --data DIR")
    return data, sources_for(data)


def data_parallel_size(world: int, pipe_size: int) -> int:
    """Replicas: world / stages, or every rank without a pipeline (pipe_parallel_size 0)."""
    return world // pipe_size if pipe_size else world


def describe_layout(cfg: Config, plan: "Plan", threads: int) -> str:
    t, layout, ds = cfg.train, plan.layout, plan.ds_config
    zero = zero_stage(ds)
    offload = [f"{what} offloaded to {device}" for what, device in zip(("optimizer", "parameters"),
                                                                       offload_devices(ds)) if device != "none"]
    parts = [f"ZeRO-{zero}"] + offload
    if t.activation_checkpoint_interval:
        parts.append(f"activation checkpointing every {t.activation_checkpoint_interval} block(s)")
    if t.pipe_parallel_size == 0:
        head = f"no pipeline: the whole model x {layout.dp_size} data-parallel"
    else:
        head = f"pipeline: {t.pipe_parallel_size} stage(s) x {layout.dp_size} data-parallel, partition '{t.partition_method}'"
    return (f"{head}, {plan.accelerator}, {precision(ds)}, {', '.join(parts)}, {threads} thread(s)/rank")
