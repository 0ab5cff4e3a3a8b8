"""The training loop: build the engine from a checked plan, train_batch, evaluate, checkpoint.

`Trainer(cfg, paths).run()` is what `launch/pretrain.py` runs on every rank. `run()` reads
top to bottom: a step, its record, a checkpoint when due (or when a stop is asked for), then
evaluation when due (a stop signal cuts it short), and the stop. Everything the loop needs was
validated by gptx.training.plan.plan_run first.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from datetime import datetime, timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils.logging import set_log_level_from_string

from gptx import testing
from gptx.config import Config, describe_model
from gptx.data.mixture import REPEAT_WARNING, as_record, describe, windows_per_epoch
from gptx.data.tokens import TokenWindows, open_tokens
from gptx.errors import CheckpointError, TrainingStopped
from gptx.model.flops import mfu, peak_flops
from gptx.parallel.data_parallel import DataParallelEngine, parameter_count
from gptx.parallel.ds_config import precision
from gptx.parallel.engine import build_engine, check_step, deepspeed_prints, loss_scale, release_shared_memory
from gptx.parallel.host import configure_host
from gptx.parallel.launching import port_in_use, rendezvous_timeout
from gptx.parallel.pipeline import stage_param_counts, tied_weight_max_diff
from gptx.training import checkpoint, relayout
from gptx.training.checkpoint_files import tag_for
from gptx.training.evaluation import sample_text, validation_loss
from gptx.training.guards import NumericsGuard, StopSignal, known_failure
from gptx.training.metrics import Metrics, RunClock, console_line, duration, log
from gptx.training.plan import Plan, RunPaths, describe_layout, plan_run


def pretrain(cfg: Config, paths: RunPaths) -> Path:
    """Train on every rank; returns the run directory."""
    return Trainer(cfg, paths).run()


class Trainer:
    """One run on this rank. The counters (iteration, consumed samples, tokens) are what a
    checkpoint records and a resume restores."""

    def __init__(self, cfg: Config, paths: RunPaths):
        self.plan: Plan = plan_run(cfg, paths)
        self.cfg = self.plan.cfg  # a resumed checkpoint may keep its own table size
        self.paths = paths
        self.iteration = self.consumed = self.tokens = 0
        self.saved_at: int | None = None
        self.first_loss = self.last_loss = self.val_loss = self.val_at = None

    # ---- the loop

    def run(self) -> Path:
        t = self.cfg.train
        self.setup()
        if self.iteration >= t.train_iters:
            log(f"note: the checkpoint is at iteration {self.iteration} and train.train_iters is {t.train_iters}: "
                f"nothing left to train; give --train-iters N above {self.iteration} to go on")
        stop = StopSignal()
        try:
            while self.iteration < t.train_iters:
                record = self.train_step()
                self.report(record)
                last = self.iteration == t.train_iters
                exiting = bool(t.exit_interval) and self.iteration % t.exit_interval == 0
                signal_name = stop.agreed(self.engine.device)
                # The checkpoint before the evaluation and sample: they can outlast a scheduler's grace period.
                if last or exiting or signal_name or (t.save_interval and self.iteration % t.save_interval == 0):
                    self.save()
                if t.eval_interval and (self.iteration % t.eval_interval == 0 or last) and not signal_name:
                    signal_name = self.evaluate(stop)  # a signal during it ends it: saved already, or now
                    if signal_name and self.saved_at != self.iteration:
                        self.save()
                if exiting and not last:
                    log(f"exit interval {t.exit_interval} reached at iteration {self.iteration}")
                    break
                if signal_name and not last:
                    log(f"stopped by {signal_name} at iteration {self.iteration}; --load {self.run_dir} continues "
                        f"from here")
                    break
        except (TrainingStopped, checkpoint.CheckpointWriteError):
            self.close()  # every rank stops at the same iteration: tear down together
            raise
        except Exception as e:
            failure = known_failure(e, dist.get_rank(), t.dist_timeout)
            if failure is None:
                raise
            release_shared_memory()
            raise failure from None
        finally:
            stop.restore()
        self.metrics.close()
        self.summarize()
        self.close()
        return self.run_dir

    # ---- before the first step

    def setup(self) -> None:
        """Start torch.distributed, build the engine, check the run directory, resume, write its
        config.json, open the data."""
        plan, cfg, t = self.plan, self.cfg, self.cfg.train
        self.threads = configure_host(plan.accelerator, cfg.model, plan.layout.micro_batch, precision(plan.ds_config))
        set_log_level_from_string(self.paths.ds_log_level)
        self.owns_process_group = not dist.is_initialized()
        show_ds = self.paths.ds_log_level in ("info", "debug")
        with deepspeed_prints(show_ds):
            try:
                deepspeed.init_distributed(timeout=timedelta(seconds=t.dist_timeout))
            except Exception as e:
                failure = port_in_use(e) or rendezvous_timeout(e, t.dist_timeout)  # after pretrain.py's port check
                if failure is None:
                    raise
                raise failure from None
        torch.manual_seed(t.seed + dist.get_rank())  # dropout streams; layer init has its own seeds
        self.engine = build_engine(cfg, plan.ds_config, show_deepspeed_prints=show_ds)
        self.pipelined = not isinstance(self.engine, DataParallelEngine)
        self.dp_rank = self.engine.grid.get_data_parallel_rank()

        self.run_dir = (Path(self.paths.save) if self.paths.save else
                        plan.load_dir if plan.load_dir else new_run_dir(cfg))
        self.meta = {"config": cfg.to_dict(), "ds_config": plan.ds_config, "ds_config_path": plan.ds_config_path,
                     "pipe_parallel_size": t.pipe_parallel_size, "data_parallel_size": plan.layout.dp_size,
                     # Absolute, so that --load alone finds the data from any working directory.
                     "data": str(plan.data.resolve()), "data_sources": as_record(plan.sources),
                     "code_version": checkpoint.code_version()}
        checkpoint.prepare_run_dir(self.run_dir, None)  # an unwritable --save stops here, before the load
        if plan.resume_tag:
            self.iteration, self.consumed, self.tokens = resume(self.engine, plan)
        # After the resume: a checkpoint that fails to load leaves the run's config.json as it was.
        checkpoint.prepare_run_dir(self.run_dir, json.dumps(self.meta, indent=2) + "\n")
        self.first_iteration = self.iteration
        self.log_layout()
        self.open_data()

        self.peak = peak_flops(plan.accelerator, precision(plan.ds_config))
        self.start_time = time.time()
        self.clock = RunClock(t.train_iters)
        fp16 = plan.ds_config.get("fp16", {})  # a static loss_scale never moves: each overflow is at its floor
        floor = (fp16.get("loss_scale") or fp16.get("min_loss_scale", 1)) if fp16 else None
        self.guard = NumericsGuard(cfg, self.engine.fp16_enabled(), floor, self.engine.skipped_steps)
        self.space = checkpoint.SpaceWatch()
        self.shape = cfg.model.seq_len  # the sequence length the pipeline's buffers were last used with

    def log_layout(self) -> None:
        cfg, plan, layout, model = self.cfg, self.plan, self.plan.layout, self.engine.module
        log(f"model '{cfg.name}': {describe_model(cfg.model)}")
        log(describe_layout(cfg, plan, self.threads))
        if self.pipelined:
            parts = model.parts
            for s, n in enumerate(stage_param_counts(model)):
                log(f"  stage {s}: layers {parts[s]}-{parts[s + 1] - 1}, {n:,} parameters")
        else:
            log(f"  layers 0-{len(model._forward_fns) - 1}, {parameter_count(self.engine):,} parameters")
        log(f"batch: {layout.micro_batch} x {layout.grad_accum} micro-batches x {layout.dp_size} = "
            f"{layout.global_batch} sequences of {cfg.model.seq_len} tokens"
            + (f", ramped up from {plan.ramp.start} over {plan.ramp.samples:,} samples" if plan.ramp else "")
            + f"; data {plan.data}")

    def open_data(self) -> None:
        """The training windows at the resumed position, the val splits, metrics.jsonl, and what the data is."""
        cfg, plan, layout, t = self.cfg, self.plan, self.plan.layout, self.cfg.train
        train_splits = [open_tokens(s.path, "train") for s in plan.sources]
        self.val_splits = [open_tokens(s.path, "val") for s in plan.sources]
        self.windows = TokenWindows(train_splits, cfg.model.seq_len, layout.micro_batch, self.dp_rank,
                                    layout.dp_size, seed=t.seed, start_sample=self.consumed,
                                    weights=[s.weight for s in plan.sources])
        self.metrics = Metrics(self.run_dir, cfg)
        consumed, resuming = self.consumed, plan.resume_tag is not None  # a new run resumes nothing
        run_samples = plan.ramp.samples_over(t.train_iters) if plan.ramp else t.train_iters * layout.global_batch
        for source, val in zip(plan.sources, self.val_splits):
            windows, read = windows_per_epoch(val, cfg.model.seq_len), t.eval_iters * layout.global_batch
            if t.eval_interval and read > windows:
                log(f"warning: {source.path}: an evaluation reads {read} samples of val.bin's {windows} windows, so "
                    f"some count more than once; lower train.eval_iters or hold out more data")
        if len(plan.sources) == 1:
            n = self.windows.n_windows
            unused = len(train_splits[0]) - 1 - n * cfg.model.seq_len
            repeat = f" (warning: repeats {run_samples / n:.1f} times)" if run_samples / n > REPEAT_WARNING else ""
            log(f"data: {n:,} windows of {cfg.model.seq_len} predictions per epoch, reshuffled each epoch, "
                f"{run_samples / n:.2f} epochs over the run{repeat}; {unused} token(s) at the end of train.bin fill no "
                f"window and are not used" + (f"; resuming at sample {consumed:,} (epoch {consumed // n})"
                                              if resuming else ""))
            return
        mixture = describe(plan.sources, cfg.model.seq_len, run_samples)
        self.metrics.write({"iter": self.iteration, "data": {"sources": mixture}})
        log(f"data: a mixture of {len(mixture)} sources, shares of the training samples"
            + (f"; resuming at sample {consumed:,}" if resuming else ""))
        for m in mixture:
            repeat = f"  (warning: repeats {m['epochs']:.1f} times)" if m["epochs"] > REPEAT_WARNING else ""
            log(f"  {m['path']}: {m['windows']:,} windows, share {m['weight']:.3f}, {m['epochs']:.2f} epochs over "
                f"the run{repeat}")

    # ---- one step

    def train_step(self) -> dict:
        """Set the step's batch size and sequence length, run train_batch, return its metrics record."""
        engine, layout = self.engine, self.plan.layout
        lr = engine.get_lr()[0]
        batch = self.plan.batch_at(self.consumed)
        if batch != engine.train_batch_size():  # every rank: same samples consumed, same answer
            engine.set_train_batch_size(batch)
            if self.plan.ramp:
                log(f"iter {self.iteration + 1:6d} | batch size {batch} sequences "
                    f"({batch // (layout.micro_batch * layout.dp_size)} micro-batches)")
        length = self.plan.warmup.length_at(self.iteration) if self.plan.warmup else self.cfg.model.seq_len
        if length != self.windows.length:
            self.windows.length = length
            log(f"iter {self.iteration + 1:6d} | sequence length {length}")
        self.use_length(length)
        t0 = time.perf_counter()
        # The step's host reads, once each, after it: nothing in train_batch's micro-batches waits
        # for the device (docs/performance.md).
        loss = float(engine.train_batch(self.windows))
        dt = time.perf_counter() - t0
        check_step(engine)
        self.iteration += 1
        self.consumed += batch
        self.tokens += batch * length
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.last_loss = loss
        grad_norm = engine.get_global_grad_norm()
        tps = batch * length / dt
        record = {"iter": self.iteration, "loss": loss, "lr": lr,
                  "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "loss_scale": loss_scale(engine), "skipped_steps": engine.skipped_steps, "batch_size": batch,
                  "tokens": self.tokens, "tokens_per_sec": tps, "seq_len": length,
                  "mfu": mfu(tps, dataclasses.replace(self.cfg.model, seq_len=length), self.peak,
                             dist.get_world_size()),
                  "elapsed": time.time() - self.start_time}
        record["eta_s"] = self.clock.eta(self.iteration, self.start_time + record["elapsed"])
        return record

    def use_length(self, length: int) -> None:
        if length != self.shape:  # every rank: the pipeline's buffers hold the last shape it ran
            self.engine.reset_activation_shape()
            self.shape = length

    def report(self, record: dict) -> None:
        """metrics.jsonl, the console line, the ETA once; the numerics guard's verdict on the loss."""
        t, iteration = self.cfg.train, self.iteration
        self.metrics.write(record)
        if iteration % t.log_interval == 0 or iteration == 1:
            log(console_line(record))
        if self.clock.first_estimate(iteration):
            log(f"iter {iteration:6d} | estimated time to iteration {t.train_iters}: "
                f"{duration(record['eta_s'])} at the pace since iteration {iteration - self.clock.settle}")
        testing.fault_point("step", iteration)
        try:
            warning = self.guard.check(iteration, record["loss"], self.engine.skipped_steps, record["loss_scale"],
                                       record["grad_norm"])
        except TrainingStopped as e:
            self.metrics.close()
            newest = self.run_dir / tag_for(self.saved_at) if self.saved_at else None
            if newest and self.saved_at == iteration - 1:  # resumed, it would meet the same batch the same way
                where = f"the newest checkpoint, {newest}, holds the weights that led to this: --load an earlier one"
            else:
                where = (f"the last good checkpoint is {newest}" if newest
                         else f"the run has no checkpoint newer than {self.plan.load_dir or 'its start'}")
            raise TrainingStopped(f"{e}. Stopped without saving; {where}") from None
        if warning:
            log(warning)
            self.metrics.write({"iter": iteration, "spike": record["loss"], "running_mean": self.guard.mean})

    # ---- evaluation and checkpoints

    def evaluate(self, stop: StopSignal) -> str | None:
        """Validation loss per source (and their mixture), and a sample when asked for. A stop
        signal ends it after the batch it arrives in; returns that signal's name."""
        plan, iteration = self.plan, self.iteration
        self.use_length(self.cfg.model.seq_len)  # evaluation is at the full length
        losses = validation_loss(self.engine, self.val_splits, plan, self.dp_rank,
                                 lambda: stop.agreed(self.engine.device))
        if isinstance(losses, str):
            log(f"iter {iteration:6d} | evaluation stopped by {losses}")
            return losses
        (self.val_loss, per_source), self.val_at = losses, iteration
        ppl = math.exp(min(self.val_loss, 80))
        record = {"iter": iteration, "val_loss": self.val_loss, "val_ppl": ppl}
        each = ""
        if len(per_source) > 1:
            record["val_loss_per_source"] = {str(s.path): v for s, v in zip(plan.sources, per_source)}
            names = [s.path.name for s in plan.sources]
            names = names if len(set(names)) == len(names) else [str(s.path) for s in plan.sources]
            each = " | " + ", ".join(f"{n} {v:.4f}" for n, v in zip(names, per_source))
        self.metrics.write(record)
        log(f"iter {iteration:6d} | val loss {self.val_loss:.4f} | val ppl {ppl:.2f}{each}")
        if self.cfg.train.sample_tokens:
            text = sample_text(self.engine, plan, iteration, lambda: bool(stop.received))
            if text is not None:
                self.metrics.write({"iter": iteration, "sample": text})
                log(f"iter {iteration:6d} | sample: {text!r}")
            return stop.agreed(self.engine.device)  # one that cut the sample short stops the run here
        return None

    def save(self) -> None:
        t, iteration = self.cfg.train, self.iteration
        progress = {"iteration": iteration, "consumed_samples": self.consumed, "tokens": self.tokens,
                    "lr_steps": self.engine.lr_scheduler.steps, "pipe_parallel_size": t.pipe_parallel_size,
                    "data_parallel_size": self.plan.layout.dp_size}
        folder = checkpoint.save(self.engine, self.run_dir, iteration, progress, self.meta, self.space)
        self.saved_at = iteration
        drift = tied_weight_max_diff(self.engine.module) if self.pipelined else 0.0  # one copy of the embedding
        self.metrics.write({"iter": iteration, "checkpoint": folder.name, "tied_weight_max_diff": drift})
        log(f"iter {iteration:6d} | saved checkpoint {folder} (tied weights max diff {drift:.3g})")
        if dist.get_rank() != 0:
            return
        if t.keep_checkpoints:
            removed, failed = checkpoint.prune(self.run_dir, t.keep_checkpoints)
            for old in removed:
                log(f"iter {iteration:6d} | removed old checkpoint {old.name}")
            for warning in failed:
                log(f"iter {iteration:6d} | {warning}")
        warning = checkpoint.check_next_fits(self.run_dir, self.space)
        if warning:
            log(f"iter {iteration:6d} | {warning}")

    # ---- after the last step

    def summarize(self) -> None:
        first, iteration = self.first_iteration, self.iteration
        summary = f"done: {iteration - first} iterations in {time.time() - self.start_time:.1f} s"
        if first and iteration > first:
            summary += f" (iterations {first + 1}-{iteration})"
        if self.first_loss is not None:
            summary += f"; train loss {self.first_loss:.3f} -> {self.last_loss:.3f}"
        if self.val_loss is not None:
            summary += f"; val loss {self.val_loss:.3f}" + (f" (iteration {self.val_at})" if self.val_at != iteration
                                                            else "")
        log(summary)
        log(f"run directory: {self.run_dir.resolve()}"
            + (f" (latest checkpoint: iteration {self.saved_at})" if self.saved_at else ""))

    def close(self) -> None:
        if self.owns_process_group:
            # Tear down together: a rank exiting while gloo threads still run can abort ("terminate called").
            dist.barrier()
            dist.destroy_process_group()
            release_shared_memory()


