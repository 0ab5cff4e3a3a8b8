"""FLOPs per token against the weights the layers really hold."""
import pytest
import torch

from gptx.config import ModelConfig
from gptx.model.flops import block_matmul_params, flops_per_token
from gptx.model.layers import Block
from gptx.presets import LLAMA_BLOCK

SHAPE = dict(vocab_size=97, seq_len=64, n_layer=2, n_head=8, n_embd=64)


@pytest.mark.parametrize("keys", [{}, dict(macaron=True), dict(mlp="swiglu"), dict(n_kv_head=2), dict(n_kv_head=1),
                                  dict(LLAMA_BLOCK, n_kv_head=4, ffn_hidden_size=100), dict(ffn_hidden_size=96)])
def test_block_matmul_params_are_the_blocks_matrix_weights(keys):
    cfg = ModelConfig(**SHAPE, **keys)
    with torch.device("meta"):
        block = Block(cfg)
    matrices = sum(p.numel() for p in block.parameters() if p.dim() == 2)
    assert block_matmul_params(cfg) == matrices


def test_grouped_query_attention_saves_projection_flops_not_score_flops():
    mha, mqa = ModelConfig(**SHAPE), ModelConfig(**SHAPE, n_kv_head=1)
    C, hd, L = 64, 8, 2
    # 6 FLOPs per weight per token: MQA drops 2 x C x (C - hd) key/value weights per block.
    assert flops_per_token(mha) - flops_per_token(mqa) == 6 * L * 2 * C * (C - hd)
