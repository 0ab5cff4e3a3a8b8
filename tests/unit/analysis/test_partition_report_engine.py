"""The partition report's memory model against the bytes a real engine allocates, in this process
(AllocatedPeak: on a CPU what torch.cuda.max_memory_allocated is on a GPU), where one term of the
model dominates the run: the unfused loss's logits, fp16's optimizer step without ZeRO, and the
activations under activation checkpointing."""
import copy

import pytest

from gptx.analysis.planner import Layout, predict
from gptx.config import load_config
from gptx.parallel.ds_config import DS_CONFIG_DIR, read_ds_config
from gptx.testing import CPU_FP16_ENV


def allocated_and_predicted(model: dict, pipe: int, zero: int, micro: int, accum: int, interval: int = 0,
                            fp16: bool = False, torch_adam: bool = True):
    """Two steps of the engine for this layout on random tokens: (peak allocated bytes, the report's
    prediction for its one rank, how many times each block ran forward)."""
    from gptx.analysis.benchmark import AllocatedPeak, random_batches
    from gptx.analysis.precision_check import release
    from gptx.model.layers import Block
    from gptx.parallel.engine import build_engine
    ds = copy.deepcopy(read_ds_config(DS_CONFIG_DIR / "cpu_fp32.json"))
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
              zero_optimization={"stage": zero, "reduce_bucket_size": 1000})
    if fp16:
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8}
    if not torch_adam:  # DeepSpeed's FusedAdam
        for key in ("torch_adam", "fused"):
            ds["optimizer"]["params"].pop(key)
    cfg = load_config(None, dict(model, pipe_parallel_size=pipe, activation_checkpoint_interval=interval))
    with AllocatedPeak() as peak:
        engine = build_engine(cfg, ds)
        blocks = [m for m in engine.module.modules() if isinstance(m, Block)]
        calls = [0] * len(blocks)
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        batches = random_batches(cfg, micro, seed=0)
        for _ in range(2):
            engine.train_batch(batches)
    release(engine)
    predicted = predict(cfg, Layout(pipe, zero, False, False, interval), ds, micro, accum, 1)["gpu_bytes"]
    return peak.bytes, predicted, calls


# Logits of 4 x 128 positions over 8,192 columns (4M logits, 16 MiB per 4 bytes) dwarf the rest.
WIDE_VOCAB = dict(vocab_size=8192, seq_len=128, n_layer=1, n_head=2, n_embd=32, pad_vocab_to_multiple=1)


@pytest.mark.parametrize("pipe,zero,accum,fp16",
                         [(1, 0, 1, False), (1, 0, 3, False), (1, 0, 3, True), (0, 1, 3, False)],
                         ids=["pipeline", "pipeline-3-micro-batches", "pipeline-fp16", "no-pipeline"])
def test_the_unfused_loss_is_counted_as_the_bytes_the_engine_allocates(dist_world1, monkeypatch, pipe, zero, accum,
                                                                         fp16):
    """The loss's backward holds 12 bytes per logit; the pipeline engine also keeps the last two
    micro-batches' logits in its output buffers (one with one micro-batch); without a pipeline
    nothing keeps them."""
    monkeypatch.setenv(CPU_FP16_ENV, "1")
    measured, predicted, _ = allocated_and_predicted(WIDE_VOCAB, pipe, zero, micro=4, accum=accum, fp16=fp16)
    assert predicted == pytest.approx(measured, rel=0.04), (measured, predicted)


# 12.9M parameters and 16-token micro-batches: the optimizer's bytes are nearly all of it.
WIDE_BLOCKS = dict(vocab_size=512, seq_len=16, n_layer=4, n_head=4, n_embd=512)


@pytest.mark.parametrize("torch_adam", [False, True], ids=["FusedAdam", "torch-AdamW"])
def test_fp16_without_zero_counts_the_fp32_gradients_of_its_step(dist_world1, monkeypatch, torch_adam):
    """ZeRO-0's fp16 optimizers (ds_configs/gpu_fp16.json's) step from fp32 copies of the gradients:
    FP16_Optimizer (with FusedAdam) 8 bytes per parameter at once, FP16_UnfusedOptimizer 4."""
    monkeypatch.setenv(CPU_FP16_ENV, "1")
    measured, predicted, _ = allocated_and_predicted(WIDE_BLOCKS, pipe=1, zero=0, micro=1, accum=1, fp16=True,
                                                     torch_adam=torch_adam)
    assert predicted == pytest.approx(measured, rel=0.03), (measured, predicted)


# Six blocks of 8 x 256 tokens (17 MiB each in fp32) dominate; the head is small.
DEEP = dict(vocab_size=256, seq_len=256, n_layer=6, n_head=4, n_embd=128)


@pytest.mark.parametrize("interval,pipe,zero", [(1, 1, 0), (4, 1, 0), (4, 0, 1)],
                         ids=["pipeline-1", "pipeline-4", "no-pipeline-4"])
def test_checkpointing_recomputes_every_block_and_is_counted_so(dist_world1, interval, pipe, zero):
    """gptx cuts the blocks alone into chunks of `interval`, from the first block, with a pipeline
    (GPTPipe.forward) and without: at 4, blocks 0-3 and 4-5, each recomputed in backward, so every
    block runs forward twice per micro-batch. (DeepSpeed's own forward cuts all of a stage's layers
    from its first one and runs [embedding, position, block, block] as it is: blocks 0-1 kept
    everything and ran once.) The peak comes while blocks 0-3 are recomputed beside the chunks' inputs."""
    measured, predicted, calls = allocated_and_predicted(DEEP, pipe, zero, micro=8, accum=2,
                                                         interval=interval)
    assert calls == [2 * 2 * 2] * DEEP["n_layer"]  # 2 steps x 2 micro-batches x (forward, recomputation)
    assert predicted == pytest.approx(measured, rel=0.08), (measured, predicted)