def new_run_dir(cfg: Config) -> Path:
    """Collective: runs/NAME-YYYYMMDD-HHMMSS, made by rank 0 and new: two runs started in the same
    second get -2, -3... Where it cannot be made, every rank stops with one line."""
    name = Path(cfg.name).stem if cfg.name.endswith((".yaml", ".yml")) else cfg.name
    chosen = [None, "every name up to -999 is taken"]  # (path, why not)
    if dist.get_rank() == 0:
        base = Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        try:
            base.parent.mkdir(parents=True, exist_ok=True)
            for n in range(1, 1000):
                candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
                try:
                    candidate.mkdir()
                except FileExistsError:
                    continue
                chosen = [str(candidate), ""]
                break
        except OSError as e:
            chosen = [None, e.strerror or str(e)]
    dist.broadcast_object_list(chosen, src=0)
    if chosen[0] is None:
        raise CheckpointError(f"cannot make a run directory in '{Path('runs').resolve()}': {chosen[1]}; "
                              f"pass --save DIR with a writable directory (nothing was trained)")
    return Path(chosen[0])


def resume(engine, plan: Plan) -> tuple[int, int, int]:
    """Collective: load the checkpoint plan_run chose; returns (iteration, samples consumed, tokens trained on)."""
    meta, folder = plan.resume_meta, plan.load_dir / plan.resume_tag
    checkpoint.verify_folder(folder)  # every way on below reads it
    change = relayout.layout_change(meta, folder, plan.cfg.train.pipe_parallel_size, plan.layout.dp_size,
                                    plan.ds_config, plan.cfg.train.partition_method)
    if meta.get("weights_only"):
        relayout.load_layers(engine, folder)
        state = meta
        log(f"starting from the weights of {meta.get('source', 'a weights-only checkpoint')}; "
            f"the optimizer starts fresh")
    elif change is None:
        state = checkpoint.load(engine, plan.load_dir, plan.resume_tag)
        # ZeRO loads the optimizer's saved param groups after the schedule: their lr is the
        # checkpoint's schedule's, which --override-lr-schedule replaces from the first step.
        engine.lr_scheduler.load_state_dict(engine.lr_scheduler.state_dict())
    else:
        masters = relayout.saved_masters(engine, folder, meta)
        blocker = relayout.adam_state_blocker(meta, plan.ds_config)
        adam = None if blocker else relayout.saved_adam_state(engine, folder, meta)
        relayout.load_layers(engine, folder, masters, adam)
        scale = relayout.carry_loss_scale(engine, folder, meta)
        state = meta
        engine.lr_scheduler.load_state_dict({"steps": state.get("lr_steps", state["iteration"])})
        log(relayout.what_carries_over(change, masters is not None, blocker, scale))
    iteration, consumed = state["iteration"], state["consumed_samples"]
    tokens = state.get("tokens", consumed * plan.cfg.model.seq_len)
    log(f"resumed from {folder}: iteration {iteration}, {tokens:,} tokens seen")
    return iteration, consumed, tokens
