"""Compiled blocks (train.compile_blocks) everywhere gptx runs: the pipeline, activation
checkpointing, fp16 and bf16, every variant, the no-pipeline mode (ZeRO-3 included), the
training loop's evaluation, sequence-length warmup and resume, and models deeper than dynamo's
recompile limit.

Most tests compile with a counting backend: it runs dynamo's graph as it is (no code
generation), so compiled losses equal eager ones exactly, and it counts the graphs compiled and
the calls into them (each call is one block run compiled). The numeric test compiles with
inductor, which fuses and reorders float operations (fp32 and bf16 here; fp16 compiles the
same way and costs another cold compile, so the tests run it with the counting backend).

Tolerances, inductor against eager on the same batches (4 steps, 1 stage): fp32 within 1e-5,
the 1-vs-2-stage tolerance. Inductor's fused layer norms and softmaxes round differently from
eager's at the last bit; measured on this CPU the losses (about 5.5, where one float32 ulp is
4.8e-7) differed by at most one ulp, and a real defect (a block skipped or run twice, a wrong
scale) moves them by more than 1e-3. fp16 within 1e-4 and bf16 within 1e-3: inductor keeps a
fused chain's intermediates in fp32 where eager rounds each to 16 bits, so the difference is of
the order of 16-bit rounding (measured: 1.4e-5 and 2.7e-4), yet below the distance of each
precision from fp32 that tests/unit/parallel/test_engine.py allows.
"""
import dataclasses

import pytest
import torch

import gptx.parallel.pipeline
from gptx.analysis.precision_check import train_trace
from gptx.cli.pretrain import run_pretrain
from gptx.config import ModelConfig, load_config
from gptx.data.tokens import open_tokens
from gptx.model.gpt import GPT
from gptx.parallel.pipeline import compile_blocks, compiled_graph_count
from tests.helpers.runs import (make_token_dir, precision_ds, pretrain_args, read_metrics, train_losses,
                                write_ds_config, write_model_yaml)
from tests.unit.model.test_variants import VARIANTS
from tests.unit.parallel.test_engine import cpu_fp16 as cpu_fp16_fixture

cpu_fp16 = cpu_fp16_fixture

SMALL = dict(vocab_size=256, seq_len=16, n_layer=2, n_head=2, n_embd=32)
ITERS = 4
MICRO_BATCHES = 2  # precision_ds: 2 micro-batches of 2 per step
COMPILE_TOL = {"fp32": 1e-5, "fp16": 1e-4, "bf16": 1e-3}


def config(**kw):
    return load_config(None, dict(SMALL, lr=3e-3, warmup_iters=1, train_iters=ITERS, pipe_parallel_size=1,
                                  partition_method="uniform", **kw))


def compiled(cfg):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile_blocks=True))


class CountingBackend:
    """Dynamo's graphs run as captured; counts graphs compiled and calls into them."""

    def __init__(self):
        self.graphs = self.calls = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1

        def run(*args):
            self.calls += 1
            return gm.forward(*args)
        return run


@pytest.fixture
def counting(monkeypatch):
    torch._dynamo.reset()  # earlier tests' cache entries would answer for this one's blocks
    backend = CountingBackend()
    monkeypatch.setattr(gptx.parallel.pipeline, "COMPILE_BACKEND", backend)
    yield backend
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return open_tokens(make_token_dir(tmp_path_factory.mktemp("compile") / "data"), "train")


def block_runs(cfg, iters=ITERS, recomputed=1):
    return iters * MICRO_BATCHES * cfg.model.n_layer * recomputed


# Between them every variant key: ReZero, top-k, untied head; ALiBi, parallel residual, RealFormer's
# (x, scores) blocks; rotary, RMSNorm, SwiGLU, one key/value head; Macaron; no positions.
COVERING = ["gptx1b_like", "star_like", "llama_like", "macaron", "nopos"]


