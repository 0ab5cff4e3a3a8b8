"""The fused head + cross-entropy (gptx/model/fused_loss.py, train.fused_loss) against the unfused path.

Tolerances. fp32: the loss to 1e-6 relative, gradients to 1e-5 of their largest entry (the
same sums in another order and grouping). fp16/bf16: both paths multiply in the low precision
and round their results to it, so each is compared with an fp64 computation on the same
rounded inputs, to the dtype's eps (2^-10 fp16, 2^-7 bf16) relative to the largest entry:
one rounding of the result is eps/2, and the unfused path lands at about eps/2 here too.
The 2-stage check runs in tests/helpers/precision_matrix.py (tests/unit/parallel/test_engine.py).
"""
import dataclasses

import pytest
import torch

from gptx.analysis.benchmark import fused_loss_fn, head_loss_peak
from gptx.config import load_config
from gptx.data.tokens import open_tokens
from gptx.model.fused_loss import chunk_positions, linear_cross_entropy
from gptx.model.gpt import GPT, lm_loss
from gptx.model.layers import vocab_logits
from gptx.testing import CPU_FP16_ENV
from tests.helpers.runs import MICRO_MODEL, make_token_dir, precision_ds


def unfused(x, weight, labels, vocab_size):
    return lm_loss(vocab_logits(x, weight, vocab_size), labels)


def fused(rows):
    return lambda x, weight, labels, vocab_size: linear_cross_entropy(x, weight, labels, vocab_size, rows)


def loss_and_grads(fn, x, weight, labels, vocab_size, scale=1.0):
    """(loss, grad x, grad weight) in fp64, the gradients of `loss * scale` divided by scale."""
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = fn(x, weight, labels, vocab_size)
    (loss * scale).backward()
    return loss.detach().double(), x.grad.double() / scale, weight.grad.double() / scale


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def inputs(B, T, C, V, padded, dtype=torch.float32, seed=0, w_std=0.3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=gen).to(dtype)
    weight = (torch.randn(padded, C, generator=gen) * w_std).to(dtype)  # logits spread over several units
    labels = torch.randint(0, V, (B, T), generator=gen)
    return x, weight, labels


# 2 x 24 = 48 positions: chunks of 1, 7 (a last partial chunk of 6), exactly 48, more than 48, the default.
@pytest.mark.parametrize("rows", [1, 7, 48, 1000, None])
@pytest.mark.parametrize("V,padded", [(97, 97), (97, 128)], ids=["unpadded", "padded"])
def test_fp32_loss_and_gradients_equal_the_unfused_path(rows, V, padded):
    x, weight, labels = inputs(2, 24, 16, V, padded)
    ref = loss_and_grads(unfused, x, weight, labels, V)
    got = loss_and_grads(fused(rows), x, weight, labels, V)
    assert abs(got[0] - ref[0]) / ref[0] < 1e-6
    assert rel(got[1], ref[1]) < 1e-5
    assert rel(got[2], ref[2]) < 1e-5
    # Padding rows are never tokens: no probability, so exactly no gradient.
    assert torch.equal(got[2][V:], torch.zeros_like(got[2][V:]))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("pad", [1, 48])
def test_a_whole_gpt_gets_the_same_gradients_in_every_parameter(tied, pad):
    """Through the model: the tied table gets the embedding's gradient and the head's in one tensor."""
    cfg = load_config(None, dict(MICRO_MODEL, vocab_size=250, tie_embeddings=tied, pad_vocab_to_multiple=pad))
    assert (cfg.model.padded_vocab_size != 250) == (pad > 1)
    model = GPT(cfg.model, seed=3)
    gen = torch.Generator().manual_seed(1)
    idx, labels = torch.randint(0, 250, (2, 3, 32), generator=gen)
    grads = []
    for loss_fn in (lambda x, y: lm_loss(model(x), y), fused_loss_fn(model)):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(idx, labels)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_loss, ref), (got_loss, got) = grads
    assert abs(got_loss - ref_loss) / ref_loss < 1e-6
    assert ref.keys() == got.keys()
    for name in ref:
        assert rel(got[name], ref[name]) < 1e-5, name
    assert model(idx).shape == (3, 32, cfg.model.padded_vocab_size)  # GPT itself still gives logits


@pytest.mark.parametrize("dtype,scale", [(torch.bfloat16, 1.0), (torch.float16, 1.0), (torch.float16, 2.0 ** 16)],
                         ids=["bf16", "fp16", "fp16-scaled"])
