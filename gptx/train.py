"""The training loop: validate everything, build the engine, train_batch, evaluate, checkpoint.

`pretrain()` is what `launch/pretrain.py` runs on every rank. All checks of user input
happen before torch.distributed starts or any layer is built.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist

from gptx import checkpoint
from gptx.config import Config, ModelConfig, describe_model
from gptx.data import TokenWindows, default_data_dir, open_tokens
from gptx.engine import build_engine, check_step, deepspeed_prints, loss_scale, release_shared_memory
from gptx.ds_config import (BatchLayout, check_ds_config, default_ds_config_path, offload_devices, precision,
                            read_ds_config, zero_stage)
from gptx.errors import ConfigError, DataError, TrainingStopped
from gptx.flops import mfu, peak_flops
from gptx.guards import NumericsGuard, StopSignal, known_failure
from gptx.launching import port_in_use
from gptx.metrics import Metrics, console_line
from gptx.mixture import REPEAT_WARNING, Source, as_record, check_sources, describe, sources_for
from gptx.schedule import BatchRamp, SeqLenWarmup


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


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def log(msg: str) -> None:
    """Console output, from global rank 0 only."""
    if _rank() == 0:
        print(msg, flush=True)


def _accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name()


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


def plan_run(cfg: Config, paths: RunPaths) -> Plan:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pp = cfg.train.pipe_parallel_size
    if pp and world % pp:
        raise ConfigError(f"--pipe-parallel-size {pp} does not divide the world size {world} "
                          f"(processes launched); launch a multiple of {pp} processes or change it")
    accelerator = _accelerator_name()
    load_dir, tag, meta = None, None, None
    if paths.load:
        checkpoint.check_save_dir(paths.save, checkpoint.run_dir_of(paths.load))
        if paths.load_tag:  # parse_pretrain_args chose it (and said what it had to)
            load_dir, tag = Path(paths.load), paths.load_tag
            meta = json.loads((load_dir / tag / checkpoint.META).read_text())
        else:
            load_dir, tag, meta = checkpoint.resolve_load(paths.load, warn=log)
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
    if paths.data:
        data = Path(paths.data)
        if not data.exists():
            raise DataError(f"--data '{data}': not a directory (train.bin, val.bin, meta.json) or a mixture file (.yaml)")
        sources = sources_for(data)
        if from_checkpoint:
            changes += _data_change(meta, data, sources)
    elif from_checkpoint and (meta.get("data_sources") or meta.get("data")):
        data, sources = checkpoint_data(meta, where)
    else:
        data = default_data_dir()
        sources = sources_for(data)
        if from_checkpoint:
            log(f"note: checkpoint '{where}' does not record its data (saved by an older gptx): training on the "
                f"default corpus; pass --data DIR to train on the run's own data")
    # A resumed model keeps its table: one padded by hand (50304 rows for GPT-2 data) trains on.
    check_sources(sources, cfg.model.vocab_size, cfg.model.seq_len, allow_smaller_vocabulary=bool(paths.load))
    if not paths.load:  # a resume checked it first, before reading its checkpoint
        checkpoint.check_save_dir(paths.save, None)
    if meta is not None:
        cfg, note = checkpoint.keep_saved_padding(meta, cfg, where)
        if note:
            log(note)
        checkpoint.check_compatible(meta, cfg, pp, where)
        warning = checkpoint.check_schedule(meta, cfg, where, paths.override_lr_schedule)
        if warning:
            log(warning)
        changes = checkpoint.config_changes(meta, cfg) + changes
        for line in changes:  # every check passed: what this resume changes, once
            log(f"changed since the checkpoint: {line}")
    encoding = None
    if cfg.train.sample_tokens:
        from gptx.data import GPT2_VOCAB_SIZE, gpt2_encoding
        if cfg.model.vocab_size == GPT2_VOCAB_SIZE:
            encoding = gpt2_encoding()
        elif cfg.train.sample_prompt:
            raise ConfigError(f"train.sample_prompt is text for GPT-2 BPE, but this model has "
                              f"{cfg.model.vocab_size} tokens; leave it empty to sample from token 0")
    ramp = (BatchRamp.parse(cfg.train.rampup_batch_size, layout.global_batch, layout.micro_batch * layout.dp_size)
            if cfg.train.rampup_batch_size else None)
    warmup = SeqLenWarmup.parse(cfg.train.seq_len_warmup, cfg.model.seq_len) if cfg.train.seq_len_warmup else None
    return Plan(cfg, ds_config, ds_path, layout, data, sources, tag, accelerator, meta, load_dir, tuple(changes),
                encoding, ramp, warmup)


def _describe_data(data, records: list[dict]) -> str:
    """One directory as its path; a mixture as its file and each source's share."""
    if len(records) == 1:
        return records[0]["path"]
    return f"{data} (" + ", ".join(f"{Path(r['path']).name} {r['weight']:.3f}" for r in records) + ")"


