"""What every command shares: the argument parser whose errors are one line, the guard that turns a
user error into that line and exit code 2, config overrides from flags, and the process group of a
tool that trains engines itself."""
from __future__ import annotations

import argparse
import errno
import os
import sys

from gptx.errors import ConfigError, GptxError
from gptx.parallel.launching import adopt_mpi_ranks, check_world_known, single_process_env
from gptx.training.metrics import drop_console_output


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


def no_engine_accelerator() -> None:
    """For the commands that build no engine (they read checkpoints into the plain GPT on the device
    they are given): DeepSpeed probes for an accelerator when it is imported and prints on stdout
    unless told which one to use; the CPU one costs nothing. A DS_ACCELERATOR already set is kept."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def config_overrides(args, flags) -> dict:
    """Config overrides from the command line: --set KEY=VALUE, then the named flags that were given."""
    from gptx.config import parse_override
    overrides = dict(parse_override(text) for text in args.set)
    overrides.update({k: getattr(args, k) for k in flags if getattr(args, k) is not None})
    return overrides


def device_for(name: str | None) -> str:
    """--device as given (checked), else the GPU when there is one."""
    import torch
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device '{name}': not a device torch knows; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # mps, meta, xpu...: torch names them, gptx runs on neither
        raise ConfigError(f"--device '{name}': gptx's tools run on cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device '{name}': this machine has no CUDA GPU torch can use; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device '{name}': there are {torch.cuda.device_count()} GPU(s), numbered from 0")
    return name


def tool_config(args, flags: tuple[str, ...], allow_no_pipeline: bool = False):
    """(Config, world size) for a tool that trains engines itself: one stage per rank by default."""
    from gptx.config import load_config
    adopt_mpi_ranks()
    check_world_known()
    single_process_env()
    if "WORLD_SIZE" not in os.environ:  # a cluster's variables, which DeepSpeed reads only when it starts
        raise ConfigError("this tool plans its stages from WORLD_SIZE, which nothing set: start it with deepspeed "
                          "(--num_gpus N, or --hostfile)")
    world = int(os.environ["WORLD_SIZE"])
    # One stage per rank unless the preset, the YAML file or the command line says otherwise.
    cfg = load_config(args.model, config_overrides(args, flags), defaults={"pipe_parallel_size": world})
    if cfg.train.pipe_parallel_size == 0 and not allow_no_pipeline:
        raise ConfigError("--pipe-parallel-size 0: this tool measures the pipeline engine; give it 1 or more "
                          "stages (the no-pipeline mode trains through launch/pretrain.py)")
    if cfg.train.pipe_parallel_size and world % cfg.train.pipe_parallel_size:
        raise ConfigError(f"--pipe-parallel-size {cfg.train.pipe_parallel_size} does not divide the {world} "
                          f"processes launched")
    return cfg, world


def in_process_group(work) -> None:
    """Run work() inside torch.distributed, which is started here (and torn down after) when
    the tool runs as a plain process rather than under the launcher."""
    import deepspeed
    import torch.distributed as dist

    from gptx.parallel.engine import deepspeed_prints, release_shared_memory
    from gptx.parallel.launching import port_in_use
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


def stdout_for_json(argv):
    """DeepSpeed prints (and logs) on stdout; with --json, this process's stdout carries only the one
    JSON object. Under the deepspeed launcher its runner and launch.py log on the same stdout, which
    no rank can quiet: the object is the line that starts with '{'."""
    import contextlib
    quiet = "--json" in (sys.argv[1:] if argv is None else argv)
    return contextlib.redirect_stdout(sys.stderr) if quiet else contextlib.nullcontext()


# What the machine, not gptx, refuses when a tool writes or reads a path it was given: a full or
# read-only disk, a file where a directory belongs (and the other way round), no permission.
# A missing file (ENOENT) is not among them: the commands check their inputs, so one missing later is gptx's.
MACHINE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                  errno.EDQUOT}


def guarded(main) -> int:
    """Run main(); a user error, or a path the machine refuses, is one line on stderr (from rank 0)
    and exit code 2; Ctrl-C is the line "interrupted" and exit code 130; the output's reader going
    away (| head) ends it quietly."""
    try:
        try:
            result = main()
        except BrokenPipeError:
            if not stdout_reader_gone():  # another pipe (a worker process's): not the output's
                raise
            drop_console_output()
            return 0
        except OSError as e:
            if e.errno not in MACHINE_ERRNOS or not e.filename:
                raise
            hint = {errno.ENOSPC: "free space or write elsewhere", errno.EDQUOT: "free space or write elsewhere",
                    errno.EROFS: "choose a writable path", errno.EACCES: "choose a path you may use",
                    errno.EPERM: "choose a path you may use"}.get(e.errno, "check the path")
            raise ConfigError(f"'{e.filename}': {e.strerror}; {hint}") from None
        try:
            sys.stdout.flush()  # here, not at exit: a failed write of the output is said like any other
        except BrokenPipeError:
            drop_console_output()
            return 0
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            drop_console_output(stderr_too=False)  # so that the exit's own flush does not fail again
            raise ConfigError(f"writing the output failed ({e.strerror}); free space or write it elsewhere") from None
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which stops itself at a step's end)
        if os.environ.get("RANK", "0") == "0":
            print("interrupted", file=sys.stderr, flush=True)
        return 130  # the shell's code for a command ended by SIGINT
    except GptxError as e:
        rank = os.environ.get("RANK", "0")
        local_rank = os.environ.get("LOCAL_RANK", rank)
        if rank == "0" or getattr(e, "every_rank", False):
            print(f"error: {e}", file=sys.stderr, flush=True)
        elif local_rank == "0":  # another node's first rank: its paths, disks and ports are its own
            print(f"error: rank {rank} (the first on its node): {e}", file=sys.stderr, flush=True)
        else:
            # DeepSpeed's launcher ends every rank once one exits non-zero: were this rank to
            # exit first, rank 0 could be ended before it prints the line.
            import time
            time.sleep(3)
        return 2
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its end)."""
    import select
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # a stdout that is no file
        return False


def require_at_least(args, minimum: int, *names: str) -> None:
    """One line naming the first flag (by its dest) whose value is below `minimum`."""
    for name in names:
        value = getattr(args, name)
        if value < minimum:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= {minimum}, got {value}")