@pytest.mark.parametrize("name", COVERING)
def test_every_variant_trains_compiled_with_eager_losses(dist_world1, tokens, counting, name):
    cfg = config(**VARIANTS[name])
    eager = train_trace(cfg, precision_ds("fp32"), tokens, ITERS).losses
    assert counting.graphs == 0
    losses = train_trace(compiled(cfg), precision_ds("fp32"), tokens, ITERS).losses
    assert losses == eager
    # RealFormer's first block takes x alone, the next (x, scores): two signatures, one graph each.
    assert counting.graphs == (2 if cfg.model.residual_attention else 1)
    assert counting.calls == block_runs(cfg)


def test_zb_h1_compiles_between_its_split_linear_layers_and_still_defers_every_w(dist_world1, tokens, counting,
                                                                                 monkeypatch):
    """ZB-H1's linear layers run eagerly between a block's graphs (gptx/parallel/zero_bubble.py): compiled,
    the run gives the eager ZB-H1's losses, every linear layer's W still goes through the store, and the
    graphs are shared by the blocks and compiled once, not per step."""
    from gptx.parallel.zero_bubble import WeightGradStore
    put = WeightGradStore.put
    deferred = []
    monkeypatch.setattr(WeightGradStore, "put", lambda self, *a: deferred.append(1) or put(self, *a))
    cfg = config(pipeline_schedule="zb-h1", n_layer=4)
    eager = train_trace(cfg, precision_ds("fp32"), tokens, ITERS)
    eager_puts, deferred[:] = len(deferred), []
    assert eager_puts == ITERS * MICRO_BATCHES * cfg.model.n_layer * 4  # QKV, attention out, MLP in and out
    losses = train_trace(compiled(cfg), precision_ds("fp32"), tokens, ITERS).losses
    assert losses == eager.losses and len(deferred) == eager_puts
    graphs = counting.graphs
    assert 1 < graphs <= 8  # the pieces between four linear layers, for all 4 blocks and every step
    assert train_trace(compiled(cfg), precision_ds("fp32"), tokens, ITERS).losses == eager.losses
    assert counting.graphs == graphs  # a new engine of the same model: no new graph


