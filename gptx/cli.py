"""Command lines of the entry points in launch/ and tools/: parse, build the config, run.

User errors (GptxError) become one line on stderr and exit code 2, with no traceback.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from gptx.errors import ConfigError, GptxError

class Parser(argparse.ArgumentParser):
    """argparse whose command-line errors are user errors: one line from rank 0, not a usage
    message from every rank."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)  # a typo must not become another flag

    def error(self, message):
        raise ConfigError(f"{message} (see {self.prog} --help)")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows each option's default, unless its help already says it or there is none to show
    (argparse's ArgumentDefaultsHelpFormatter would add "(default: None)" to flags whose help
    says what unset means)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.required or "default" in text
                or action.default in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def _train_flag_help(name: str, doc: str) -> str:
    from gptx.config import DEFAULT_PRESET, PRESETS, TrainConfig
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
    p.add_argument("--save", default=None, help="run directory for checkpoints and metrics (default: runs/NAME-TIME, "
                                                "or the --load directory); refused if it holds another run")
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
    from gptx.train import RunPaths

    args = pretrain_parser().parse_args(argv)
    overrides = _overrides(args, TRAIN_KEYS)  # only what was given: flags default to None, --set to []
    load, tag = args.load, None
    if load is None:
        cfg = load_config(args.model, overrides)
    else:
        # Resume the run as it was: the checkpoint's config is the layer under --model (if given
        # again) and the overrides; data and DeepSpeed JSON follow in plan_run the same way.
        from gptx import checkpoint
        from gptx.train import log
        checkpoint.check_save_dir(args.save, checkpoint.run_dir_of(load))  # before reading another run
        run_dir, tag, meta = checkpoint.resolve_load(load, warn=log)
        load = str(run_dir)
        cfg = load_config(args.model, overrides, saved=meta.get("config"))
    return cfg, RunPaths(data=args.data, save=args.save, load=load, load_tag=tag,
                         deepspeed_config=args.deepspeed_config, ds_log_level=args.ds_log_level,
                         override_lr_schedule=args.override_lr_schedule)


def _overrides(args, flags) -> dict:
    """Config overrides from the command line: --set KEY=VALUE, then the named flags that were given."""
    from gptx.config import parse_override
    overrides = dict(parse_override(text) for text in args.set)
    overrides.update({k: getattr(args, k) for k in flags if getattr(args, k) is not None})
    return overrides


def run_pretrain(argv: list[str] | None = None, as_script: bool = False) -> int:
    """launch/pretrain.py; `as_script`: this process is the script itself (not a test calling in),
    so it may check the launcher's port and, without a launcher, make itself a world of one."""
    def main():
        from gptx.launching import check_master_port, single_process_env, under_launcher
        launched = under_launcher()
        if as_script:
            # First, before the heavy imports: a taken port stops rank 0 while the other ranks are still
            # importing, so the launcher ends them before they reach the other run's rendezvous.
            check_master_port()
            single_process_env()  # `python launch/pretrain.py`: one process, as `deepspeed --num_gpus 1`
        from gptx.train import pretrain
        cfg, paths = parse_pretrain_args(argv)
        if "WORLD_SIZE" in os.environ:  # else DeepSpeed discovers the world (MPI): plan_run checks it then
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


def prepare_data_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tools/prepare_data.py", formatter_class=DefaultsHelpFormatter,
               description="Tokenize text with GPT-2 BPE into train.bin/val.bin/meta.json, on all cores")
    p.add_argument("inputs", nargs="+", help=".txt files (one document each), JSON lines (.jsonl, .jsonl.gz, "
                                             ".jsonl.zst: a text field per line), .parquet files (a text column), "
                                             "or directories of them")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of tokens held out for val.bin")
    p.add_argument("--text-field", default="text", help="the JSON field or parquet column holding the text")
    p.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: this machine's cores)")
    p.add_argument("--bpe-file", default=None, help="a local copy of r50k_base.tiktoken / whisper's gpt2.tiktoken "
                                                    "(default: the cached copy, else fetched once)")
    p.add_argument("--strict-utf8", action="store_true",
                   help="stop at the first byte that is not UTF-8, naming the file and offset (default: such bytes "
                        "become U+FFFD, counted per file and reported at the end)")
    return p


def run_prepare_data(argv: list[str] | None = None) -> int:
    def main():
        from gptx.data import gpt2_encoding
        from gptx.prepare import InputReport, Progress, default_workers, iter_documents, write_token_files
        args = prepare_data_parser().parse_args(argv)
        workers = default_workers() if args.workers is None else args.workers
        start = time.perf_counter()
        progress = Progress()
        report = InputReport(strict_utf8=args.strict_utf8, warn=progress.message)
        meta = write_token_files(iter_documents(args.inputs, args.text_field, report), args.out,
                                 gpt2_encoding(args.bpe_file), args.val_fraction, workers=workers, progress=progress)
        for line in report.summary():
            print(line, file=sys.stderr)
        seconds = time.perf_counter() - start
        print(f"wrote {args.out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
              f"from {meta['documents']:,} documents ({meta['dtype']}); {meta['text_bytes'] / 1e6:,.1f} MB of text "
              f"in {seconds:.1f} s ({meta['text_bytes'] / 1e6 / seconds:,.1f} MB/s, {workers} worker(s))")
    return guarded(main)


