"""Architecture variants: causality, ALiBi slopes, long contexts, top-k, ReZero, and stage parity."""

import pytest
import torch

from gptx.analysis.variants import VARIANTS as BASE_VARIANTS
from gptx.config import ModelConfig, load_config
from gptx.errors import ConfigError
from gptx.model.gpt import GPT
from gptx.model.layers import Block, CausalSelfAttention, alibi_slopes
from gptx.presets import LLAMA_BLOCK
from tests.helpers.runs import MICRO_MODEL, make_token_dir, precision_ds

VARIANTS = {name: keys for name, keys in BASE_VARIANTS.items() if keys}  # every key, alone


VARIANTS.update(gptx1b_like=dict(norm="rezero", attention_topk=4, tie_embeddings=False),
                star_like=dict(position_embedding="alibi", residual="parallel", residual_attention=True),
                llama_like=dict(LLAMA_BLOCK, n_kv_head=1, tie_embeddings=False))


SMALL = dict(vocab_size=97, seq_len=16, n_layer=3, n_head=4, n_embd=32)


def small(**kw) -> ModelConfig:
    return ModelConfig(**{**SMALL, **kw})


@pytest.mark.parametrize("name", VARIANTS)
def test_future_tokens_never_change_earlier_logits(name):
    torch.manual_seed(0)
    model = GPT(small(**VARIANTS[name]), seed=1).eval()
    for gate in (p for n, p in model.named_parameters() if "gate" in n):
        torch.nn.init.constant_(gate, 0.5)  # ReZero starts as the identity; open the gates to test attention
    idx = torch.randint(0, 97, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 97
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_alibi_slopes_follow_the_papers_geometric_sequence():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert torch.allclose(alibi_slopes(4), torch.tensor([2.0 ** (-2 * (i + 1)) for i in range(4)]))
    # 12 heads: the 8-head slopes, then every other slope of the 16-head sequence (2^-0.5, 2^-1.5, ...)
    expected = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(0.5 + i) for i in range(4)]
    assert torch.allclose(alibi_slopes(12), torch.tensor(expected))


@pytest.mark.parametrize("position", ["alibi", "rotary"])
def test_alibi_and_rotary_evaluate_beyond_the_training_context(position):
    model = GPT(small(position_embedding=position), seed=0).eval()
    idx = torch.randint(0, 97, (1, 48))  # three times seq_len
    logits = model(idx)
    assert logits.shape == (1, 48, 97) and torch.isfinite(logits).all()
    assert torch.allclose(model(idx[:, :20])[0], logits[0, :20], atol=1e-5)  # still causal, prefix unchanged


def test_learned_positions_refuse_a_longer_context():
    with pytest.raises(IndexError):
        GPT(small(), seed=0)(torch.randint(0, 97, (1, 17)))


def test_topk_attends_to_at_most_k_earlier_keys():
    attn = CausalSelfAttention(small(attention_topk=3)).eval()
    seen = {}
    attn.attn_drop.register_forward_hook(lambda mod, inp, out: seen.setdefault("p", inp[0]))
    attn(torch.randn(2, 16, 32))
    probs = seen["p"]  # (B, nh, T, T)
    nonzero = (probs > 0).sum(-1)
    assert (nonzero <= 3).all() and (nonzero[..., 3:] == 3).all()
    assert (probs.triu(diagonal=1) == 0).all()  # never a future key
    assert torch.allclose(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    seen.clear()  # equal keys (a repeated token), whose scores tie exactly: still k of them, not every tied one
    attn(torch.randn(1, 1, 32).expand(2, 16, 32))
    assert ((seen["p"] > 0).sum(-1)[..., 3:] == 3).all()


def test_the_explicit_score_path_stays_finite_in_fp16_where_the_fused_one_does():
    """q.k of 67,712 overflows fp16 (65,504) before the 1/sqrt(hd) scale brings it to 5,985: the
    scores were inf and the softmax NaN. Scaled first, as SDPA does, both paths stay finite."""
    x = torch.zeros(1, 4, 128, dtype=torch.float16)
    for extra in ({}, {"attention_topk": 64}, {"residual_attention": True}):
        attn = CausalSelfAttention(ModelConfig(vocab_size=61, seq_len=16, n_layer=1, n_head=1, n_embd=128,
                                               **extra)).eval()
        with torch.no_grad():
            attn.c_attn.weight.zero_()
            attn.c_attn.bias[:256] = 23.0  # q = k = 23 in each of 128 dimensions
            y = attn.half()(x)[0]
        assert torch.isfinite(y).all(), extra


def test_rezero_blocks_start_as_the_identity_with_two_gates():
    block = Block(small(norm="rezero"))
    gates = [n for n, _ in block.named_parameters() if "gate" in n]
    assert gates == ["gate_attn", "gate_mlp"]
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in block.modules())
    x = torch.randn(2, 16, 32)
    assert torch.equal(block(x), x)