LAYOUTS = {  # (pipeline stages, checkpoint interval, DeepSpeed JSON)
    "checkpointing": (1, 1, precision_ds("fp32")),
    "fp16": (1, 0, precision_ds("fp16-zero0-torch")),  # DeepSpeed's FP16_UnfusedOptimizer
    "bf16": (1, 0, precision_ds("bf16")),
    "no-pipeline": (0, 0, precision_ds("fp32")),
    "no-pipeline-zero3-checkpointing": (0, 1, dict(precision_ds("fp32"), zero_optimization={"stage": 3})),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpointing_half_precision_and_the_no_pipeline_mode_run_the_compiled_blocks(dist_world1, cpu_fp16, tokens,
                                                                                        counting, layout):
    pipe, interval, ds = LAYOUTS[layout]
    base = config()
    cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, activation_checkpoint_interval=interval,
                                                              pipe_parallel_size=pipe))
    reference = ds if pipe else precision_ds("fp32")  # the no-pipeline mode is checked against the pipeline
    eager = train_trace(config(), reference, tokens, ITERS).losses
    losses = train_trace(compiled(cfg), ds, tokens, ITERS).losses
    # ZeRO-3 sums gradients in another order than the pipeline (tests/unit/parallel/test_data_parallel.py).
    assert max(abs(a - b) for a, b in zip(eager, losses)) <= (5e-7 if "zero3" in layout else 0), (eager, losses)
    assert counting.graphs == 1  # the recomputation in backward reuses the training graph
    assert counting.calls == block_runs(cfg, recomputed=2 if interval else 1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_inductor_compiled_blocks_train_like_eager_ones(dist_world1, tokens, precision):
    cfg = config(activation_checkpoint_interval=1 if precision == "fp32" else 0)
    eager = train_trace(cfg, precision_ds(precision), tokens, ITERS)
    before = compiled_graph_count()
    trace = train_trace(compiled(cfg), precision_ds(precision), tokens, ITERS)
    assert compiled_graph_count() - before <= 1  # 0: an earlier test of this process compiled it
    diff = max(abs(a - b) for a, b in zip(eager.losses, trace.losses))
    assert diff < COMPILE_TOL[precision], (eager.losses, trace.losses)


def test_blocks_deeper_than_the_recompile_limit_all_run_compiled_and_never_silently_eager(counting, monkeypatch):
    # Every block shares Block.forward's cache entries; a per-instance entry would leave
    # blocks 3..10 eager under this limit.
    monkeypatch.setattr(gptx.parallel.pipeline, "COMPILE_RECOMPILE_LIMIT", 2)
    cfg = ModelConfig(**dict(SMALL, n_layer=10))
    model = GPT(cfg, seed=0)
    # Where torch.compile takes no recompile_limit (torch 2.11), compile_blocks raises the
    # process-wide limit to its own, never lowers it: that one starts low too.
    with torch._dynamo.config.patch(recompile_limit=2):
        assert compile_blocks(model.layers.values()) == 10
        idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
        for _ in range(2):
            model(idx).sum().backward()
        assert (counting.graphs, counting.calls) == (1, 20)
        with torch.no_grad():  # evaluation: another grad mode and dropout mode, one more graph
            model.eval()
            model(idx)
            model(idx)
            model.train()
        assert (counting.graphs, counting.calls) == (2, 40)
        # A third graph is over this limit: it raises instead of running the blocks eagerly.
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            model(idx[:, :8])


def pretrain_flags(tmp_path, save, pipe, *extra):
    data, model = tmp_path / "data", tmp_path / "model.yaml"
    if not data.exists():
        make_token_dir(data)
        write_model_yaml(model, **SMALL)
        write_ds_config(tmp_path / "ds.json", micro=2, accum=2)
    warmup = ["--seq-len-warmup", "0:4,2:8,4:16", "--eval-interval", "2", "--eval-iters", "2"]
    return pretrain_args(data, model, tmp_path / "ds.json", save, pipe, 6, *warmup, *extra)


# Three warmup lengths, evaluation every other step (at the full length). Per block signature:
# one graph for the first training length, one with a dynamic length (dynamo's automatic dynamic
# shapes) for every later one, and one for evaluation (no_grad, eval mode, always the full length).
LOOP_BOUND = 2 + 1
STEPS, EVALS = 6, 3


def val_losses(run):
    return [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]


def test_the_pipeline_loop_compiles_a_bounded_number_of_graphs_and_resumes_exactly(dist_world1, tmp_path, counting):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_pretrain(pretrain_flags(tmp_path, full, 1, "--compile-blocks")) == 0
    assert counting.graphs == LOOP_BOUND
    assert counting.calls == SMALL["n_layer"] * MICRO_BATCHES * (STEPS + 2 * EVALS)  # eval: 2 batches of 2
    assert [r["seq_len"] for r in read_metrics(full) if "loss" in r] == [4, 4, 8, 8, 16, 16]
    assert len(val_losses(full)) == EVALS
    assert run_pretrain(pretrain_flags(tmp_path, part, 1, "--compile-blocks", "--exit-interval", "3")) == 0
    torch._dynamo.reset()  # the resumed run compiles from nothing, as a new process does
    before = counting.graphs
    assert run_pretrain(pretrain_flags(tmp_path, part, 1, "--compile-blocks", "--load", str(part))) == 0
    assert counting.graphs - before == LOOP_BOUND  # lengths 8 then 16, evaluations at 4 and 6
    assert train_losses(part) == train_losses(full) and val_losses(part)[-1] == val_losses(full)[-1]


def test_the_no_pipeline_loop_compiles_as_many_graphs_with_eager_losses(dist_world1, tmp_path, counting):
    assert run_pretrain(pretrain_flags(tmp_path, tmp_path / "eager", 0)) == 0
    assert run_pretrain(pretrain_flags(tmp_path, tmp_path / "compiled", 0, "--compile-blocks")) == 0
    assert counting.graphs == LOOP_BOUND
    assert counting.calls == SMALL["n_layer"] * MICRO_BATCHES * (STEPS + 2 * EVALS)
    assert train_losses(tmp_path / "compiled") == train_losses(tmp_path / "eager")
    assert val_losses(tmp_path / "compiled") == val_losses(tmp_path / "eager")
