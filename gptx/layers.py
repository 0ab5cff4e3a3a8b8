"""The GPT's layers as plain PyTorch modules, in the order data flows through them.

Nothing here knows about pipelines or DeepSpeed: `gptx.model` lists these layers as
LayerSpecs and `gptx.pipeline` partitions them. Every layer takes one tensor and returns
one tensor, which is what a pipeline stage boundary can carry.

Shapes: B batch, T time (tokens), C n_embd, V vocabulary, nh heads, hd head size.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

INIT_STD = 0.02  # GPT-2's initializer range


def _init_linear(linear: nn.Linear, std: float = INIT_STD) -> None:
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class TokenEmbedding(nn.Module):
    """Token ids -> vectors. When tied, the same table also produces the logits."""

    def __init__(self, vocab_size: int, n_embd: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        nn.init.normal_(self.wte.weight, mean=0.0, std=INIT_STD)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.wte(idx)  # (B, T) -> (B, T, C)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.wte.weight)  # (B, T, C) -> (B, T, V)


def tied_logits(embedding: TokenEmbedding, x: torch.Tensor) -> torch.Tensor:
    """The output head of a tied model: the input embedding's table, transposed."""
    return embedding.logits(x)


class PositionEmbedding(nn.Module):
    """Adds learned absolute positions, then embedding dropout."""

    def __init__(self, seq_len: int, n_embd: int, dropout: float = 0.0):
        super().__init__()
        self.wpe = nn.Embedding(seq_len, n_embd)
        nn.init.normal_(self.wpe.weight, mean=0.0, std=INIT_STD)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.size(1)
        pos = torch.arange(T, device=x.device)
        return self.drop(x + self.wpe(pos))  # (B, T, C) + (T, C)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, n_layer: int, dropout: float, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_drop = nn.Dropout(dropout)
        _init_linear(self.c_attn)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), two per block.
        _init_linear(self.c_proj, INIT_STD / math.sqrt(2 * n_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hd) -> (B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, n_layer: int, dropout: float, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)
        _init_linear(self.c_fc)
        _init_linear(self.c_proj, INIT_STD / math.sqrt(2 * n_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU.
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm decoder block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, n_layer: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, n_layer, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, n_layer, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class FinalNorm(nn.Module):
    def __init__(self, n_embd: int, bias: bool = True):
        super().__init__()
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(x)


class LMHead(nn.Module):
    """The untied output head (GPT-2's lm_head has no bias)."""

    def __init__(self, n_embd: int, vocab_size: int):
        super().__init__()
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        _init_linear(self.lm_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)  # (B, T, C) -> (B, T, V)