def test_realformer_blocks_pass_scores_on():
    block = Block(small(residual_attention=True))
    x, scores = block(torch.randn(2, 16, 32))
    assert scores.shape == (2, 4, 16, 16) and torch.isfinite(scores).all()
    x2, scores2 = block((x, scores))
    assert not torch.allclose(scores2, block((x, torch.zeros_like(scores)))[1])


@pytest.mark.parametrize("kw,needle", [
    (dict(position_embedding="sinusoid"), "model.position_embedding"),
    (dict(residual="parallel", macaron=True), "model.macaron"),
    (dict(norm="batchnorm"), "model.norm"),
    (dict(attention_topk=0), "model.attention_topk"),
    (dict(position_embedding="rotary", n_embd=36, n_head=4), "even head size"),
])
def test_combinations_that_make_no_sense_are_rejected(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("tiny", kw)


def test_presets():
    big = load_config("gptx-1b").model
    assert (big.n_layer, big.n_embd, big.n_head, big.vocab_size, big.seq_len) == (20, 2048, 16, 22000, 1024)
    assert big.norm == "rezero" and big.attention_topk and not big.tie_embeddings
    assert load_config("gptx-1b").train.lr == 2e-4
    from tests.unit.test_config import unique_params
    assert abs(unique_params(load_config("gpt-star-127")) / 1e6 - 127) < 1
    assert abs(unique_params(load_config("gpt-star-303")) / 1e6 - 303) < 1


ITERS = 4


def variant_config(name: str, pipe: int):
    return load_config(None, dict(MICRO_MODEL, **VARIANTS[name], lr=3e-3, warmup_iters=1, train_iters=ITERS,
                                  pipe_parallel_size=pipe, partition_method="uniform"))


# Also trained with compiled blocks (dynamo, aot_eager) in the 2-stage launch: RealFormer's (x, scores)
# crossing the stage boundary, and Llama's blocks.
COMPILED_VARIANTS = ["star_like", "llama_like"]


@pytest.mark.parametrize("layout", ["checkpointing", "no-pipeline-zero3"])
def test_llama_blocks_train_the_same_with_checkpointing_and_without_the_pipeline(dist_world1, tmp_path, layout,
                                                                                monkeypatch):
    import dataclasses

    import gptx.parallel.pipeline
    calls = []
    original = gptx.parallel.pipeline.recompute_in_backward
    monkeypatch.setattr(gptx.parallel.pipeline, "recompute_in_backward", lambda fn, *a: calls.append(1) or original(fn, *a))
    from gptx.analysis.precision_check import train_trace
    from gptx.data.tokens import open_tokens
    tokens = open_tokens(make_token_dir(tmp_path / "data"), "train")
    base = variant_config("llama_like", pipe=1)
    ds = precision_ds("fp32")
    if layout == "checkpointing":
        other = dataclasses.replace(base, train=dataclasses.replace(base.train, activation_checkpoint_interval=1))
    else:
        other = dataclasses.replace(base, train=dataclasses.replace(base.train, pipe_parallel_size=0))
        ds = dict(ds, zero_optimization={"stage": 3})
    one = train_trace(base, precision_ds("fp32"), tokens, ITERS).losses
    two = train_trace(other, ds, tokens, ITERS).losses
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (one, two)
    assert bool(calls) == (layout == "checkpointing")  # the blocks really were recomputed
