import json
import re
import time

import pytest
import torch

from gptx.analysis.partition_report import partition_report
from gptx.cli.partition_report import run_partition_report
from gptx.config import ModelConfig, load_config
from gptx.model.gpt import lm_loss
from gptx.parallel.ds_config import DS_CONFIG_DIR, BatchLayout
from gptx.presets import LLAMA_BLOCK
from tests.helpers.runs import MICRO_MODEL

FP32 = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}


def report(model="gpt2", pipe=2, method="parameters", ds=None, dp=1, **overrides):
    cfg = load_config(model, {"pipe_parallel_size": pipe, "partition_method": method, **overrides})
    ds = ds or {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 8, "fp16": {"enabled": True}}
    layout = BatchLayout(ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], dp)
    return partition_report(cfg, pipe, method, ds, layout)


def test_tied_embedding_counts_on_both_end_stages_and_once_in_unique():
    one, two = report(pipe=1), report(pipe=2)
    V, C = 50304, 768  # the preset pads GPT-2's 50,257 tokens to a multiple of 64
    assert one["unique_params"] == two["unique_params"] == 124_439_808 + 47 * C  # GPT-2 small as released + padding
    assert report(pipe=1, pad_vocab_to_multiple=1)["unique_params"] == 124_439_808
    assert one["total_params"] == one["unique_params"]
    assert two["total_params"] == two["unique_params"] + V * C
    assert sum(s["params"] for s in two["stages"]) == two["total_params"]


@pytest.mark.parametrize("p,m", [(2, 8), (4, 4), (8, 1)])
def test_bubble_fraction(p, m):
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": m}
    assert report("gpt2-xl", pipe=p, ds=ds)["bubble_fraction"] == pytest.approx((p - 1) / (m + p - 1))


def test_compute_partition_balances_compute_better_than_parameters():
    r = report("gpt2-xl", pipe=4)
    by_params, by_compute = r["methods"]["parameters"], r["methods"]["compute"]
    assert by_compute["compute_max_over_mean"] < by_params["compute_max_over_mean"]
    assert report("gpt2-xl", pipe=4, method="compute")["parts"] == by_compute["parts"]


def test_stage_compute_adds_up_to_the_model_flops():
    from gptx.model.flops import flops_per_token
    r = report("gpt2-medium", pipe=3)
    model_flops = flops_per_token(load_config("gpt2-medium").model)
    assert sum(s["flops_per_token"] for s in r["stages"]) == pytest.approx(model_flops)


def test_zero1_divides_optimizer_states_and_checkpointing_saves_activations():
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 8, "bf16": {"enabled": True},
          "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}}
    one, four = report("gpt2-large", ds=ds, dp=1), report("gpt2-large", ds=ds, dp=4)
    m1, m4 = one["stages"][0]["memory_bytes"], four["stages"][0]["memory_bytes"]
    assert m1["optimizer_states"] == pytest.approx(4 * m4["optimizer_states"], rel=1e-6)
    # fp32 master + Adam's two moments; bf16's fp32 gradient shard is part of its accumulation buffer
    assert m1["optimizer_states"] == 12 * one["stages"][0]["params"]
    assert m1["gradients"] == (2 + 4) * one["stages"][0]["params"]
    assert m1["activations_checkpointed"] < m1["activations"] / 4
    # 1F1B: stage s of p keeps up to p - s micro-batches
    r = report("gpt2-large", pipe=4, ds=ds)
    assert [s["memory_bytes"]["micro_batches_in_flight"] for s in r["stages"]] == [4, 3, 2, 1]


def test_every_preset_reports_quickly_including_175b(capsys):
    start = time.perf_counter()
    assert run_partition_report(["--model", "gpt3-175b", "--pipe-parallel-size", "8", "--json"]) == 0
    assert time.perf_counter() - start < 15
    r = json.loads(capsys.readouterr().out)  # stdout is exactly one JSON object
    assert {"unique_params", "total_params", "stages", "bubble_fraction"} <= r.keys()
    stage = r["stages"][0]
    assert {"stage", "params", "layers", "memory_bytes"} <= stage.keys()
    assert {"index", "name", "params"} <= stage["layers"][0].keys()
    assert r["unique_params"] > 174e9


