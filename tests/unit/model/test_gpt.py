import math

import torch

from gptx.config import ModelConfig
from gptx.model.gpt import GPT, lm_loss

CFG = ModelConfig(vocab_size=101, seq_len=16, n_layer=3, n_head=2, n_embd=24)


def test_future_tokens_do_not_change_earlier_logits():
    model = GPT(CFG, seed=0).eval()
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len))
    changed = idx.clone()
    changed[:, 9:] = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len - 9))
    a, b = model(idx), model(changed)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_init_is_gpt2s_and_depends_only_on_the_seed():
    a, b, c = GPT(CFG, seed=5), GPT(CFG, seed=5), GPT(CFG, seed=6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.layers["2"].attn.c_attn.weight, c.layers["2"].attn.c_attn.weight)
    big = GPT(ModelConfig(vocab_size=101, seq_len=16, n_layer=8, n_head=4, n_embd=256), seed=0)
    block = big.layers["2"]
    assert abs(block.mlp.c_fc.weight.std().item() - 0.02) < 0.001
    assert abs(block.mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(2 * 8)) < 0.0005
    assert torch.count_nonzero(block.attn.c_attn.bias) == 0


def test_tied_head_is_the_embedding_and_untied_head_is_not():
    tied = GPT(CFG, seed=0)
    assert sum(p.numel() for p in tied.parameters()) == sum(p.numel() for p in GPT(CFG, seed=0).parameters())
    x = torch.randn(1, 4, CFG.n_embd)
    head = tied._forward_fns[-1]
    assert torch.equal(head(x), x @ tied.layers["0"].wte.weight.T)
    untied = GPT(ModelConfig(**{**CFG.__dict__, "tie_embeddings": False}), seed=0)
    extra = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert extra == CFG.vocab_size * CFG.n_embd


def test_untrained_loss_is_near_log_vocab():
    model = GPT(CFG, seed=0)
    idx = torch.randint(0, CFG.vocab_size, (8, CFG.seq_len))
    labels = torch.randint(0, CFG.vocab_size, (8, CFG.seq_len))
    loss = lm_loss(model(idx), labels)
    assert abs(loss.item() - math.log(CFG.vocab_size)) < 0.2


def test_padded_vocabulary_computes_the_same_model():
    import dataclasses
    for tied in (True, False):
        cfg = dataclasses.replace(CFG, tie_embeddings=tied)
        plain = GPT(cfg, seed=0)
        padded = GPT(dataclasses.replace(cfg, pad_vocab_to_multiple=64), seed=0)
        assert padded.layers["0"].wte.weight.shape == (128, CFG.n_embd)  # 101 rounded up to 2 x 64
        with torch.no_grad():  # same weights in the real rows, noise in the padding rows
            for p, q in zip(padded.parameters(), plain.parameters()):
                if p.shape != q.shape:
                    p.normal_()
                p[:q.shape[0]].copy_(q)
        idx = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len))
        labels = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len))
        logits = padded(idx)
        assert logits.shape == (2, CFG.seq_len, 128)
        assert torch.equal(logits[..., :CFG.vocab_size], plain(idx))
        assert torch.all(logits[..., CFG.vocab_size:] == float("-inf"))  # never a token
        loss = lm_loss(logits, labels)
        assert torch.equal(loss, lm_loss(plain(idx), labels))
        loss.backward()
        table = padded.layers["0"].wte.weight if tied else padded.layers[str(len(padded.layers) - 1)].lm_head.weight
        assert table.grad[CFG.vocab_size:].abs().max() == 0 and table.grad[:CFG.vocab_size].abs().max() > 0
