"""The Llama-style layers: grouped-query attention, RMSNorm, SwiGLU."""
import pytest
import torch

from gptx.config import ModelConfig
from gptx.model.layers import MLP, Block, CausalSelfAttention, RMSNorm
from gptx.presets import LLAMA_BLOCK

SMALL = dict(vocab_size=97, seq_len=16, n_layer=2, n_head=4, n_embd=32)


@pytest.mark.parametrize("position", ["learned", "rotary", "alibi"])
@pytest.mark.parametrize("kv", [1, 2])
@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("in_place", [True, False])
def test_grouped_query_attention_is_multi_head_attention_with_shared_keys_and_values(kv, position, explicit,
                                                                                     in_place, monkeypatch):
    """Query head i reads key/value head i // (n_head / n_kv_head): the same as multi-head attention
    whose key and value weights repeat each group's rows; whether the kernel reads the groups in
    place (enable_gqa) or the heads are repeated first (as on GPUs where it cannot)."""
    import gptx.model.layers
    if not in_place:
        monkeypatch.setattr(gptx.model.layers, "shared_kv_kernel", lambda q, causal_only: False)
    extra = dict(attention_topk=16) if explicit else {}  # top-16 of 16 keys: the explicit score path, same math
    gqa = CausalSelfAttention(ModelConfig(**SMALL, n_kv_head=kv, position_embedding=position, **extra)).eval()
    mha = CausalSelfAttention(ModelConfig(**SMALL, position_embedding=position, **extra)).eval()
    C, hd, group = 32, 8, 4 // kv
    q, k, v = gqa.c_attn.weight.split([C, kv * hd, kv * hd])
    bq, bk, bv = gqa.c_attn.bias.split([C, kv * hd, kv * hd])

    def repeat(t):  # (kv * hd, ...) -> (n_head * hd, ...), each kv head's rows once per query head in its group
        return t.view(kv, hd, *t.shape[1:]).repeat_interleave(group, dim=0).reshape(4 * hd, *t.shape[1:])
    with torch.no_grad():
        gqa.c_attn.bias.normal_()  # biases start at 0: make them count
        mha.c_attn.weight.copy_(torch.cat([q, repeat(k), repeat(v)]))
        mha.c_attn.bias.copy_(torch.cat([bq, repeat(bk), repeat(bv)]))
        mha.c_proj.load_state_dict(gqa.c_proj.state_dict())
        x = torch.randn(2, 16, C)
        assert torch.allclose(gqa(x)[0], mha(x)[0], atol=1e-6)
    assert gqa.c_attn.weight.shape == (C + 2 * kv * hd, C)


def test_rmsnorm_divides_by_the_root_mean_square_in_fp32():
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.tensor([[3.0, -4.0, 0.0, 0.0, 1.0, 1.0, -1.0, 2.0]])  # mean square 32 / 8 = 4, rms 2
    assert torch.allclose(norm(x), x / (4.0 + 1e-5) ** 0.5 * torch.arange(1.0, 9.0))
    big = torch.full((1, 8), 300.0, dtype=torch.float16)  # 300^2 overflows fp16: the mean square must be fp32
    out = norm.half()(big)  # as under fp16 training: the module is fp16 too
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert torch.allclose(out.float(), torch.arange(1.0, 9.0)[None], atol=1e-2)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in Block(ModelConfig(**SMALL, **LLAMA_BLOCK)).modules())


def test_swiglu_gates_the_up_projection_with_silu_of_the_first_half():
    mlp = MLP(ModelConfig(**SMALL, mlp="swiglu", ffn_hidden_size=12))
    with torch.no_grad():  # biases start at 0: make a swapped gate/up bias show
        mlp.c_fc.bias.normal_()
        mlp.c_proj.bias.normal_()
    assert mlp.c_fc.weight.shape == (24, 32) and mlp.c_proj.weight.shape == (32, 12)
    x = torch.randn(3, 32)
    w_gate, w_up = mlp.c_fc.weight[:12], mlp.c_fc.weight[12:]
    b_gate, b_up = mlp.c_fc.bias[:12], mlp.c_fc.bias[12:]
    gate = x @ w_gate.T + b_gate
    hidden = gate * torch.sigmoid(gate) * (x @ w_up.T + b_up)  # silu(g) = g sigmoid(g)
    assert torch.allclose(mlp(x), hidden @ mlp.c_proj.weight.T + mlp.c_proj.bias, atol=1e-6)


def test_bias_false_leaves_no_bias_anywhere_in_a_llama_block():
    block = Block(ModelConfig(**SMALL, **LLAMA_BLOCK, n_kv_head=2))
    assert not [n for n, _ in block.named_parameters() if "bias" in n]
    assert sorted(n for n, _ in block.named_parameters()) == [
        "attn.c_attn.weight", "attn.c_proj.weight", "ln_1.weight", "ln_2.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