def test_text_report_shows_the_layout_in_deepspeeds_shape(capsys):
    assert run_partition_report(["--model", "gpt2", "--pipe-parallel-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "stage=0 layers=" in out and re.search(r"^\s+0: TokenEmbedding", out, re.M)
    assert "pipeline bubble" in out and "compute" in out and "#" in out


@pytest.mark.parametrize("argv,needle", [
    (["--partition-method", "bogus"], "train.partition_method"),
    (["--partition-method", "type:Nothing"], "no layer class matches"),
    (["--model", "gpt-9"], "unknown model preset"),
])
def test_report_bad_input(capsys, argv, needle):
    assert run_partition_report(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("zero,needle", [
    ({"reduce_bucket_size": "auto"}, "zero_optimization.reduce_bucket_size: expected a number of elements, got 'auto'"),
    ({"stage": 3, "stage3_max_reuse_distance": -1}, "zero_optimization.stage3_max_reuse_distance"),
    ({"overlap_comm": "false"}, "zero_optimization.overlap_comm: expected true or false, got 'false'"),
])
def test_settings_the_memory_model_reads_are_checked_in_one_line(capsys, tmp_path, zero, needle):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                              "optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2, **zero}}))
    assert run_partition_report(["--pipe-parallel-size", "0", "--deepspeed_config", str(ds)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and len(err.splitlines()) == 1


def test_memory_estimate_matches_the_tensors_the_engine_holds(dist_world1, tmp_path):
    import deepspeed

    from gptx.parallel.engine import param_groups
    from gptx.parallel.pipeline import build_pipeline
    cfg = load_config("tiny", {**MICRO_MODEL, "pipe_parallel_size": 1})
    ds = {**FP32, "optimizer": {"type": "AdamW", "params": {"weight_decay": 0.1, "torch_adam": True}},
          "steps_per_print": 10 ** 9}
    est = report("tiny", pipe=1, ds=ds, **MICRO_MODEL)["stages"][0]["memory_bytes"]
    model = build_pipeline(cfg)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds)
    x = torch.randint(0, 256, (2, 32))
    engine.train_batch(iter([(x, x)] * 4))
    weights = sum(p.numel() * p.element_size() for p in engine.module.parameters())
    states = sum(t.numel() * t.element_size() for s in engine.optimizer.state.values() for t in s.values()
                 if torch.is_tensor(t) and t.dim() > 0)
    lm_loss(engine.module(x), x).backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in engine.module.parameters())
    for name, real in (("weights", weights), ("gradients", grads), ("optimizer_states", states)):
        assert est[name] == pytest.approx(real, rel=0.03), name


def test_every_preset_reports_in_seconds():
    from gptx.presets import PRESETS
    for name in PRESETS:
        start = time.perf_counter()
        r = report(name, pipe=4)
        assert time.perf_counter() - start < 5, name
        assert r["total_params"] >= r["unique_params"] > 0


def test_zero_2_3_and_offload_move_memory_as_their_formulas_say():
    """Per rank, P parameters, D replicas, fp16, the buffers DeepSpeed 0.19.8's source allocates:
    ZeRO-2 shards the gradients (2P/D), ZeRO-3 the weights too (2P/D) and keeps the whole model
    gathered (2P) while it is under half of stage3_max_reuse_distance, else about that many
    elements; optimizer offload moves the states (16P/D) to the host, with ZeRO-1/2 a 16-bit
    weight shard (2P/D) and two buffers of the largest parameter (2L each, one per side), with
    ZeRO-3 its gradient accumulation shard (2P/D); parameter offload moves the weight shard.
    The reduction buckets: one of reduce_bucket_size elements in the gradients' type, two
    through the pipeline."""
    base = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "fp16": {"enabled": True}}
    bucket, block, embedding = 1000, 7_087_872, 50304 * 768  # gpt2's largest layers; the largest parameter

    def mem(stage, pipe=0, **zero):
        ds = dict(base, zero_optimization={"stage": stage, "reduce_bucket_size": bucket, **zero})
        r = report("gpt2", pipe=pipe, ds=ds, dp=8)
        assert len(r["stages"]) == 1 and r["pipe_parallel_size"] == pipe
        return r["stages"][0]["memory_bytes"], r["unique_params"]

    m1, P = mem(1)
    m2, _ = mem(2)
    m3, _ = mem(3)
    near = lambda x: pytest.approx(x, abs=8)  # noqa: E731 (each term is rounded down on its own)
    assert m1["gradients"] == 2 * P and m2["gradients"] == near(2 * P / 8)
    assert m2["optimizer_states"] == m1["optimizer_states"] == near(16 * P / 8)
    assert m1["buffers"] == m2["buffers"] == m3["buffers"] == 2 * bucket
    assert mem(1, pipe=1)[0]["buffers"] == 2 * 2 * bucket
    assert m3["weights"] == near(2 * P / 8 + 2 * P)
    assert m3["gradients"] == near(2 * P / 8)
    reuse = mem(3, stage3_max_reuse_distance=0)[0]
    assert reuse["weights"] == near(2 * P / 8 + 2 * (embedding + block))
    off1, _ = mem(1, offload_optimizer={"device": "cpu"})
    assert off1["host"] == near(16 * P / 8 + 2 * P / 8 + 2 * embedding) and off1["optimizer_states"] == 0
    assert off1["buffers"] == 2 * bucket + 2 * embedding
    off, _ = mem(3, offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"})
    assert off["optimizer_states"] == off["gradients"] == 0
    assert off["host"] == near(16 * P / 8 + 2 * P / 8 + 2 * P / 8)
    assert off["weights"] == 2 * P and off["total"] < m3["total"]
    assert m1["host"] == m2["host"] == m3["host"] == 0


def test_buckets_count_whole_as_allocated_and_as_far_as_written_when_resident():
    """DeepSpeed's default bucket is torch.empty(5e8) in the gradients' type: 2 GB allocated in
    fp32 however small the model. A CPU's resident memory holds only the pages written: the
    stage's gradients in the first bucket; the pipeline's second is never written."""
    ds = {**FP32, "zero_optimization": {"stage": 1}}
    allocated = report("tiny", pipe=2, ds=ds, **MICRO_MODEL)
    params = allocated["stages"][0]["params"]
    assert allocated["stages"][0]["memory_bytes"]["buffers"] == 2 * 500_000_000 * 4
    resident = partition_report(load_config("tiny", {**MICRO_MODEL, "pipe_parallel_size": 2}), 2, "parameters",
                                ds, BatchLayout(2, 2, 1), touched_only=True)
    assert resident["stages"][0]["memory_bytes"]["buffers"] == params * 4


def _saved_bytes_per_token(cfg, dtype) -> float:
    """What autograd really keeps for one block's backward: every saved tensor's storage, once,
    weights excluded, per token of a (2, 64) micro-batch."""
    from gptx.model.layers import Block
    block = Block(cfg).to(dtype)
    for name, p in block.named_parameters():
        if "gate" in name:
            torch.nn.init.constant_(p, 0.5)
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(torch.randn(2, 64, cfg.n_embd, dtype=dtype, requires_grad=True))
    return sum(kept.values()) / (2 * 64)


@pytest.mark.parametrize("keys", [{}, dict(position_embedding="rotary"), dict(residual="parallel"),
                                  dict(norm="rezero"), dict(macaron=True), dict(norm="rmsnorm"), dict(mlp="swiglu"),
                                  dict(n_kv_head=1), dict(LLAMA_BLOCK, n_kv_head=2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_activation_bytes_match_what_autograd_keeps(keys, dtype):
    from gptx.analysis.partition_report import block_activation_bytes
    cfg = ModelConfig(vocab_size=97, seq_len=64, n_layer=2, n_head=8, n_embd=128, **keys)
    predicted = block_activation_bytes(cfg, dtype.itemsize)
    measured = _saved_bytes_per_token(cfg, dtype)
    # Never below; above by at most the attention output's copy, which a kernel whose output
    # is already in the projection's layout does not make.
    assert measured <= predicted <= measured + 128 * dtype.itemsize + 1, (predicted, measured)


def test_the_fused_loss_is_counted_as_the_bytes_it_allocates():
    # The memory model's head-and-loss term against what the fused path really allocates
    # (AllocatedPeak, forward and backward, fp32): in one chunk, and in GPT-2's table, whose
    # 2,048 positions take four chunks.
    from gptx.analysis.benchmark import head_loss_peak
    from gptx.analysis.partition_report import head_loss_bytes
    for B, T, C, V in ((2, 256, 32, 4096), (2, 1024, 16, 50304)):
        measured = head_loss_peak(B, T, C, V, fused=True)
        assert measured == pytest.approx(head_loss_bytes(B * T, C, V, 4, fused=True), rel=0.05), (B, T, C, V)


def test_zb_h1_shrinks_the_bubble_and_adds_what_each_stage_keeps_for_its_w():
    one, zero = report(pipe=4), report(pipe=4, pipeline_schedule="zb-h1")
    m = 8
    assert one["bubble_fraction"] == pytest.approx(3 / (m + 3))  # (p - 1) / (m + p - 1)
    assert zero["bubble_fraction"] == pytest.approx(3 / (3 * m + 3))  # (p - 1) / (3m + p - 1), F = B = W
    # Stage s keeps, for up to s micro-batches, each block linear layer's input and output gradient:
    # GPT-2 small's QKV (768 in, 2304 out), attention output (768, 768), MLP in (768, 3072), out (3072, 768).
    per_block = 8 * 1024 * ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768)) * 2  # fp16
    for a, b in zip(one["stages"], zero["stages"]):
        blocks = sum(layer["name"] == "Block" for layer in a["layers"])
        extra = b["memory_bytes"]["activations"] - a["memory_bytes"]["activations"]
        assert extra == a["stage"] * blocks * per_block


def test_the_unfused_loss_alone_is_counted_as_the_bytes_it_allocates():
    # With nothing keeping the logits (no pipeline engine), the loss's backward holds the fp32
    # log-probabilities, their gradient and log_softmax's: 12 bytes per logit.
    from gptx.analysis.benchmark import head_loss_peak
    from gptx.analysis.partition_report import head_loss_bytes
    measured = head_loss_peak(2, 256, 32, 4096, fused=False)
    assert measured == pytest.approx(head_loss_bytes(2 * 256, 32, 4096, 4, fused=False), rel=0.05)


def test_zb_h1_keeps_the_untied_heads_logits_gradient_for_each_waiting_w():
    """An untied head without the fused loss defers its W too (gptx/parallel/zero_bubble.py): the store
    keeps its input and its (B, T, V) logits' gradient, here for the one micro-batch whose W waits on
    the last of 2 stages. Measured on a real store, per token, in fp16."""
    from gptx.model.layers import LMHead
    from gptx.parallel.zero_bubble import WeightGradStore, defer_weight_grads
    m = load_config("gpt2", {"tie_embeddings": False}).model
    head = LMHead(m.n_embd, m.vocab_size, m.padded_vocab_size).half()
    store, kept = WeightGradStore(), []
    put = store.put
    store.put = lambda weight, x, grad_y: (kept.append(x.nbytes + grad_y.nbytes), put(weight, x, grad_y))
    assert defer_weight_grads([head], store) == 1
    x = torch.randn(1, 64, m.n_embd, dtype=torch.float16, requires_grad=True)
    store.deferring = True
    lm_loss(head(x), torch.randint(0, m.vocab_size, (1, 64))).backward()
    per_micro_batch = sum(kept) // 64 * 8 * 1024  # the report's micro-batch: 8 x 1024 tokens
    schedule = dict(tie_embeddings=False, pipeline_schedule="zb-h1")
    unfused, fused = report(pipe=2, **schedule), report(pipe=2, fused_loss=True, **schedule)
    extra = [a["memory_bytes"]["activations"] - b["memory_bytes"]["activations"]
             for a, b in zip(unfused["stages"], fused["stages"])]
    assert extra == [0, per_micro_batch]


def test_the_report_names_a_layout_training_refuses(capsys):
    """gpt2 by parameters on 8 stages in bf16: the tied head alone on the last stage, which training
    refuses before the engine (DeepSpeed defect 13). The report shows it first, and says nothing for 2."""
    bf16 = str(DS_CONFIG_DIR / "gpu_bf16.json")
    assert run_partition_report(["--model", "gpt2", "--pipe-parallel-size", "8", "--deepspeed_config", bf16]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("training refuses this layout: stage 7 would hold only "
                                                             "TokenEmbedding, the tied head")
    assert run_partition_report(["--model", "gpt2", "--pipe-parallel-size", "2", "--deepspeed_config", bf16,
                                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["engine_refuses"] is None