def _data_change(meta: dict, data: Path, sources: list[Source]) -> list[str]:
    """The 'changed' line for a --data given again that reads other data than the checkpoint's run."""
    saved, now = meta.get("data_sources"), as_record(sources)
    if saved is None:  # recorded before mixtures: the path as given then
        if meta.get("data") is None or Path(meta["data"]).resolve() == data.resolve():
            return []
        return [f"data {meta['data']} -> {_describe_data(data, now)}"]
    if saved == now:
        return []
    return [f"data {_describe_data(meta.get('data'), saved)} -> {_describe_data(data, now)}"]


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


GLIBC_MMAP_CEILING = 32 * 2 ** 20
"""glibc's largest mmap threshold on 64-bit: blocks above it are always mapped and unmapped."""


def configure_host(accelerator: str, model: ModelConfig | None = None, micro_batch: int = 0) -> int:
    """This process's settings for training on a CPU; returns its thread count. Given the model
    and micro-batch, freed memory is kept for reuse when an iteration's largest tensors would
    otherwise be mapped afresh each time (see keep_freed_memory)."""
    if accelerator == "cpu":
        if "OMP_NUM_THREADS" not in os.environ:
            # Ranks on one CPU share its cores; without this each would start a thread per core.
            local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        if model is not None and largest_activation_bytes(model, micro_batch) > GLIBC_MMAP_CEILING:
            keep_freed_memory()
    return torch.get_num_threads()


def largest_activation_bytes(model: ModelConfig, micro_batch: int) -> int:
    """The fp32 logits of a micro-batch, or the MLP's hidden activations if wider."""
    hidden = model.ffn_hidden * (2 if model.mlp == "swiglu" else 1)
    return micro_batch * model.seq_len * max(model.padded_vocab_size, hidden) * 4


def keep_freed_memory() -> bool:
    """Keep freed host memory in the process for the next iteration (glibc only).

    glibc serves every allocation over 32 MiB with its own mmap and unmaps it when freed, so
    each iteration faults the pages of its logits and activations in afresh, zeroed by the
    kernel. Serving all allocations from the heap and trimming it only above 2 GiB free keeps
    those pages; the process holds its peak memory instead of returning it between iterations,
    and the heap's fragmentation adds to that peak (peak RSS grew by 25-65% on
    models whose tensors stay under 32 MiB, where nothing is gained: configure_host leaves
    those alone).
    Alternating both settings in one process on this project's 2-core CPU, the engine trained a
    4 x 256 model with GPT-2's vocabulary at 1.27x the speed (docs/performance.md).
    GPTX_KEEP_FREED_MEMORY=0 opts out."""
    import ctypes
    if os.environ.get("GPTX_KEEP_FREED_MEMORY") == "0":  # opt out: return freed memory to the OS
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        set_option = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(set_option(M_MMAP_MAX, 0)) and bool(set_option(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def return_freed_memory(promptly: bool = True) -> bool:
    """With `promptly`, map every allocation over 64 KiB on its own and unmap it when freed
    (glibc only), so this process's resident memory follows its live tensors: what
    tools/strategies.py measures. glibc's default keeps freed blocks of up to 32 MiB in its
    heap, and a ZeRO-3 step gathers and frees every layer: on this project's CPU its peak RSS
    held 0.6 GiB more (docs/parallelism-and-memory.md). The price is page faults on every allocation, so timing
    goes back to blocks over 32 MiB only (`promptly=False`), where glibc's own threshold settles."""
    import ctypes
    try:
        set_option = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False
    # Setting the threshold stops glibc's own adjustment, which also raises the heap's trim
    # threshold to twice the mmap threshold: set both as that adjustment would have.
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    threshold = 64 * 1024 if promptly else GLIBC_MMAP_CEILING
    return bool(set_option(M_MMAP_THRESHOLD, threshold)) and bool(set_option(M_TRIM_THRESHOLD, 2 * threshold))


def _new_run_dir(cfg: Config) -> Path:
    """runs/NAME-TIME, made by rank 0 and new: two runs started in the same second get -2, -3..."""
    name = Path(cfg.name).stem if cfg.name.endswith((".yaml", ".yml")) else cfg.name
    chosen = [None]
    if dist.get_rank() == 0:
        base = Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        base.parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):
            candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            chosen = [str(candidate)]
            break
    dist.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])


