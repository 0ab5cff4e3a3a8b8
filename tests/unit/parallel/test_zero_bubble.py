"""ZB-H1 (gptx/parallel/zero_bubble.py): its instructions against DeepSpeed's 1F1B, its step time
against the paper's formula, the B/W split's gradients, and one-stage training in process.
Several stages and data-parallel replicas: tests/integration/test_zero_bubble.py."""
import dataclasses

import pytest
import torch
import torch.nn as nn
from deepspeed.runtime.pipe.schedule import (BackwardPass, OptimizerStep, RecvActivation, RecvGrad, ReduceGrads,
                                             ReduceTiedGrads, SendActivation, SendGrad, TrainSchedule)

from gptx.analysis.precision_check import train_trace
from gptx.config import ConfigError, load_config
from gptx.data.tokens import open_tokens
from gptx.parallel.zero_bubble import (LinearWithDeferredWeightGrad, WeightGradStore, WeightPass, ZeroBubbleH1,
                                       step_time, trace)
from tests.helpers.runs import MICRO_MODEL, make_token_dir, precision_ds

LAYOUTS = [(p, m) for p in (1, 2, 3, 4, 8) for m in (1, 2, 3, p, p + 1, 2 * p + 1, 4 * p)]


@pytest.mark.parametrize("stages,micro_batches", LAYOUTS)
def test_zb_h1_is_1f1b_with_one_w_per_micro_batch_before_the_reduction(stages, micro_batches):
    for stage in range(stages):
        ours = [step for step in ZeroBubbleH1(micro_batches, stages, stage).steps()]
        theirs = [step for step in TrainSchedule(micro_batches, stages, stage).steps()]
        flat = [c for step in ours for c in step]
        # Without the W's, the very same instructions in the same order: same buffers, same messages.
        assert [repr(c) for c in flat if not isinstance(c, WeightPass)] == [repr(c) for step in theirs for c in step]
        ws = [i for i, c in enumerate(flat) if isinstance(c, WeightPass)]
        backwards = [i for i, c in enumerate(flat) if isinstance(c, BackwardPass)]
        assert len(ws) == micro_batches
        assert all(w > b for w, b in zip(ws, backwards))  # the k-th W after the k-th B
        reduce_at = next(i for i, c in enumerate(flat) if isinstance(c, ReduceTiedGrads))
        assert max(ws) < reduce_at < [i for i, c in enumerate(flat) if isinstance(c, ReduceGrads)][0]
        assert isinstance(flat[-1], OptimizerStep)
        for step in ours[:-1]:  # a W comes after its step's sends and before its receives (the last step: after all)
            at = [i for i, c in enumerate(step) if isinstance(c, WeightPass)]
            if at:
                assert all(i < at[0] for i, c in enumerate(step) if isinstance(c, (SendActivation, SendGrad))), step
                assert all(i > at[-1] for i, c in enumerate(step) if isinstance(c, (RecvActivation, RecvGrad))), step
        if stage > 0:  # in particular, the previous B's gradient has gone
            for w in ws:
                b = max(i for i in backwards if i < w)
                assert next(i for i, c in enumerate(flat) if i > b and isinstance(c, SendGrad)) < w


@pytest.mark.parametrize("stages", [2, 3, 4, 8])
def test_step_time_is_the_papers_for_every_m_at_least_p(stages):
    """F = B = W: 1F1B's bubble is (p - 1)(F + B + W), ZB-H1's (p - 1)(F + B - W)."""
    for m in range(1, 6 * stages):
        assert step_time("1f1b", stages, m, 1, 1, 1) == 3 * m + 3 * (stages - 1)
        zb = step_time("zb-h1", stages, m, 1, 1, 1)
        if m >= stages:
            assert zb == 3 * m + (stages - 1)
        else:
            assert zb < 3 * m + 3 * (stages - 1)
    # The numbers, two stages: 15 against 13 time units at m = 4, 27 against 25 at m = 8.
    assert [step_time(s, 2, 4, 1, 1, 1) for s in ("1f1b", "zb-h1")] == [15, 13]
    assert [step_time(s, 2, 8, 1, 1, 1) for s in ("1f1b", "zb-h1")] == [27, 25]


def test_the_trace_shows_each_stage_and_its_idle_time():
    assert trace("zb-h1", 2, 4).splitlines() == [
        "stage 0  FF.BWFBWFBWBW",
        "         01 0021132233",
        "stage 1  .FBFBWFBWFBWW",
        "          001102213323",
    ]
    assert trace("1f1b", 2, 4).splitlines()[0] == "stage 0  FF..BBFBBFBB.BB"  # B lasts B + W


def test_deferred_weight_gradients_equal_autograds():
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    x = torch.randn(3, 4, 6, requires_grad=True)
    grad_y = torch.randn(3, 4, 5)
    linear(x).backward(grad_y)
    expected = [t.grad.clone() for t in (x, linear.weight, linear.bias)]
    for t in (x, linear.weight, linear.bias):
        t.grad = None
    store = WeightGradStore()
    store.reused_buffers([grad_y])  # as the engine's receive buffer, which the next micro-batch overwrites
    store.deferring = True
    LinearWithDeferredWeightGrad.apply(x, linear.weight, linear.bias, store).backward(grad_y)
    store.end_micro_batch()
    assert linear.weight.grad is None  # left for W
    grad_y.fill_(1e3)
    assert torch.allclose(x.grad, expected[0], atol=1e-6) and torch.allclose(linear.bias.grad, expected[2], atol=1e-6)
    for weight, grad in store.oldest():
        torch.autograd.backward(weight, grad)
    assert torch.allclose(linear.weight.grad, expected[1], atol=1e-6)
    assert store.pending() == 0