def test_low_precision_is_as_close_to_fp64_as_the_dtype_allows(dtype, scale):
    """4,096 positions: (softmax - onehot) / N in fp16 would underflow; the fused path keeps the
    1/N and the loss scale in fp32, so it holds even at a loss scale of 1."""
    V = 1000
    x, weight, labels = inputs(4, 1024, 16, V, 1024, dtype=dtype, w_std=0.1)
    ref = loss_and_grads(unfused, x.double(), weight.double(), labels, V)
    got = loss_and_grads(fused(600), x, weight, labels, V, scale)
    eps = torch.finfo(dtype).eps
    assert abs(got[0] - ref[0]) / ref[0] < 1e-4  # fp32 arithmetic on logits rounded to dtype
    assert rel(got[1], ref[1]) < eps
    assert rel(got[2], ref[2]) < eps
    if scale > 1:
        # Nearly every entry of grad_x is below fp16's smallest normal number here: only scaled
        # before the cast to fp16 do they keep fp16's precision each, not just next to the largest.
        assert (ref[1].abs() < torch.finfo(dtype).tiny).double().mean() > 0.9
        entry_err = (got[1] - ref[1]).abs() / ref[1].abs()
        assert entry_err.quantile(0.9) < eps


def test_autocast_multiplies_in_its_dtype_like_the_unfused_head():
    x, weight, labels = inputs(2, 24, 16, 97, 128)
    results = []
    for fn in (unfused, fused(10)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(loss_and_grads(fn, x, weight, labels, 97))
    ref, got = results
    exact = loss_and_grads(unfused, x.double(), weight.double(), labels, 97)
    assert abs(got[0] - ref[0]) / ref[0] < 1e-5  # the same bf16 logits
    assert abs(got[0] - exact[0]) / exact[0] > 1e-5  # and bf16 they were
    for g, e in zip(got[1:], exact[1:]):
        assert rel(g, e) < torch.finfo(torch.bfloat16).eps


def test_the_gradients_scale_with_the_incoming_gradient():
    x, weight, labels = inputs(2, 24, 16, 97, 97)
    one = loss_and_grads(fused(7), x, weight, labels, 97)
    scaled = loss_and_grads(fused(7), x, weight, labels, 97, scale=1024.0)  # divided back by 1024
    assert torch.equal(one[1], scaled[1]) and torch.equal(one[2], scaled[2])  # powers of two: exact


def test_without_grad_only_the_loss_is_computed():
    B, T, C, V = 2, 32, 32, 4096
    x, weight, labels = inputs(B, T, C, V, V)
    x.requires_grad_()
    weight.requires_grad_()
    from gptx.analysis.benchmark import AllocatedPeak
    with torch.no_grad(), AllocatedPeak() as peak:
        loss = linear_cross_entropy(x, weight, labels, V, rows=4)
    assert not loss.requires_grad
    assert abs(loss.item() - unfused(x, weight, labels, V).item()) < 1e-5
    chunk = 4 * V * 4
    assert peak.bytes < 2 * chunk < V * C * 4  # a chunk of logits at a time, no (V, C) gradient


def test_a_second_backward_is_refused_rather_than_wrong():
    x, weight, labels = inputs(1, 8, 4, 11, 11)
    x.requires_grad_()
    loss = linear_cross_entropy(x, weight, labels, 11)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


def test_ignored_labels_count_as_cross_entropy_counts_them():
    x, weight, labels = inputs(2, 24, 16, 97, 97)
    labels[0, :5] = -100
    ref = loss_and_grads(unfused, x, weight, labels, 97)
    got = loss_and_grads(fused(7), x, weight, labels, 97)
    assert abs(got[0] - ref[0]) / ref[0] < 1e-6
    assert rel(got[1], ref[1]) < 1e-5 and rel(got[2], ref[2]) < 1e-5


def test_an_fp16_chunk_of_one_repeated_token_does_not_overflow():
    # A chunk sums its positions' share of the table's gradient before the 1/N: 700 positions of
    # one target beside an activation of 100 pass fp16's 65,504 there, where the unfused path,
    # which divides first, stays finite. Seen as -inf before that product was taken in fp32.
    x, weight, labels = inputs(1, 700, 16, 97, 97, dtype=torch.float16, w_std=0.02)
    x[..., 0] = 100.0
    labels.fill_(3)
    ref = loss_and_grads(unfused, x.float(), weight.float(), labels, 97)
    got = loss_and_grads(fused(700), x, weight, labels, 97)
    assert torch.isfinite(got[2]).all()
    assert rel(got[2], ref[2]) < 2 ** -10


def test_chunks_are_sized_by_bytes_of_fp32_logits():
    assert chunk_positions(50304) == 128 * 2 ** 20 // (4 * 50304)
    assert chunk_positions(10 ** 9) == 1


def test_head_and_loss_peak_memory_drops_at_least_4x():
    """2 x 256 positions, n_embd 32, 4,096 rows, chunks of 32 positions. Unfused holds about three
    N x V fp32 arrays at once (logits, the saved log-softmax, their gradient); fused holds the fp32
    grad_W (V x C), grad_x (N x C) and one chunk (rows x V), so the ratio is about
    3N / (C + N C / V + rows), whatever V: the same proportions as 8 x 1024 positions, n_embd 768
    and GPT-2's 50,304 rows in chunks of 667 (README, "Performance")."""
    args = (2, 256, 32, 4096)
    unfused_bytes = head_loss_peak(*args, fused=False)
    fused_bytes = head_loss_peak(*args, fused=True, rows=32)
    assert unfused_bytes >= 4 * fused_bytes, (unfused_bytes, fused_bytes)


# --- the engines: the pipeline (1 stage here, 2 in tests/helpers/precision_matrix.py) and the no-pipeline mode ---

ITERS = 4


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return open_tokens(make_token_dir(tmp_path_factory.mktemp("fused") / "data"), "train")


def config(**keys):
    return load_config(None, {**MICRO_MODEL, "lr": 3e-3, "warmup_iters": 1, "train_iters": ITERS,
                              "pipe_parallel_size": 1, **keys})


def with_fused(cfg, on: bool):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fused_loss=on))