def partition_report_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tools/partition_report.py",
               description="Stage layout, parameters, memory, bubble and balance of a pipeline, "
                           "before launch (no GPU, no processes, no allocation)")
    p.add_argument("--model", default=None, help="preset name (default: tiny) or a YAML file")
    p.add_argument("--pipe-parallel-size", type=int, default=None, help="stages (default: the config's)")
    p.add_argument("--data-parallel-size", type=int, default=1, help="data-parallel replicas (for batch and ZeRO-1)")
    p.add_argument("--partition-method", default=None, help="parameters, uniform, compute or type:REGEX")
    p.add_argument("--activation-checkpoint-interval", type=int, default=None)
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON for precision, batch and ZeRO (default: ds_configs/gpu_fp16.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model key")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    fit = p.add_argument_group("what fits (--fit): every layout on a cluster, those that fit first, fastest first")
    fit.add_argument("--fit", action="store_true", help="list the layouts that fit instead of reporting one")
    fit.add_argument("--gpus", type=int, default=8, help="GPUs in all (default 8)")
    fit.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    fit.add_argument("--host-memory", type=float, default=1024.0, help="GiB of host memory per node (default 1024)")
    fit.add_argument("--gpus-per-node", type=int, default=8, help="default 8")
    fit.add_argument("--micro-batch", type=int, default=None, help="sequences per GPU per micro-batch "
                                                                     "(default: the JSON's)")
    fit.add_argument("--accum", type=int, default=None,
                     help="micro-batches per step without a pipeline (a pipeline of p stages runs p times as "
                          "many on p times fewer replicas; default: the JSON's)")
    fit.add_argument("--top", type=int, default=12, help="rows to print (default 12)")
    fit.add_argument("--write-plan", default=None, metavar="FILE",
                     help="write the chosen layout's DeepSpeed JSON to FILE, which its printed command names "
                          "(default: print it; nothing is written)")
    return p


def _run_fit(args, cfg, ds: dict) -> str:
    import json

    from gptx.planner import Cluster, command_for, plan_layouts, render_plan
    for name in ("gpus", "gpus_per_node", "top"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    for name in ("gpu_memory", "host_memory"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be a positive number of GiB, got {getattr(args, name)}")
    micro = args.micro_batch if args.micro_batch is not None else ds.get("train_micro_batch_size_per_gpu", 1)
    accum = args.accum if args.accum is not None else ds.get("gradient_accumulation_steps", 1)
    for flag, value in (("--micro-batch", micro), ("--accum", accum)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{flag}: must be >= 1, got {value}")
    cluster = Cluster(gpus=args.gpus, gpu_memory_gib=args.gpu_memory, host_memory_gib=args.host_memory,
                      gpus_per_node=args.gpus_per_node)
    rows = plan_layouts(cfg, cluster, ds, micro, accum)
    # The model as the user named it, --set overrides included, so the printed command trains it.
    model_flags = " ".join([f"--model {shlex.quote(args.model or cfg.name)}",
                            *(f"--set {shlex.quote(item)}" for item in args.set)])
    best = next((r for r in rows if r["fits"]), None)
    written = None
    if args.write_plan and best is not None:
        from gptx.atomic import atomic_write
        try:
            atomic_write(args.write_plan, (json.dumps(best["ds_config"], indent=2) + "\n").encode())
        except OSError as e:
            raise ConfigError(f"--write-plan '{args.write_plan}': cannot write it ({e.strerror})") from None
        written = args.write_plan
    if not args.json:
        text = render_plan(model_flags, rows, cluster, args.top, written)
    else:
        text = json.dumps([{**{k: v for k, v in r.items() if k != "layout"}, "layout": r["layout"].__dict__,
                            "command": command_for(model_flags, r, cluster, written if r is best and written
                                                   else "plan.json")} for r in rows], indent=2)
    if args.write_plan and best is None:  # the table still shows how far over the budget each layout is
        print(text)
        raise ConfigError(f"--write-plan '{args.write_plan}': no layout fits, so no plan was written")
    return text


def run_partition_report(argv: list[str] | None = None) -> int:
    # The report touches no device; naming one keeps DeepSpeed's accelerator probe quiet on stdout.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    def main():
        import json

        from gptx.config import load_config
        from gptx.ds_config import check_ds_config, default_ds_config_path, read_ds_config
        from gptx.partition_report import partition_report, render_text
        args = partition_report_parser().parse_args(argv)
        cfg = load_config(args.model, _overrides(
            args, ("pipe_parallel_size", "partition_method", "activation_checkpoint_interval")))
        if args.data_parallel_size < 1:
            raise ConfigError(f"--data-parallel-size: must be >= 1, got {args.data_parallel_size}")
        ds_path = args.deepspeed_config or str(default_ds_config_path("cuda"))
        ds = read_ds_config(ds_path)
        if args.fit:
            print(_run_fit(args, cfg, ds))
            return
        if args.write_plan:
            raise ConfigError("--write-plan: only with --fit (it writes the DeepSpeed JSON of the layout --fit chooses)")
        layout = check_ds_config(ds, args.data_parallel_size, cfg.train.pipe_parallel_size, "cuda", ds_path)
        report = partition_report(cfg, cfg.train.pipe_parallel_size, cfg.train.partition_method, ds, layout)
        print(json.dumps(report, indent=2) if args.json else render_text(report))
    return guarded(main)


def _device(name: str | None) -> str:
    import torch
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def sample_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tools/sample.py", description="Generate text from a training checkpoint")
    p.add_argument("--load", required=True, help="run directory (latest checkpoint) or a checkpoint folder")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="text, encoded with GPT-2 BPE")
    prompt.add_argument("--prompt-ids", default=None, help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=100,
                   help="new tokens to generate (fewer when end-of-text comes first; past the model's context, "
                        "a sliding window)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-cache", action="store_true", help="recompute every position each step (slower)")
    p.add_argument("--master-weights", action="store_true",
                   help="take a fp16/bf16 run's weights from the optimizer's fp32 master copies")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print one JSON object with ids and text")
    return p


def run_sample(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    def main():
        import json

        from gptx.checkpoint import load_plain_model
        from gptx.data import GPT2_EOT, GPT2_VOCAB_SIZE, gpt2_encoding
        from gptx.generate import generate
        args = sample_parser().parse_args(argv)
        for flag, value, ok, expected in (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 0, ">= 0"),
                                          ("--temperature", args.temperature, args.temperature >= 0, ">= 0"),
                                          ("--top-k", args.top_k, args.top_k is None or args.top_k >= 1, ">= 1"),
                                          ("--top-p", args.top_p, args.top_p is None or 0 < args.top_p <= 1,
                                           "in (0, 1]")):
            if not ok:
                raise ConfigError(f"{flag}: must be {expected}, got {value}")
        model, cfg = load_plain_model(args.load, master_weights=args.master_weights)
        model.to(_device(args.device))
        gpt2 = cfg.model.vocab_size == GPT2_VOCAB_SIZE
        enc = gpt2_encoding() if gpt2 else None
        if args.prompt_ids is not None:
            try:
                prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
            except ValueError:
                raise ConfigError(f"--prompt-ids '{args.prompt_ids}': expected comma-separated integers") from None
        elif enc is not None:
            prompt = enc.encode_ordinary(args.prompt or "") or [GPT2_EOT]
        else:
            raise ConfigError(f"--prompt needs GPT-2 BPE but this model has {cfg.model.vocab_size} tokens; "
                              f"use --prompt-ids")
        bad = [t for t in prompt if not 0 <= t < cfg.model.vocab_size]
        if bad:
            raise ConfigError(f"--prompt-ids: {bad[0]} is outside the vocabulary (0..{cfg.model.vocab_size - 1})")
        ids = generate(model, prompt, args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                       stop_token=GPT2_EOT if gpt2 else None, use_cache=not args.no_cache)
        text = enc.decode(ids) if enc is not None else None
        if cfg.model.position_embedding == "learned" and len(ids) > cfg.model.seq_len:
            print(f"note: the output is longer than the model's context ({cfg.model.seq_len} tokens, learned "
                  f"positions): past it each token was predicted from the last {cfg.model.seq_len}", file=sys.stderr)
        print(json.dumps({"ids": ids, "text": text}) if args.json else (text if text is not None else ids))
    return guarded(main)


def evaluate_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tools/evaluate.py", description="Loss, perplexity and bits per byte")
    p.add_argument("--load", required=True, help="run directory (latest checkpoint) or a checkpoint folder")
    p.add_argument("--data", required=True,
                   help="a .txt file (one document), a .jsonl file (a 'text' field per line), a .bin split, or a "
                        "data directory (its val.bin)")
    p.add_argument("--seq-len", default=None,
                   help="context per window (default: the model's); several, comma-separated (512,1024,2048), "
                        "print one table")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--master-weights", action="store_true",
                   help="take a fp16/bf16 run's weights from the optimizer's fp32 master copies")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    return p


def run_evaluate(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    def main():
        import json

        from gptx.checkpoint import load_plain_model
        from gptx.evaluate import check_checkpoint_path, context_table, evaluate_contexts, load_eval_tokens
        args = evaluate_parser().parse_args(argv)
        check_checkpoint_path(args.load)
        try:
            lengths = [int(x) for x in args.seq_len.split(",")] if args.seq_len else []
        except ValueError:
            raise ConfigError(f"--seq-len '{args.seq_len}': expected an integer or comma-separated integers, "
                              f"e.g. 512,1024,2048") from None
        model, cfg = load_plain_model(args.load, master_weights=args.master_weights)
        model.to(_device(args.device))
        tokens, n_bytes = load_eval_tokens(args.data, cfg.model.vocab_size)
        rows = evaluate_contexts(model, tokens, n_bytes, lengths or [cfg.model.seq_len], args.batch_size,
                                 progress=lambda n: _progress_to_stderr(f"evaluate (context {n})"))
        if len(rows) == 1:
            (result,) = rows
            if args.json:
                print(json.dumps(result))
            else:
                bpb = f", {result['bits_per_byte']:.4f} bits/byte" if result["bits_per_byte"] is not None else ""
                print(f"{result['tokens']:,} tokens at context {result['seq_len']}: loss {result['loss']:.4f}, "
                      f"perplexity {result['perplexity']:.2f}{bpb}")
        else:
            print(json.dumps(rows) if args.json else context_table(rows, cfg.model))
    return guarded(main)


def _progress_to_stderr(what: str):
    """A progress callback printing a line at each tenth done (stdout stays the result's)."""
    shown = [0]

    def report(done: int, total: int) -> None:
        tenth = done * 10 // total
        if tenth > shown[0] and total > 1:
            shown[0] = tenth
            print(f"{what}: {done:,}/{total:,} windows ({done * 100 // total}%)", file=sys.stderr, flush=True)
    return report


def run_lm_eval(argv: list[str] | None = None) -> int:
    """lm-evaluation-harness's own command line, with the `gptx` model registered."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    def main():
        try:
            from lm_eval.__main__ import cli_evaluate
        except ImportError:
            raise ConfigError("tools/lm_eval_harness.py needs lm-evaluation-harness: pip install -e \".[eval]\"") from None
        import importlib
        importlib.import_module("gptx.lm_eval_adapter")  # registers --model gptx
        sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
        cli_evaluate()
    return guarded(main)


def plot_runs_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tools/plot_runs.py",
               description="Plot runs from their metrics.jsonl: loss, val loss, LR, grad norm, loss scale and "
                           "skipped steps, tokens/s and MFU against tokens seen, runs overlaid")
    p.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--smoothing", type=float, default=0.9,
                   help="weight of the exponential moving average of the train loss (0: none)")
    return p


def run_plot_runs(argv: list[str] | None = None) -> int:
    def main():
        from gptx.plots import plot_runs
        args = plot_runs_parser().parse_args(argv)
        if not 0 <= args.smoothing < 1:
            raise ConfigError(f"--smoothing: must be in [0, 1), got {args.smoothing}")
        print(f"wrote {plot_runs(args.runs, args.out, args.smoothing)}")
    return guarded(main)


def convert_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tools/convert.py",
               description="gptx checkpoint <-> Hugging Face GPT-2 directory (config.json, "
                           "model.safetensors and, for GPT-2's vocabulary, its tokenizer files)")
    p.add_argument("--load", help="gptx run directory or checkpoint folder to export")
    p.add_argument("--to-hf", help="output directory for the Hugging Face model")
    p.add_argument("--from-hf", help="local Hugging Face GPT-2 directory to import")
    p.add_argument("--save", help="output gptx run directory (a weights-only checkpoint)")
    p.add_argument("--master-weights", action="store_true",
                   help="take a fp16/bf16 run's weights from the optimizer's fp32 master copies")
    return p


def run_convert(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    def main():
        from gptx.checkpoint import check_save_dir, load_plain_model, save_weights_only
        from gptx.data import GPT2_VOCAB_SIZE
        from gptx.hf import from_hf, to_hf
        args = convert_parser().parse_args(argv)
        if args.load and args.to_hf and not (args.from_hf or args.save):
            model, cfg = load_plain_model(args.load, master_weights=args.master_weights)
            out = to_hf(model, cfg, args.to_hf)
            tokenizer = ("with GPT-2's tokenizer files" if cfg.model.vocab_size == GPT2_VOCAB_SIZE else
                         f"without tokenizer files (its {cfg.model.vocab_size}-token vocabulary is not GPT-2's: "
                         f"add your tokenizer's)")
            print(f"wrote {out} {tokenizer}")
        elif args.from_hf and args.save and not (args.load or args.to_hf):
            check_save_dir(args.save, None)
            layers, cfg = from_hf(args.from_hf)
            print(f"wrote {save_weights_only(layers, cfg, args.save, source=str(args.from_hf))}")
        else:
            raise ConfigError("use either --load DIR --to-hf OUT, or --from-hf SRC --save DIR")
    return guarded(main)


def benchmark_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="tools/benchmark.py",
        description="Tokens/s, MFU, memory and per-stage time of the real engine on random tokens. One rank: "
                    "python tools/benchmark.py; a pipeline: deepspeed --num_gpus N tools/benchmark.py")
    p.add_argument("--model", default=None, help="preset name (default: tiny) or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON (default: ds_configs/cpu_fp32.json on CPU, gpu_fp16.json on GPU)")
    p.add_argument("--pipe-parallel-size", type=int, default=None, help="stages (default: as many as ranks)")
    p.add_argument("--partition-method", default=None)
    p.add_argument("--activation-checkpoint-interval", type=int, default=None)
    p.add_argument("--compile-blocks", action="store_const", const=True, default=None,
                   help="torch.compile each decoder block (in both loops)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--breakdown-iters", type=int, default=2, help="iterations with per-instruction timers")
    p.add_argument("--plain", action="store_true",
                   help="also time the same training in a plain PyTorch loop (one rank only)")
    p.add_argument("--reference", action="append", default=[], metavar="hf|PATH",
                   help="also time another project's model of this shape in the plain loop, from gptx's initial "
                        "weights: hf (transformers' GPT2LMHeadModel) or a nanoGPT-style model.py; repeatable "
                        "(one rank only)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def reference_run_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tools/reference_run.py",
               description="Train transformers' GPT2LMHeadModel or a nanoGPT-style model.py of a gptx model's shape "
                           "the way nanoGPT's train.py does (one process, fp32, no compile) and print its tokens/s: "
                           "the reference side of a separate-process comparison with launch/pretrain.py")
    p.add_argument("reference", metavar="hf|PATH",
                   help="hf (transformers' GPT2LMHeadModel) or the path of a nanoGPT-style model.py "
                        "(GPTConfig; GPT(config)(idx, targets))")
    p.add_argument("--model", default=None, help="gptx preset name (default: tiny) or a YAML file, for the shape")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model key")
    p.add_argument("--data", default=None, help="prepared data directory (default: the embedded corpus)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--iters", type=int, default=30, help="iterations (default 30)")
    p.add_argument("--skip", type=int, default=5, help="first iterations left out of tokens/s (default 5)")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--fused-adamw", action="store_true",
                   help="PyTorch's fused AdamW (nanoGPT uses it on GPUs only), as ds_configs/cpu_fp32.json does")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="keep freed host memory as gptx does for large tensors (see docs/performance.md)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def run_reference_run(argv: list[str] | None = None) -> int:
    out = sys.stdout

    def main():
        import json
        from pathlib import Path

        import torch

        from gptx.config import load_config
        from gptx.data import default_data_dir
        from gptx.references import reference_run
        from gptx.train import keep_freed_memory
        args = reference_run_parser().parse_args(argv)
        for name in ("batch_size", "iters"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
        if not 0 <= args.skip < args.iters:
            raise ConfigError(f"--skip: must be at least 0 and less than --iters ({args.iters}), got {args.skip}")
        cfg = load_config(args.model, _overrides(args, ()))
        data = Path(args.data) if args.data else default_data_dir()
        kept = keep_freed_memory() if args.keep_freed_memory else False
        log = (lambda msg: None) if args.json else print
        r = reference_run(args.reference, cfg, data, args.batch_size, args.iters, args.lr, args.weight_decay,
                          args.fused_adamw, log=log)
        timed = r["seconds"][args.skip:]
        r.update(reference=args.reference, tokens_per_sec=r["tokens_per_iteration"] * len(timed) / sum(timed),
                 skip=args.skip, kept_freed_memory=kept, torch=torch.__version__)
        adamw = "fused AdamW" if args.fused_adamw else "for-loop AdamW"
        print(json.dumps(r) if args.json else
              f"{r['tokens_per_sec']:,.0f} tokens/s over iterations {args.skip + 1}-{args.iters} "
              f"({r['device']}, {r['threads']} threads, {adamw}, freed memory {'kept' if kept else 'returned'})",
              file=out)
    with _stdout_for_json(argv):  # the model file's own prints go to stderr
        return guarded(main)


def strategies_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tools/strategies.py",
               description="One model under each memory strategy (pipeline ZeRO-1, + optimizer offload, no pipeline "
                           "ZeRO-2, ZeRO-3, ZeRO-3 + offload; each with and without activation checkpointing), each "
                           "in its own launch: time per iteration, peak memory per rank and the partition report's "
                           "prediction side by side")
    p.add_argument("--model", default=None, help="preset name (default: tiny) or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model key")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="base JSON: precision, optimizer, clipping (default: cpu_fp32.json on CPU, gpu_fp16.json on GPU)")
    p.add_argument("--gpus", type=int, default=2, help="ranks per launch (default 2); the pipelines use that many stages")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per rank per micro-batch (default 2)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step without a pipeline (default 1)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations (default 3)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed iterations first, whose memory is counted (default 2: ZeRO-3 keeps layers "
                        "gathered from the second step on)")
    p.add_argument("--only", action="append", default=None,
                   help="run only the strategy of this exact name, as the table writes it (repeatable)")
    p.add_argument("--work", default="runs/strategies", help="where each launch writes (default runs/strategies)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    # Set by the driver for each launch.
    p.add_argument("--pipe-parallel-size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--activation-checkpoint-interval", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def run_strategies(argv: list[str] | None = None) -> int:
    def main():
        import json
        from pathlib import Path

        from gptx.config import load_config
        from gptx.ds_config import default_ds_config_path, read_ds_config
        args = strategies_parser().parse_args(argv)
        if args.worker_out:
            return _strategy_worker(args)
        for name in ("gpus", "micro_batch", "accum", "iters", "warmup"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
        from gptx.strategies import render_table, run_table, strategies
        names = [s.name for s in strategies(args.gpus)]
        for name in args.only or ():
            if name not in names:
                raise ConfigError(f"--only '{name}': no such strategy; the names are: " + "; ".join(names))
        cfg = load_config(args.model, _overrides(args, ()))
        accelerator = "cuda" if _cuda_present() else "cpu"
        ds = read_ds_config(args.deepspeed_config or default_ds_config_path(accelerator))
        model_args = (["--model", args.model] if args.model else []) + [f for kv in args.set for f in ("--set", kv)]
        rows = run_table(cfg, model_args, ds, args.gpus, args.micro_batch, args.accum, args.iters, args.warmup,
                         Path(args.work), args.only, log=lambda m: print(m, file=sys.stderr, flush=True))
        print(json.dumps(rows, indent=2) if args.json else render_table(rows, args.gpus))
        return 1 if any("error" in r for r in rows) else 0
    return guarded(main)


def _cuda_present() -> bool:
    import torch
    return torch.cuda.is_available()


def _strategy_worker(args) -> int:
    from pathlib import Path

    from gptx.ds_config import read_ds_config
    from gptx.strategies import measure_strategy
    from gptx.train import _accelerator_name, configure_host
    cfg, _ = _tool_config(args, ("pipe_parallel_size", "activation_checkpoint_interval"), allow_no_pipeline=True)
    ds = read_ds_config(args.deepspeed_config)
    configure_host(_accelerator_name())  # no model: the allocator returns freed memory, so RSS is what tensors need
    _in_process_group(lambda: measure_strategy(cfg, ds, args.iters, args.warmup, Path(args.worker_out)))
    return 0


def _single_process_env() -> None:
    """Outside the launcher: be rank 0 of a world of one."""
    from gptx.launching import single_process_env
    single_process_env()


def _tool_config(args, flags: tuple[str, ...], allow_no_pipeline: bool = False):
    """(Config, world size) for a tool that trains engines itself: one stage per rank by default."""
    from gptx.config import load_config
    _single_process_env()
    world = int(os.environ["WORLD_SIZE"])
    overrides = _overrides(args, flags)
    overrides.setdefault("pipe_parallel_size", world)
    cfg = load_config(args.model, overrides)
    if cfg.train.pipe_parallel_size == 0 and not allow_no_pipeline:
        raise ConfigError("--pipe-parallel-size 0: this tool measures the pipeline engine; give it 1 or more "
                          "stages (the no-pipeline mode trains through launch/pretrain.py)")
    if cfg.train.pipe_parallel_size and world % cfg.train.pipe_parallel_size:
        raise ConfigError(f"--pipe-parallel-size {cfg.train.pipe_parallel_size} does not divide the {world} "
                          f"processes launched")
    return cfg, world


def _in_process_group(work) -> None:
    """Run work() inside torch.distributed, which is started here (and torn down after) when
    the tool runs as a plain process rather than under the launcher."""
    import deepspeed
    import torch.distributed as dist
    from gptx.engine import deepspeed_prints, release_shared_memory
    from gptx.launching import port_in_use
    owns_process_group = not dist.is_initialized()
    with deepspeed_prints(False):
        try:
            deepspeed.init_distributed(verbose=False)
        except Exception as e:
            failure = port_in_use(e)
            if failure is None:
                raise
            raise failure from None
    work()
    if owns_process_group:
        dist.barrier()
        dist.destroy_process_group()
        release_shared_memory()


def _stdout_for_json(argv):
    """DeepSpeed prints (and logs) on stdout; with --json, stdout carries only the one JSON object."""
    import contextlib
    quiet = "--json" in (sys.argv[1:] if argv is None else argv)
    return contextlib.redirect_stdout(sys.stderr) if quiet else contextlib.nullcontext()


def run_benchmark(argv: list[str] | None = None) -> int:
    out = sys.stdout

    def main():
        import json

        from gptx.benchmark import BenchSettings, benchmark, render_text
        from gptx.ds_config import check_ds_config, default_ds_config_path, read_ds_config
        from gptx.train import _accelerator_name, configure_host
        args = benchmark_parser().parse_args(argv)
        cfg, world = _tool_config(args, ("pipe_parallel_size", "partition_method", "activation_checkpoint_interval",
                                         "compile_blocks"))
        pp = cfg.train.pipe_parallel_size
        for name in ("iters", "warmup", "breakdown_iters"):
            if getattr(args, name) < (1 if name == "iters" else 0):
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= {1 if name == 'iters' else 0}")
        if (args.plain or args.reference) and world != 1:
            raise ConfigError(f"--{'plain' if args.plain else 'reference'} compares with a single-process loop: "
                              f"run it as one rank (python tools/benchmark.py), not {world}")
        accelerator = _accelerator_name()
        ds_path = args.deepspeed_config or str(default_ds_config_path(accelerator))
        ds = read_ds_config(ds_path)
        layout = check_ds_config(ds, world // pp, pp, accelerator, ds_path)
        configure_host(accelerator, cfg.model, layout.micro_batch)
        settings = BenchSettings(iters=args.iters, warmup=args.warmup, breakdown_iters=args.breakdown_iters,
                                 plain=args.plain, references=tuple(args.reference))
        if args.reference:  # a bad reference is one line before the engine is built, not after
            import torch
            from gptx.model import GPT
            from gptx.references import load_reference
            for reference in args.reference:
                with torch.device("meta"):
                    load_reference(reference, cfg, GPT(cfg.model, seed=0))

        def work():
            report = benchmark(cfg, ds, layout, settings, accelerator)
            if report is not None:
                print(json.dumps(report) if args.json else render_text(report), file=out, flush=True)
        _in_process_group(work)
    with _stdout_for_json(argv):
        return guarded(main)


def gpu_check_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="tools/gpu_check.py",
        description="fp32 (TF32 on GPUs), the shipped fp16 config and the shipped bf16 config, trained side by "
                    "side from the same weights on the same batches: loss differences, grad norm, loss scale, "
                    "skips, tokens/s, MFU, peak memory per stage, flash attention. One GPU: python "
                    "tools/gpu_check.py; a pipeline: deepspeed --num_gpus N tools/gpu_check.py")
    p.add_argument("--model", default="gpt2", help="preset name or a YAML file (default: gpt2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--data", default=None, help="prepared data directory (default: the embedded corpus)")
    p.add_argument("--iters", type=int, default=300, help="iterations per precision")
    p.add_argument("--micro-batch", type=int, default=None, help="default: ds_configs/gpu_fp16.json's")
    p.add_argument("--accum", type=int, default=None, help="gradient accumulation steps (default: the JSON's)")
    p.add_argument("--pipe-parallel-size", type=int, default=None, help="stages (default: as many as ranks)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def run_gpu_check(argv: list[str] | None = None) -> int:
    out = sys.stdout

    def main():
        import json

        import torch
        import torch.distributed as dist
        from deepspeed.utils.logging import set_log_level_from_string

        from gptx.data import check_data, default_data_dir, open_tokens
        from gptx.ds_config import DS_CONFIG_DIR, check_ds_config, read_ds_config
        from gptx.precision_check import gpu_check, render_gpu_check
        from gptx.train import _accelerator_name, configure_host, log
        args = gpu_check_parser().parse_args(argv)
        set_log_level_from_string("warning")
        cfg, world = _tool_config(args, ("pipe_parallel_size",))
        pp = cfg.train.pipe_parallel_size
        if args.iters < 2:
            raise ConfigError(f"--iters: must be >= 2, got {args.iters}")
        accelerator = _accelerator_name()
        fp16 = read_ds_config(DS_CONFIG_DIR / "gpu_fp16.json")
        bf16 = read_ds_config(DS_CONFIG_DIR / "gpu_bf16.json")
        fp32 = {k: v for k, v in fp16.items() if k != "fp16"}
        configs = {("tf32" if accelerator == "cuda" else "fp32"): fp32, "fp16": fp16, "bf16": bf16}
        for name, ds in configs.items():
            for key, value in (("train_micro_batch_size_per_gpu", args.micro_batch),
                               ("gradient_accumulation_steps", args.accum)):
                if value is not None:
                    ds[key] = value
            check_ds_config(ds, world // pp, pp, accelerator, f"ds_configs ({name}, with the batch flags)")
        data_dir = args.data or default_data_dir()
        check_data(data_dir, cfg.model.vocab_size, cfg.model.seq_len)
        if accelerator == "cuda":  # the fp32 reference as GPUs run it by default in practice
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        configure_host(accelerator)

        def work():
            report = gpu_check(cfg, configs, open_tokens(data_dir, "train"), args.iters, accelerator, log=log)
            if dist.get_rank() == 0:
                print(json.dumps(report) if args.json else render_gpu_check(report), file=out, flush=True)
        _in_process_group(work)
    with _stdout_for_json(argv):
        return guarded(main)


def gpu_bench_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tools/gpu_bench.py",
               description="gptx's engine on gpt2 in bf16 and fp16 with each speed lever on and off, the same model "
                           "in build-nanogpt's plain loop, and gpt2-medium and gpt2-xl at gptx's fastest setting: "
                           "one process, rows alternating; writes docs/benchmarks/DATE-DEVICE.md and .json. "
                           "On a CPU it runs the same plan at tiny shapes.")
    p.add_argument("--precisions", default=None, help="comma-separated bf16, fp16, fp32 (default: bf16,fp16 on a GPU, "
                                                      "fp32 on a CPU)")
    p.add_argument("--levers", default="compile,pad,fused,one_stage",
                   help="levers to measure, comma-separated (default: all of compile,pad,fused,one_stage); "
                        "the ones left out stay off in every row")
    p.add_argument("--models", default="", help="only these groups, comma-separated (default: gpt2, gpt2-medium, "
                                                "gpt2-xl on a GPU; gpt2, gpt2-xl at tiny shapes on a CPU)")
    p.add_argument("--reference", default=None, metavar="PATH",
                   help="a nanoGPT-style model.py for the reference loop (default: gptx's own layers as one module)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per row (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations per row first, compilation included "
                                                         "(default 3)")
    p.add_argument("--deadline-s", type=float, default=420.0,
                   help="no model group, row or timing round starts after this many seconds; every built row "
                        "still gets two timed iterations (default 420)")
    p.add_argument("--out-dir", default="docs/benchmarks", help="where the .md and .json go (default docs/benchmarks)")
    return p


def run_gpu_bench(argv: list[str] | None = None) -> int:
    def main():
        import shlex
        from pathlib import Path

        from gptx.ds_config import check_ds_config
        from gptx.gpu_bench import LEVERS, ds_config_for, gpu_bench, plan_from_args
        from gptx.references import build_reference
        from gptx.train import _accelerator_name, configure_host
        args = gpu_bench_parser().parse_args(argv)
        accelerator = _accelerator_name()
        precisions = tuple(x for x in (args.precisions or ("bf16,fp16" if accelerator == "cuda" else "fp32"))
                           .split(",") if x)
        for name in precisions:
            if name not in ("bf16", "fp16", "fp32"):
                raise ConfigError(f"--precisions: expected bf16, fp16 or fp32, got '{name}'")
            check_ds_config(ds_config_for(name, 1, 1), 1, 1, accelerator, f"--precisions {name}")
        levers = tuple(x for x in args.levers.split(",") if x)
        for name in levers:
            if name not in LEVERS:
                raise ConfigError(f"--levers: unknown lever '{name}'; expected some of {', '.join(LEVERS)}")
        models = tuple(x for x in args.models.split(",") if x)
        for name, value in (("iters", args.iters), ("warmup", args.warmup)):
            if value < 1:
                raise ConfigError(f"--{name}: must be >= 1, got {value}")
        plan = plan_from_args(accelerator, precisions, levers, models, reference=args.reference, iters=args.iters,
                              warmup=args.warmup, deadline_s=args.deadline_s)
        known = {g.model for g in plan_from_args(accelerator, precisions, levers, ()).groups}
        if not plan.groups or not set(models) <= known:
            raise ConfigError(f"--models: expected some of {', '.join(sorted(known))}, got '{args.models}'")
        if args.reference:  # a bad reference is one line before anything is built
            import torch

            from gptx.config import load_config
            with torch.device("meta"):
                build_reference(args.reference, load_config("gpt2", {"n_layer": 1}), "--reference")
        configure_host(accelerator)
        _single_process_env()
        command = "python tools/gpu_bench.py" + "".join(" " + shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                                        else argv))
        _in_process_group(lambda: print(f"wrote {gpu_bench(plan, accelerator, Path(args.out_dir), command)}"))
    return guarded(main)


def guarded(main) -> int:
    """Run main(); a user error is one line on stderr (from rank 0) and exit code 2."""
    try:
        result = main()
    except GptxError as e:
        if os.environ.get("RANK", "0") == "0" or getattr(e, "every_rank", False):
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:
            # DeepSpeed's launcher ends every rank once one exits non-zero: were this rank to
            # exit first, rank 0 could be ended before it prints the line (seen once in CI).
            import time
            time.sleep(3)
        return 2
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
