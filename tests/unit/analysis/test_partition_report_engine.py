"""The partition report's memory model against the bytes a real engine allocates, in this process
(AllocatedPeak: on a CPU what torch.cuda.max_memory_allocated is on a GPU), where one term of the
model dominates the run: the unfused loss's logits, fp16's optimizer step without ZeRO, and the
activations under DeepSpeed's checkpointing."""
import copy

import pytest

from gptx.analysis.planner import Layout, predict
from gptx.config import load_config
from gptx.parallel.ds_config import DS_CONFIG_DIR, read_ds_config
from gptx.testing import CPU_FP16_ENV


def allocated_and_predicted(model: dict, pipe: int, zero: int, micro: int, accum: int, interval: int = 0,
                            fp16: bool = False, torch_adam: bool = True):
    """Two steps of the engine for this layout on random tokens: (peak allocated bytes, the report's
    prediction for its one rank, the engine's checkpointing chunks)."""
    from gptx.analysis.benchmark import AllocatedPeak, random_batches
    from gptx.analysis.precision_check import release
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
        batches = random_batches(cfg, micro, seed=0)
        for _ in range(2):
            engine.train_batch(batches)
    chunks = list(getattr(engine.module, "is_checkpointable_results", []))
    release(engine)
    predicted = predict(cfg, Layout(pipe, zero, False, False, interval), ds, micro, accum, 1)["gpu_bytes"]
    return peak.bytes, predicted, chunks


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


@pytest.mark.parametrize("interval", [1, 4])
def test_checkpointing_is_counted_in_deepspeeds_chunks(dist_world1, interval):
    """PipelineModule.forward cuts the stage's layers in chunks of `interval` from its first layer and
    recomputes only the chunks of blocks alone: at 4, [embedding, position, block, block] keeps
    everything, blocks 2-5 are recomputed, and [final norm, head] is not checkpointed; the peak, while
    blocks 2-5 are recomputed beside blocks 0-1, is what no checkpointing holds."""
    from gptx.analysis.partition_report import checkpoint_chunks
    from gptx.model.gpt import layer_specs
    from gptx.parallel.pipeline import layer_name
    measured, predicted, chunks = allocated_and_predicted(DEEP, pipe=1, zero=0, micro=8, accum=2, interval=interval)
    names = [layer_name(spec) for spec in layer_specs(load_config(None, DEEP).model, seed=0)]
    assert predicted == pytest.approx(measured, rel=0.08), (measured, predicted)
    assert [recomputed for _, recomputed in checkpoint_chunks(names, interval, pipeline=True)] == chunks
