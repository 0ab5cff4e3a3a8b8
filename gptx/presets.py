"""Named models: the published shapes of GPT-2, GPT-3, Llama and the variants, plus `tiny` for CPUs.

A preset holds model keys plus an optional "train" mapping; gptx.config layers a YAML file and
the command line over it."""
from __future__ import annotations

from typing import Any

GPT3_CONTEXT = 2048
# GPT-2's 50,257 tokens as a table of 50,304 rows (nanoGPT's): an unaligned row count slows the
# head's matmuls. The loss and every tool keep the 50,257 real tokens. Not `tiny`, whose quickstart
# numbers the README states, nor the presets of other tokenizers.
GPT2_PAD = dict(pad_vocab_to_multiple=64)
LLAMA_BLOCK = dict(norm="rmsnorm", mlp="swiglu", position_embedding="rotary", bias=False)
PRESETS: dict[str, dict[str, Any]] = {
    # Small enough to train in a few minutes on 2 CPU cores.
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, seq_len=64,
                 train=dict(lr=2e-3, warmup_iters=10, train_iters=150, eval_interval=50, log_interval=10)),
    # GPT-2 (Radford et al. 2019), the published shapes.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, **GPT2_PAD),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, **GPT2_PAD),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, **GPT2_PAD),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, **GPT2_PAD),
    # GPT-3 (Brown et al. 2020), table 2.1, with its learning rates. Two rows of the table
    # do not divide: 1.3B lists 24 heads of 128 for d_model 2048 (we keep head size 128,
    # so 16 heads), and 13B lists d_model 5140 with 40 heads of 128 (we use 5120 = 40 x 128).
    "gpt3-125m": dict(n_layer=12, n_head=12, n_embd=768, seq_len=GPT3_CONTEXT, train=dict(lr=6e-4), **GPT2_PAD),
    "gpt3-350m": dict(n_layer=24, n_head=16, n_embd=1024, seq_len=GPT3_CONTEXT, train=dict(lr=3e-4), **GPT2_PAD),
    "gpt3-760m": dict(n_layer=24, n_head=16, n_embd=1536, seq_len=GPT3_CONTEXT, train=dict(lr=2.5e-4), **GPT2_PAD),
    "gpt3-1.3b": dict(n_layer=24, n_head=16, n_embd=2048, seq_len=GPT3_CONTEXT, train=dict(lr=2e-4), **GPT2_PAD),
    "gpt3-2.7b": dict(n_layer=32, n_head=32, n_embd=2560, seq_len=GPT3_CONTEXT, train=dict(lr=1.6e-4), **GPT2_PAD),
    "gpt3-6.7b": dict(n_layer=32, n_head=32, n_embd=4096, seq_len=GPT3_CONTEXT, train=dict(lr=1.2e-4), **GPT2_PAD),
    "gpt3-13b": dict(n_layer=40, n_head=40, n_embd=5120, seq_len=GPT3_CONTEXT, train=dict(lr=1e-4), **GPT2_PAD),
    "gpt3-175b": dict(n_layer=96, n_head=96, n_embd=12288, seq_len=GPT3_CONTEXT, train=dict(lr=6e-5), **GPT2_PAD),
    # GPT-X 1B: ReZero blocks (no norms inside, two learned gates each) with explicit sparse
    # top-k attention (k = 8, the value Zhao et al. found best), learned positions, an
    # untied bias-free head, a final LayerNorm.
    "gptx-1b": dict(n_layer=20, n_head=16, n_embd=2048, vocab_size=22000, seq_len=1024, norm="rezero",
                    attention_topk=8, position_embedding="learned", tie_embeddings=False, train=dict(lr=2e-4)),
    # GPT* models: ALiBi and parallel residual, trained at 512 context. 127M parameters with
    # GPT-2's vocabulary and tied embeddings: 6 x 12.6M in blocks + 51.5M in the embedding.
    # The 303M model keeps the width and heads and grows depth to 20 layers, which lands on
    # 303M (20 x 12.6M + 51.5M); width is what the 127M model's scaling keeps fixed.
    "gpt-star-127": dict(n_layer=6, n_head=8, n_embd=1024, seq_len=512, position_embedding="alibi",
                         residual="parallel", **GPT2_PAD),
    "gpt-star-303": dict(n_layer=20, n_head=8, n_embd=1024, seq_len=512, position_embedding="alibi",
                         residual="parallel", **GPT2_PAD),
    # Llama-style blocks (RMSNorm, SwiGLU, grouped-query attention, rotary, no biases). The small one
    # keeps GPT-2 small's width, heads and vocabulary, with 4 key/value heads and 14 layers: 126.7M.
    "llama-style-125m": dict(n_layer=14, n_head=12, n_kv_head=4, n_embd=768, **LLAMA_BLOCK,
                             train=dict(lr=6e-4), **GPT2_PAD),
    # Published shapes, with their 32,000-token SentencePiece vocabulary and untied heads:
    # TinyLlama 1.1B (Zhang et al. 2024) and Llama 2 7B (Touvron et al. 2023).
    "tinyllama-1.1b": dict(n_layer=22, n_head=32, n_kv_head=4, n_embd=2048, vocab_size=32000, seq_len=2048,
                           **LLAMA_BLOCK, tie_embeddings=False, train=dict(lr=4e-4)),
    "llama2-7b": dict(n_layer=32, n_head=32, n_embd=4096, vocab_size=32000, seq_len=4096, **LLAMA_BLOCK,
                      tie_embeddings=False, train=dict(lr=3e-4)),
}
DEFAULT_PRESET = "tiny"