def evaluate(engine, val_splits: list, plan: Plan, dp_rank: int) -> tuple[float, list[float]]:
    """Token-weighted mean loss over the first eval_iters batches of each source's val split;
    overall, the sources' losses weighted by their shares of the mixture."""
    layout, cfg = plan.layout, plan.cfg
    per_source = []
    for tokens in val_splits:
        windows = TokenWindows(tokens, cfg.model.seq_len, layout.micro_batch, dp_rank, layout.dp_size, shuffle=False)
        # Every micro-batch holds the same number of tokens, so the mean of means is token-weighted.
        # The JSON's micro-batches per evaluation batch, whatever the ramp has the engine train with.
        losses = [float(engine.eval_batch(windows, num_micro_batches=layout.grad_accum))
                  for _ in range(cfg.train.eval_iters)]
        per_source.append(sum(losses) / len(losses))
    return sum(s.weight * loss for s, loss in zip(plan.sources, per_source)), per_source


def sample_text(engine, plan: Plan, iteration: int) -> str | None:
    """Collective: gather every stage's layers to rank 0, which generates from the plain model.

    Costs a copy of the weights on rank 0's host, so it is an option for small and medium
    models. Its own seeded generator leaves the training RNG streams untouched.
    """
    from gptx.data import GPT2_EOT
    from gptx.generate import generate
    from gptx.model import GPT
    gathered = gather_layer_states(engine)
    if dist.get_rank() != 0:
        return None
    cfg = plan.cfg
    model = GPT(cfg.model, seed=cfg.train.seed)
    for part in gathered:
        for idx, state in part.items():
            model.layers[str(idx)].load_state_dict(state)
    enc = plan.encoding
    prompt = (enc.encode_ordinary(cfg.train.sample_prompt) or [GPT2_EOT]) if enc else [0]
    ids = generate(model, prompt, cfg.train.sample_tokens, temperature=0.8, top_k=40,
                   seed=cfg.train.seed + iteration, stop_token=GPT2_EOT if enc else None)
    return enc.decode(ids) if enc else " ".join(map(str, ids))


def _stages(pipe_size: int) -> str:
    return "no pipeline" if pipe_size == 0 else f"{pipe_size} pipeline stage(s)"


def gather_layer_states(engine) -> list[dict] | None:
    """Collective: at rank 0, a list of {layer index: state dict (fp32, host)} covering every layer."""
    from gptx.sequential import DataParallelEngine, layer_states
    if isinstance(engine, DataParallelEngine):
        states = layer_states(engine)
        return [{i: {k: v.float() for k, v in s.items()} for i, s in states.items()}] if states is not None else None
    module = engine.module
    mine = {}
    if engine.grid.get_data_parallel_rank() == 0:
        for local, layer in enumerate(module.forward_funcs):
            if hasattr(layer, "state_dict"):  # the tied head is a function of the embedding
                mine[local + module._local_start] = {k: v.detach().float().cpu() for k, v in layer.state_dict().items()}
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return gathered


