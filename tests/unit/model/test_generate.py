import pytest
import torch

from gptx.analysis.variants import VARIANTS
from gptx.config import ModelConfig
from gptx.model.generate import generate
from gptx.model.gpt import GPT
from gptx.presets import LLAMA_BLOCK

SMALL = dict(vocab_size=97, seq_len=32, n_layer=3, n_head=4, n_embd=32)


CASES = dict(VARIANTS)
CASES.update({f"llama_kv{kv}": dict(LLAMA_BLOCK, n_kv_head=kv) for kv in (1, 2, 4)})  # MQA, GQA, MHA


@pytest.mark.parametrize("name", CASES)
def test_cached_generation_equals_full_recomputation(name):
    model = GPT(ModelConfig(**{**SMALL, **CASES[name]}), seed=0)
    for gate in (p for n, p in model.named_parameters() if "gate" in n):
        torch.nn.init.constant_(gate, 0.5)
    prompt = [5, 17, 3, 44]
    fast = generate(model, prompt, 20, greedy=True, use_cache=True)
    slow = generate(model, prompt, 20, greedy=True, use_cache=False)
    assert fast == slow and fast[:4] == prompt and len(fast) == 24
    # and the cached logits themselves match
    caches = model.new_caches()
    ids = torch.tensor([fast])
    step = torch.cat([model(ids[:, :10], caches)] + [model(ids[:, i:i + 1], caches) for i in range(10, 24)], dim=1)
    assert torch.allclose(step, model(ids), atol=1e-5)
    kv_heads = model.cfg.kv_heads  # the cache keeps only the key/value heads
    assert caches[0].k.shape == (1, kv_heads, 24, model.cfg.head_dim)


def test_sampling_is_seeded_and_stops_at_the_stop_token():
    model = GPT(ModelConfig(**SMALL), seed=0)
    a = generate(model, [1, 2], 15, temperature=1.0, top_k=10, top_p=0.9, seed=3)
    b = generate(model, [1, 2], 15, temperature=1.0, top_k=10, top_p=0.9, seed=3)
    assert a == b
    stop = a[2]  # the first token sampled becomes the stop token
    assert generate(model, [1, 2], 15, temperature=1.0, top_k=10, top_p=0.9, seed=3, stop_token=stop) == [1, 2, stop]


@pytest.mark.parametrize("use_cache", [True, False])
def test_past_the_context_learned_positions_slide_over_the_last_seq_len_tokens(use_cache):
    model = GPT(ModelConfig(**SMALL), seed=0).eval()
    prompt = list(range(1, 31))
    ids = generate(model, prompt, 10, greedy=True, use_cache=use_cache)
    assert len(ids) == 40 and ids[:30] == prompt
    with torch.no_grad():
        for n in range(30, 40):  # each new token is the argmax given at most the 32 before it
            context = torch.tensor([ids[max(0, n - 32):n]])
            assert ids[n] == int(model(context)[0, -1].argmax()), n


def boosted(cfg: ModelConfig, row: int) -> GPT:
    """A model whose every prediction is `row` by far: the final norm's output leans on a bias that
    row's (tied) embedding points along."""
    model = GPT(cfg, seed=0)
    with torch.no_grad():
        model.layers[str(2 + cfg.n_layer)].ln_f.bias.fill_(10.0)
        model.layers["0"].wte.weight[row] = 1.0
    return model


@pytest.mark.parametrize("how", [dict(greedy=True), dict(temperature=1.0, top_k=5), dict(temperature=1e-45),
                                 dict(temperature=float("inf"), top_p=0.5)])
def test_rows_past_the_vocabulary_are_never_picked_at_any_temperature(how):
    model = boosted(ModelConfig(**SMALL), row=96)  # a table padded by hand: 96 is no token
    assert set(generate(model, [1], 6, greedy=True)[1:]) == {96}
    ids = generate(model, [1], 6, seed=0, vocabulary=96, **how)[1:]
    assert len(ids) == 6 and max(ids) < 96
    if how.get("temperature") == 1e-45:  # all but the largest logit at -inf: greedy, not NaN
        assert ids == generate(model, [1], 6, greedy=True, vocabulary=96)[1:]
    # gptx's own padding (-inf columns) stays out at an infinite temperature too
    padded = GPT(ModelConfig(**SMALL, pad_vocab_to_multiple=64), seed=0)
    assert max(generate(padded, [1], 6, seed=0, temperature=float("inf"))[1:]) < SMALL["vocab_size"]