def trace(cfg, ds, tokens):
    """Training losses, then an eval_batch's loss and the module's parameter names."""
    from gptx.analysis.precision_check import batches_for, train_trace
    seen = {}

    def on_done(engine):
        seen["names"] = sorted(n for n, _ in engine.module.named_parameters())
        windows = batches_for(engine, cfg, ds, tokens)
        seen["eval"] = float(engine.eval_batch(iter(windows), num_micro_batches=2))
    return train_trace(cfg, ds, tokens, ITERS, on_done=on_done), seen


ENGINE_CASES = {
    "pipeline-tied": dict(),
    # interval 5 of 8 layers: the last range (block, final norm, head) is recomputed, head outputs included
    "pipeline-untied-padded-checkpointed": dict(tie_embeddings=False, pad_vocab_to_multiple=96,
                                                activation_checkpoint_interval=5),
    "no-pipeline-zero3-untied": dict(pipe_parallel_size=0, tie_embeddings=False),
}


@pytest.mark.parametrize("case", ENGINE_CASES)
def test_the_engine_trains_and_evaluates_the_same_fused(dist_world1, tokens, case, monkeypatch):
    import gptx.model.fused_loss
    calls = []
    original = gptx.model.fused_loss.linear_cross_entropy
    monkeypatch.setattr(gptx.model.fused_loss, "linear_cross_entropy", lambda *a, **k: calls.append(1) or original(*a, **k))
    cfg = config(**ENGINE_CASES[case])
    ds = precision_ds("fp32")
    if cfg.train.pipe_parallel_size == 0:
        ds = dict(ds, zero_optimization={"stage": 3})
    ref, ref_seen = trace(with_fused(cfg, False), ds, tokens)
    assert not calls
    got, got_seen = trace(with_fused(cfg, True), ds, tokens)
    assert calls  # the fused path really ran
    assert max(abs(a - b) for a, b in zip(ref.losses, got.losses)) < 1e-5, (ref.losses, got.losses)
    assert ref.losses[-1] < ref.losses[0]
    assert max(abs(a - b) / a for a, b in zip(ref.grad_norms, got.grad_norms)) < 1e-4
    assert abs(ref_seen["eval"] - got_seen["eval"]) < 1e-5
    assert ref_seen["names"] == got_seen["names"]  # the checkpoint's layer files hold the same names


@pytest.fixture(scope="module")
def cpu_fp16():
    mp = pytest.MonkeyPatch()
    mp.setenv(CPU_FP16_ENV, "1")
    yield
    mp.undo()


@pytest.mark.parametrize("name,tol", [("fp16-zero0-torch", 1e-3), ("fp16-zero1-fused", 1e-3), ("bf16", 3e-3)])
def test_fp16_and_bf16_engines_follow_fp32_fused(dist_world1, cpu_fp16, tokens, name, tol):
    """tests/unit/parallel/test_engine.py's criterion (its docstring says why 1e-3 and 3e-3): a wrongly scaled
    fp16 loss (defect 2's workaround wraps the fused loss too) moves the loss by more."""
    from gptx.analysis.precision_check import train_trace
    cfg = with_fused(config(), True)
    reference = train_trace(with_fused(cfg, False), precision_ds("fp32"), tokens, ITERS)
    low = train_trace(cfg, precision_ds(name, initial_scale_power=12, loss_scale_window=2)
                      if name.startswith("fp16") else precision_ds(name), tokens, ITERS)
    assert low.skipped[-1] == 0
    assert max(abs(a - b) for a, b in zip(reference.losses, low.losses)) < tol, (reference.losses, low.losses)


def test_the_plain_loop_trains_the_same_fused(dist_world1):
    from gptx.analysis.benchmark import plain_loop
    from gptx.parallel.ds_config import BatchLayout
    cfg = config(tie_embeddings=False, pad_vocab_to_multiple=96)
    ds = precision_ds("fp32")
    losses = []
    for on in (False, True):
        loop = plain_loop(with_fused(cfg, on), ds, BatchLayout(2, 2, 1), torch.device("cpu"), seed=0)
        losses.append([loop.step(1e-3) for _ in range(3)])
    assert max(abs(a - b) for a, b in zip(*losses)) < 1e-5, losses