def resume(engine, plan: Plan, paths: RunPaths) -> tuple[int, int, int]:
    """Collective: load the checkpoint plan_run chose; returns (iteration, samples consumed, tokens trained on)."""
    t = plan.cfg.train
    saved_pp = plan.resume_meta.get("pipe_parallel_size")
    if plan.resume_meta.get("weights_only"):
        checkpoint.load_weights_only(engine, plan.load_dir, plan.resume_tag)
        state = plan.resume_meta
        log(f"starting from the weights of {plan.resume_meta.get('source', 'a weights-only checkpoint')}; "
            f"the optimizer starts fresh")
    elif saved_pp == t.pipe_parallel_size:
        state = checkpoint.load(engine, plan.load_dir, plan.resume_tag)
    else:
        checkpoint.load_weights_only(engine, plan.load_dir, plan.resume_tag)
        state = plan.resume_meta
        engine.lr_scheduler.load_state_dict({"steps": state.get("lr_steps", state["iteration"])})
        log(f"warning: the checkpoint has {_stages(saved_pp)} and this run {_stages(t.pipe_parallel_size)}: "
            f"weights, iteration, data position and LR schedule carry over exactly; the optimizer's "
            f"moments (per-stage state) restart from zero")
    iteration, consumed = state["iteration"], state["consumed_samples"]
    tokens = state.get("tokens", consumed * plan.cfg.model.seq_len)
    log(f"resumed from {plan.load_dir / plan.resume_tag}: iteration {iteration}, {tokens:,} tokens seen")
    return iteration, consumed, tokens