def test_bad_schedules_are_one_line_naming_the_key():
    with pytest.raises(ConfigError, match="train.pipeline_schedule: expected 1f1b or zb-h1, got 'gpipe'"):
        load_config(None, dict(MICRO_MODEL, pipeline_schedule="gpipe"))
    with pytest.raises(ConfigError, match="zb-h1 needs the pipeline engine"):
        load_config(None, dict(MICRO_MODEL, pipeline_schedule="zb-h1", pipe_parallel_size=0))


@pytest.fixture(scope="module")
def tokens(dist_world1, tmp_path_factory):
    return open_tokens(make_token_dir(tmp_path_factory.mktemp("zb") / "data"), "train")


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16-zero1-torch", "fp16-zero0-fused"])
def test_one_stage_trains_the_same_under_both_schedules(tokens, name, monkeypatch):
    """One stage, four micro-batches a step: every W runs after its B (no stage to wait for)."""
    monkeypatch.setenv("GPTX_CPU_FP16", "1")
    runs = {}
    taken = []
    oldest = WeightGradStore.oldest
    monkeypatch.setattr(WeightGradStore, "oldest", lambda self: taken.append(1) or oldest(self))
    for schedule in ("1f1b", "zb-h1"):
        cfg = load_config(None, dict(MICRO_MODEL, lr=3e-3, warmup_iters=1, train_iters=4, pipe_parallel_size=1,
                                     pipeline_schedule=schedule))
        runs[schedule] = train_trace(cfg, precision_ds(name, accum=4), tokens, 4)
    assert len(taken) == 4 * 4  # ZB-H1 ran a W per micro-batch; 1F1B none
    assert runs["zb-h1"].losses == runs["1f1b"].losses
    assert runs["zb-h1"].grad_norms == runs["1f1b"].grad_norms


@pytest.mark.parametrize("checkpointed", [False, True], ids=["eager", "checkpointed"])
def test_deferred_blocks_give_autograds_gradients_to_the_parameters_themselves(checkpointed):
    """Two decoder blocks, as on a middle stage: the output gradient is given, W runs after B. Under
    activation checkpointing the saved weight comes back as another tensor; W must still reach the
    parameter."""
    from gptx.config import ModelConfig
    from gptx.model.layers import Block
    from gptx.parallel.zero_bubble import defer_weight_grads
    torch.manual_seed(0)
    blocks = nn.ModuleList([Block(ModelConfig(**MICRO_MODEL)) for _ in range(2)])
    x = torch.randn(2, 8, MICRO_MODEL["n_embd"], requires_grad=True)
    grad_out = torch.randn(2, 8, MICRO_MODEL["n_embd"])

    def backward(store=None):
        for p in blocks.parameters():
            p.grad = None
        h = x
        for block in blocks:
            h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False) if checkpointed else block(h)
        if store is not None:
            store.deferring = True
        h.backward(grad_out)
        if store is not None:
            store.deferring = False
            store.end_micro_batch()
            for weight, grad in store.oldest():
                assert any(weight is p for p in blocks.parameters())
                torch.autograd.backward(weight, grad)
        return {n: p.grad.clone() for n, p in blocks.named_parameters()}

    expected = backward()
    store = WeightGradStore()
    assert defer_weight_grads(blocks, store) == 2 * 4  # QKV, attention output, MLP in and out
    got = backward(store)
    assert got.keys() == expected.keys()
    assert all(torch.allclose(got[n], expected[n], atol=1e-6) for n in expected)


@pytest.mark.parametrize("name", ["gptx1b_like", "star_like", "macaron"])
def test_the_block_variants_train_the_same_under_both_schedules(tokens, name):
    """ReZero gates and top-k attention; parallel residual with RealFormer's scores; Macaron's second MLP."""
    from tests.unit.model.test_variants import variant_config
    cfg = variant_config(name, pipe=1)
    losses = [train_trace(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, pipeline_schedule=s)),
                          precision_ds("fp32", accum=3), tokens, 3).losses for s in ("1f1b", "zb-h1")]
    assert losses[0] == losses[1]


def test_the_untied_heads_matmul_is_split_and_the_fused_loss_head_is_not():
    from gptx.config import ModelConfig
    from gptx.model.layers import Block, LMHead
    from gptx.parallel.zero_bubble import defer_weight_grads
    torch.manual_seed(0)
    head = LMHead(32, 250, padded_vocab_size=256)  # padding columns: their logits stay -inf
    store = WeightGradStore()
    assert defer_weight_grads([Block(ModelConfig(**MICRO_MODEL)), head, LMHead(32, 256, fused=True)], store) == 4 + 1
    x = torch.randn(2, 8, 32)
    logits = head(x)
    assert torch.isinf(logits[..., 250:]).all()
    store.deferring = True
    logits[..., :250].sum().backward()
    store.end_micro_batch()
    assert head.lm_head.weight.grad is None
    for weight, grad in store.oldest():
        assert weight is head.lm_head.weight
        torch.autograd.backward(weight, grad)
    expected = torch.zeros(256, 32)
    expected[:250] = x.reshape(-1, 32).sum(0)  # d(sum of logits)/dW: each real row gets the sum of the inputs
    assert torch.allclose(head.lm_head.weight.grad, expected, atol=1e-5)
