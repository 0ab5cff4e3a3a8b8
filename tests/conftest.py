"""pytest's hooks and shared fixtures; the helpers the tests import are in tests/helpers/.

tests/unit/ runs in this process; everything under tests/integration/ starts the real deepspeed
launcher or other processes, and is marked `launcher` by its directory."""
from __future__ import annotations

import os

import pytest

from gptx.parallel.engine import release_shared_memory
from tests.helpers.runs import free_port

# The workarounds in gptx/parallel/engine.py that in-process tests can switch off (--without-workaround).
ENGINE_WORKAROUNDS = ("_ensure_loss_is_scaled", "_undo_construction_step", "_fix_fp16_unscale_and_norm")


def pytest_addoption(parser):
    parser.addoption("--without-workaround", action="append", default=[], choices=ENGINE_WORKAROUNDS,
                     help="switch off one of gptx/parallel/engine.py's DeepSpeed workarounds in the in-process tests, to "
                          "see whether the installed DeepSpeed still needs it (repeatable)")


@pytest.fixture(autouse=True)
def _without_workarounds(request, monkeypatch):
    import gptx.parallel.engine
    for name in request.config.getoption("--without-workaround"):
        monkeypatch.setattr(gptx.parallel.engine, name, lambda engine: None)


@pytest.fixture(scope="module", autouse=True)
def _collect_then_freeze():
    """Each module starts by collecting this process's garbage once and moving every live object
    out of the collector's sight (gc.freeze). Every engine release (gptx's and DeepSpeed's own
    gc.collect calls) then scans only what the module made since, not the whole of pytest,
    torch, DeepSpeed and every test before it."""
    import gc
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    yield
    # A ZeRO-3 engine's zero.Init leaves its own linear in place of torch's for the process
    # (DeepSpeed: "this will persist unless manually reset"); the next module starts with torch's.
    import torch
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as ZeroInit
    torch.nn.functional.linear = getattr(ZeroInit, "linear_bk", torch.nn.functional.linear)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.launcher)


@pytest.fixture(scope="session", autouse=True)
def _one_group_for_a_world_of_one():
    """In this process every world has one rank, so every group DeepSpeed makes (the pipeline
    grid's, ZeRO's, a clone of the world) holds the same one rank as the world: it gets the
    world group itself. Each new gloo group would otherwise keep a thread that polls its
    sockets for the rest of the session, destroyed or not: a few hundred engines leave enough
    of them to take both of CI's cores, and every later test, launcher tests included, runs at
    a fraction of its speed."""
    import torch.distributed as dist
    make_group = dist.new_group

    def new_group(ranks=None, *args, **kwargs):
        if dist.is_initialized() and dist.get_world_size() == 1:
            return dist.group.WORLD
        return make_group(ranks, *args, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dist, "new_group", new_group)
        yield


@pytest.fixture(scope="session")
def dist_world1():
    """torch.distributed with one gloo rank in this process, as PipelineModule needs."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    yield
    release_shared_memory(os.environ["MASTER_PORT"])