def pretrain(cfg: Config, paths: RunPaths) -> Path:
    """Train on every rank; returns the run directory."""
    import deepspeed

    plan = plan_run(cfg, paths)
    cfg = plan.cfg  # a resumed checkpoint may keep its own table size
    t = cfg.train
    threads = configure_host(plan.accelerator, cfg.model, plan.layout.micro_batch)
    from deepspeed.utils.logging import set_log_level_from_string
    set_log_level_from_string(paths.ds_log_level)
    owns_process_group = not dist.is_initialized()
    from datetime import timedelta
    show_ds = paths.ds_log_level in ("info", "debug")
    with deepspeed_prints(show_ds):
        try:
            deepspeed.init_distributed(timeout=timedelta(seconds=t.dist_timeout))
        except Exception as e:
            failure = port_in_use(e)  # taken after launch/pretrain.py's early check
            if failure is None:
                raise
            raise failure from None
    rank = dist.get_rank()
    torch.manual_seed(t.seed + rank)  # dropout streams; layer init has its own seeds

    from gptx.pipeline import stage_param_counts, tied_weight_max_diff
    from gptx.sequential import DataParallelEngine, parameter_count
    engine = build_engine(cfg, plan.ds_config, show_deepspeed_prints=show_ds)
    model = engine.module
    pipelined = not isinstance(engine, DataParallelEngine)
    layout = plan.layout
    grid = engine.grid
    dp_rank = grid.get_data_parallel_rank()

    run_dir = Path(paths.save) if paths.save else (plan.load_dir if plan.load_dir else _new_run_dir(cfg))
    meta = {"config": cfg.to_dict(), "ds_config": plan.ds_config, "ds_config_path": plan.ds_config_path,
            "pipe_parallel_size": t.pipe_parallel_size, "data_parallel_size": layout.dp_size,
            # Absolute, so that --load alone finds the data from any working directory.
            "data": str(plan.data.resolve()), "data_sources": as_record(plan.sources),
            "code_version": checkpoint.code_version()}
    checkpoint.prepare_run_dir(run_dir, json.dumps(meta, indent=2) + "\n")

    iteration, consumed, tokens = resume(engine, plan, paths) if plan.resume_tag else (0, 0, 0)
    first_iteration = iteration

    log(f"model '{cfg.name}': {describe_model(cfg.model)}")
    log(describe_layout(cfg, plan, threads))
    if pipelined:
        stage_params, parts = stage_param_counts(model), model.parts
        for s, n in enumerate(stage_params):
            log(f"  stage {s}: layers {parts[s]}-{parts[s + 1] - 1}, {n:,} parameters")
    else:
        log(f"  layers 0-{len(model._forward_fns) - 1}, {parameter_count(engine):,} parameters")
    log(f"batch: {layout.micro_batch} x {layout.grad_accum} micro-batches x {layout.dp_size} = "
        f"{layout.global_batch} sequences of {cfg.model.seq_len} tokens"
        + (f", ramped up from {plan.ramp.start} over {plan.ramp.samples:,} samples" if plan.ramp else "")
        + f"; data {plan.data}")

    train_splits = [open_tokens(s.path, "train") for s in plan.sources]
    val_splits = [open_tokens(s.path, "val") for s in plan.sources]
    windows = TokenWindows(train_splits, cfg.model.seq_len, layout.micro_batch, dp_rank, layout.dp_size,
                           seed=t.seed, start_sample=consumed, weights=[s.weight for s in plan.sources])
    metrics = Metrics(run_dir, cfg)
    if len(plan.sources) == 1:
        unused = len(train_splits[0]) - 1 - windows.n_windows * cfg.model.seq_len
        log(f"data: {windows.n_windows:,} windows of {cfg.model.seq_len} predictions per epoch, reshuffled each "
            f"epoch; {unused} token(s) at the end of train.bin fill no window and are not used"
            + (f"; resuming at sample {consumed:,} (epoch {consumed // windows.n_windows})" if plan.resume_tag else ""))
    else:
        run_samples = plan.ramp.samples_over(t.train_iters) if plan.ramp else t.train_iters * layout.global_batch
        mixture = describe(plan.sources, cfg.model.seq_len, run_samples)
        metrics.write({"iter": iteration, "data": {"sources": mixture}})
        log(f"data: a mixture of {len(mixture)} sources, shares of the training samples"
            + (f"; resuming at sample {consumed:,}" if plan.resume_tag else ""))  # a new run resumes nothing
        for m in mixture:
            repeat = f"  (warning: repeats {m['epochs']:.1f} times)" if m["epochs"] > REPEAT_WARNING else ""
            log(f"  {m['path']}: {m['windows']:,} windows, share {m['weight']:.3f}, {m['epochs']:.2f} epochs over "
                f"the run{repeat}")
    peak = peak_flops(plan.accelerator, precision(plan.ds_config))
    start_time = time.time()
    saved_at = None
    val_loss = None
    first_loss = None
    stop = StopSignal()
    fp16_cfg = plan.ds_config.get("fp16", {})
    guard = NumericsGuard(cfg, engine.fp16_enabled(), fp16_cfg.get("min_loss_scale", 1) if fp16_cfg else None,
                          engine.skipped_steps)
    device = engine.device
    space = checkpoint.SpaceWatch()

    def save(iteration: int) -> None:
        nonlocal saved_at
        progress = {"iteration": iteration, "consumed_samples": consumed,
                    "tokens": tokens, "lr_steps": engine.lr_scheduler.steps,
                    "pipe_parallel_size": t.pipe_parallel_size, "data_parallel_size": layout.dp_size}
        folder = checkpoint.save(engine, run_dir, iteration, progress, meta, space)
        saved_at = iteration
        drift = tied_weight_max_diff(model) if pipelined else 0.0  # one copy of the embedding
        metrics.write({"iter": iteration, "checkpoint": folder.name, "tied_weight_max_diff": drift})
        log(f"iter {iteration:6d} | saved checkpoint {folder} (tied weights max diff {drift:.3g})")
        if t.keep_checkpoints and dist.get_rank() == 0:
            for old in checkpoint.prune(run_dir, t.keep_checkpoints):
                log(f"iter {iteration:6d} | removed old checkpoint {old.name}")
        if dist.get_rank() == 0:
            warning = checkpoint.check_next_fits(run_dir, space)
            if warning:
                log(f"iter {iteration:6d} | {warning}")

    shape = cfg.model.seq_len  # the sequence length the pipeline's buffers were last used with
    try:
        while iteration < t.train_iters:
            lr = engine.get_lr()[0]
            batch = plan.batch_at(consumed)
            if batch != engine.train_batch_size():  # every rank: same samples consumed, same answer
                engine.set_train_batch_size(batch)
                if plan.ramp:
                    log(f"iter {iteration + 1:6d} | batch size {batch} sequences "
                        f"({batch // (layout.micro_batch * layout.dp_size)} micro-batches)")
            length = plan.warmup.length_at(iteration) if plan.warmup else cfg.model.seq_len
            if length != windows.length:
                windows.length = length
                log(f"iter {iteration + 1:6d} | sequence length {length}")
            if length != shape:  # every rank: the pipeline's buffers hold the last shape it ran
                engine.reset_activation_shape()
                shape = length
            t0 = time.perf_counter()
            # The step's host reads, once each, after it: nothing in train_batch's micro-batches waits
            # for the device (docs/performance.md).
            loss = float(engine.train_batch(windows))
            dt = time.perf_counter() - t0
            check_step(engine)
            iteration += 1
            consumed += batch
            tokens += batch * length
            first_loss = loss if first_loss is None else first_loss
            grad_norm = engine.get_global_grad_norm()
            tps = batch * length / dt
            record = {"iter": iteration, "loss": loss, "lr": lr,
                      "grad_norm": float(grad_norm) if grad_norm is not None else None,
                      "loss_scale": loss_scale(engine), "skipped_steps": engine.skipped_steps, "batch_size": batch,
                      "tokens": tokens, "tokens_per_sec": tps, "seq_len": length,
                      "mfu": mfu(tps, dataclasses.replace(cfg.model, seq_len=length), peak, dist.get_world_size()),
                      "elapsed": time.time() - start_time}
            metrics.write(record)
            if iteration % t.log_interval == 0 or iteration == 1:
                log(console_line(record))
            checkpoint.fault_point("step", iteration)
            try:
                warning = guard.check(iteration, loss, engine.skipped_steps, record["loss_scale"])
            except TrainingStopped as e:
                metrics.close()
                where = (f"the last good checkpoint is {run_dir / checkpoint.tag_for(saved_at)}" if saved_at
                         else f"the run has no checkpoint newer than {plan.load_dir or 'its start'}")
                raise TrainingStopped(f"{e}. Stopped without saving; {where}") from None
            if warning:
                log(warning)
                metrics.write({"iter": iteration, "spike": loss, "running_mean": guard.mean})

            last = iteration == t.train_iters
            exiting = bool(t.exit_interval) and iteration % t.exit_interval == 0
            if t.eval_interval and (iteration % t.eval_interval == 0 or last):
                if shape != cfg.model.seq_len:  # evaluation is at the full length
                    engine.reset_activation_shape()
                    shape = cfg.model.seq_len
                val_loss, per_source = evaluate(engine, val_splits, plan, dp_rank)
                record = {"iter": iteration, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 80))}
                each = ""
                if len(per_source) > 1:
                    record["val_loss_per_source"] = {str(s.path): v for s, v in zip(plan.sources, per_source)}
                    names = [s.path.name for s in plan.sources]
                    names = names if len(set(names)) == len(names) else [str(s.path) for s in plan.sources]
                    each = " | " + ", ".join(f"{n} {v:.4f}" for n, v in zip(names, per_source))
                metrics.write(record)
                log(f"iter {iteration:6d} | val loss {val_loss:.4f} | val ppl {math.exp(min(val_loss, 80)):.2f}{each}")
                if t.sample_tokens:
                    text = sample_text(engine, plan, iteration)
                    if text is not None:
                        metrics.write({"iter": iteration, "sample": text})
                        log(f"iter {iteration:6d} | sample: {text!r}")
            if last or exiting or (t.save_interval and iteration % t.save_interval == 0):
                save(iteration)
            if exiting and not last:
                log(f"exit interval {t.exit_interval} reached at iteration {iteration}")
                break
            signal_name = stop.agreed(device)
            if signal_name and not last:
                if saved_at != iteration:
                    save(iteration)
                log(f"stopped by {signal_name} at iteration {iteration}; --load {run_dir} continues from here")
                break
    except (TrainingStopped, checkpoint.CheckpointWriteError):
        if owns_process_group:  # every rank stops at the same iteration: tear down together
            dist.barrier()
            dist.destroy_process_group()
            release_shared_memory()
        raise
    except Exception as e:
        failure = known_failure(e, rank, t.dist_timeout)
        if failure is None:
            raise
        release_shared_memory()
        raise failure from None
    finally:
        stop.restore()

    metrics.close()
    summary = f"done: {iteration - first_iteration} iterations in {time.time() - start_time:.1f} s"
    if first_iteration:
        summary += f" (iterations {first_iteration + 1}-{iteration})"
    if first_loss is not None:
        summary += f"; train loss {first_loss:.3f} -> {loss:.3f}"
    if val_loss is not None:
        summary += f"; val loss {val_loss:.3f}"
    log(summary)
    log(f"run directory: {run_dir.resolve()}" + (f" (latest checkpoint: iteration {saved_at})" if saved_at else ""))
    if owns_process_group:
        # Tear down together: a rank exiting while gloo threads still run can abort ("terminate called").
        dist.barrier()
        dist.destroy_process_group()
        release_shared_memory()
    return run_dir
