"""The GPT's layers as plain PyTorch modules, in the order data flows through them.

Nothing here knows about pipelines or DeepSpeed: `gptx.model.gpt` lists these layers as
LayerSpecs and `gptx.parallel.pipeline` partitions them. Every layer takes one tensor and returns
one tensor, which is what a pipeline stage boundary can carry.

Shapes: B batch, T time (tokens), C n_embd, V vocabulary, nh heads, hd head size.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptx.config import ModelConfig

INIT_STD = 0.02  # GPT-2's initializer range


def _init_linear(linear: nn.Linear, std: float = INIT_STD) -> None:
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class TokenEmbedding(nn.Module):
    """Token ids -> vectors. When tied, the same table also produces the logits."""

    def __init__(self, vocab_size: int, n_embd: int, padded_vocab_size: int | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.wte = nn.Embedding(padded_vocab_size or vocab_size, n_embd)
        nn.init.normal_(self.wte.weight, mean=0.0, std=INIT_STD)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.wte(idx)  # (B, T) -> (B, T, C)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return vocab_logits(x, self.wte.weight, self.vocab_size)  # (B, T, C) -> (B, T, padded V)


def vocab_logits(x: torch.Tensor, weight: torch.Tensor, vocab_size: int, linear=F.linear) -> torch.Tensor:
    """x @ weight.T over the whole table, padding rows (pad_vocab_to_multiple) included: their
    aligned width is the point of padding. Padding rows are never tokens, so their logits are
    set to -inf: they take no probability, add nothing to the loss and get no gradient, and the
    loss reads the logits as they are, without a copy of the real columns: faster than cutting
    the real columns out after the matmul or multiplying only the real rows (docs/performance.md).
    `linear` is the matmul (a pipeline schedule may split its backward)."""
    logits = linear(x, weight)
    if weight.size(0) != vocab_size:
        # Outside autograd: recorded, its backward would copy the whole gradient to zero columns
        # whose gradient is zero anyway (the softmax gives them none).
        with torch.no_grad():
            logits[..., vocab_size:] = float("-inf")
    return logits


def tied_logits(embedding: TokenEmbedding, x: torch.Tensor) -> torch.Tensor:
    """The output head of a tied model: the input embedding's table, transposed."""
    return embedding.logits(x)


def tied_hidden_and_weight(embedding: TokenEmbedding, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tied head with the fused loss (gptx.model.fused_loss): the loss multiplies by the table itself,
    a chunk of positions at a time. The table goes through autograd, so its gradient reaches
    this copy and, through DeepSpeed's tied-gradient all-reduce, the first stage's."""
    return x, embedding.wte.weight


class PositionEmbedding(nn.Module):
    """Adds learned absolute positions, then embedding dropout."""

    def __init__(self, seq_len: int, n_embd: int, dropout: float = 0.0):
        super().__init__()
        self.wpe = nn.Embedding(seq_len, n_embd)
        nn.init.normal_(self.wpe.weight, mean=0.0, std=INIT_STD)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        T = x.size(1)
        pos = torch.arange(start, start + T, device=x.device)
        return self.drop(x + self.wpe(pos))  # (B, T, C) + (T, C)


class EmbeddingDropout(nn.Module):
    """Stands at position 1 when positions come from attention (ALiBi, rotary) or nowhere."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.drop(x)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022): a geometric sequence starting at 2^(-8/n).

    For a head count that is not a power of two, the paper takes the slopes of the nearest
    smaller power of two and fills the rest with every other slope of the next power up.
    """
    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]
    below = 2 ** math.floor(math.log2(n_head))
    slopes = geometric(below)
    if below < n_head:
        slopes += geometric(2 * below)[0::2][: n_head - below]
    return torch.tensor(slopes)


def alibi_bias(slopes: torch.Tensor, T: int, S: int | None = None) -> torch.Tensor:
    """(nh, T, S) additive bias for the last T of S positions: -slope * distance to each earlier key."""
    S = T if S is None else S
    keys = torch.arange(S, device=slopes.device)
    queries = torch.arange(S - T, S, device=slopes.device)
    distance = (keys[None, :] - queries[:, None]).clamp(max=0)  # (T, S), key - query, <= 0
    return slopes[:, None, None] * distance  # (nh, 1, 1) * (T, S)


def rotate(x: torch.Tensor, start: int = 0, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021) on (B, nh, T, hd) at positions start.., rotating halves of hd
    (the layout Hugging Face's Llama uses). Angles are computed in fp32 whatever x's dtype."""
    T, hd = x.size(-2), x.size(-1)
    inv_freq = 1.0 / base ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)  # (hd/2,)
    angles = torch.arange(start, start + T, device=x.device, dtype=torch.float32)[:, None] * inv_freq  # (T, hd/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / rms(x) * weight, no mean, no bias.
    The statistic is taken in fp32 so that fp16/bf16 activations normalize as fp32 ones do."""

    def __init__(self, n_embd: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The norm a block (and the final norm) uses; ReZero blocks have none but keep a final LayerNorm."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class KVCache:
    """Keys and values of the tokens seen so far, for generation one token at a time."""

    def __init__(self):
        self.k = self.v = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.size(2)

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)  # (B, nh, S, hd)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


def shared_kv_kernel(q: torch.Tensor, causal_only: bool) -> bool:
    """Whether scaled_dot_product_attention can read grouped keys and values in place (enable_gqa).
    On CUDA only its flash and math kernels can, and flash needs fp16/bf16 and no mask: elsewhere
    the math kernel would keep (B, nh, T, S) probabilities, so the caller repeats the key/value
    heads instead and lets the memory-efficient kernel run. The CPU kernels handle it in place."""
    return q.device.type != "cuda" or (q.dtype in (torch.float16, torch.bfloat16) and causal_only)


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention with the position and score variants.

    Fused scaled_dot_product_attention serves plain, ALiBi (as an additive mask) and rotary
    attention; explicit scores are computed only when a variant needs them: top-k sparse
    attention (Zhao et al. 2019) and RealFormer's residual attention (He et al. 2021), which
    adds the previous layer's pre-softmax scores and hands its own to the next layer.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C = cfg.n_embd
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.position = cfg.position_embedding
        self.rope_theta = cfg.rope_theta
        self.topk = cfg.attention_topk
        self.residual_attention = cfg.residual_attention
        # Queries, then keys and values for n_kv_head heads each (fewer than n_head: grouped-query).
        self.c_attn = nn.Linear(C, C + 2 * self.n_kv_head * self.head_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(C, C, bias=cfg.bias)
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.resid_drop = nn.Dropout(cfg.dropout)
        if self.position == "alibi":
            self.register_buffer("slopes", alibi_slopes(cfg.n_head), persistent=False)
        _init_linear(self.c_attn)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), two per block.
        _init_linear(self.c_proj, INIT_STD / math.sqrt(2 * cfg.n_layer))

    def forward(self, x: torch.Tensor, prev_scores: torch.Tensor | None = None, cache: KVCache | None = None):
        B, T, C = x.size()
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        start = cache.length if cache is not None else 0  # tokens already seen (generation)
        q, k, v = self.c_attn(x).split([C, nkv * hd, nkv * hd], dim=2)
        q = q.view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        if self.position == "rotary":
            q, k = rotate(q, start, self.rope_theta), rotate(k, start, self.rope_theta)
        if cache is not None:
            k, v = cache.extend(k, v)  # (B, nkv, start + T, hd): the cache keeps only the kv heads
        S = k.size(2)
        grouped = nkv != nh  # query head i reads key/value head i // (nh / nkv)
        # Query i sits at position start + i and may see keys 0 .. start + i.
        allowed = torch.arange(S, device=x.device)[None, :] <= torch.arange(start, S, device=x.device)[:, None]
        bias = alibi_bias(self.slopes, T, S).to(q.dtype) if self.position == "alibi" else None  # (nh, T, S)
        scores = None
        fused = self.topk is None and not self.residual_attention
        if grouped and not (fused and shared_kv_kernel(q, bias is None and start == 0)):
            k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)  # (B, nh, S, hd)
            grouped = False
        if fused:
            p = self.dropout if self.training else 0.0
            if bias is None and start == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, enable_gqa=grouped)
            elif bias is None:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p, enable_gqa=grouped)
            else:
                mask = bias.masked_fill(~allowed, float("-inf"))  # (nh, T, S)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=grouped)
        else:
            # Scaled before the product, as the fused path does: a 16-bit q.k can pass 65504 where
            # q.k / sqrt(hd) does not.
            scores = (q * (1.0 / math.sqrt(k.size(-1)))) @ k.transpose(-2, -1)  # (B, nh, T, S)
            if prev_scores is not None:
                scores = scores + prev_scores
            logits = scores if bias is None else scores + bias
            logits = logits.masked_fill(~allowed, float("-inf"))
            if self.topk is not None and self.topk < S:
                # Keep exactly each query's k largest allowed scores (ties at the k-th broken by topk, not all
                # kept: equal keys, as repeated tokens give, tie exactly); rows with fewer allowed keys keep all.
                keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(self.topk, dim=-1).indices,
                                                                          True)  # (B, nh, T, S)
                logits = logits.masked_fill(~keep, float("-inf"))
            att = self.attn_drop(F.softmax(logits.float(), dim=-1).to(v.dtype))
            y = att @ v  # (B, nh, T, S) x (B, nh, S, hd) -> (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hd) -> (B, T, C)
        return self.resid_drop(self.c_proj(y)), (scores if self.residual_attention else None)


class MLP(nn.Module):
    """GPT-2's MLP, c_proj(gelu(c_fc(x))), or SwiGLU (Shazeer 2020), c_proj(silu(gate) * up), whose
    gate and up projections are one matmul: c_fc's first H outputs are the gate, the next H up."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, H = cfg.n_embd, cfg.ffn_hidden
        self.swiglu = cfg.mlp == "swiglu"
        self.c_fc = nn.Linear(C, 2 * H if self.swiglu else H, bias=cfg.bias)
        self.c_proj = nn.Linear(H, C, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        _init_linear(self.c_fc)
        _init_linear(self.c_proj, INIT_STD / math.sqrt(2 * cfg.n_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2 uses the tanh approximation
        return self.drop(self.c_proj(h))


class Block(nn.Module):
    """A decoder block. The default is GPT-2's: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    Variants: parallel residual (GPT-J: x + attn(ln_1(x)) + mlp(ln_1(x)), one shared norm),
    ReZero (no norms; each branch is multiplied by a learned scalar gate that starts at 0),
    Macaron (a half-step feed-forward, mlp_0, before attention and a half-step mlp after).
    With residual attention the block takes and returns (x, scores), so the scores cross
    stage boundaries together with x.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.parallel = cfg.residual == "parallel"
        self.macaron = cfg.macaron
        self.residual_attention = cfg.residual_attention
        rezero = cfg.norm == "rezero"

        def norm() -> nn.Module:
            return nn.Identity() if rezero else make_norm(cfg)

        def gate() -> nn.Parameter | None:
            return nn.Parameter(torch.zeros(1)) if rezero else None

        if self.macaron:
            self.ln_0, self.mlp_0, self.gate_mlp_0 = norm(), MLP(cfg), gate()
        self.ln_1, self.attn, self.gate_attn = norm(), CausalSelfAttention(cfg), gate()
        if not self.parallel:
            self.ln_2 = norm()
        self.mlp, self.gate_mlp = MLP(cfg), gate()

    @staticmethod
    def _gated(gate: nn.Parameter | None, y: torch.Tensor) -> torch.Tensor:
        return y if gate is None else gate * y

    def forward(self, inputs, cache: KVCache | None = None):
        x, prev_scores = inputs if isinstance(inputs, tuple) else (inputs, None)
        half = 0.5 if self.macaron else 1.0
        if self.macaron:
            x = x + half * self._gated(self.gate_mlp_0, self.mlp_0(self.ln_0(x)))
        h = self.ln_1(x)
        a, scores = self.attn(h, prev_scores, cache)
        if self.parallel:
            x = x + self._gated(self.gate_attn, a) + self._gated(self.gate_mlp, self.mlp(h))
        else:
            x = x + self._gated(self.gate_attn, a)
            x = x + half * self._gated(self.gate_mlp, self.mlp(self.ln_2(x)))
        return (x, scores) if self.residual_attention else x


class FinalNorm(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_f = make_norm(cfg)

    def forward(self, x) -> torch.Tensor:
        if isinstance(x, tuple):  # (x, scores) from residual-attention blocks: scores end here
            x = x[0]
        return self.ln_f(x)


class LMHead(nn.Module):
    """The untied output head (GPT-2's lm_head has no bias). With `fused` (gptx.model.fused_loss) it
    returns (x, its weight) and the loss does the multiplication, a chunk of positions at a time;
    the parameter and its name are the same either way, so checkpoints do not depend on it."""

    def __init__(self, n_embd: int, vocab_size: int, padded_vocab_size: int | None = None, fused: bool = False):
        super().__init__()
        self.vocab_size = vocab_size
        self.fused = fused
        self.lm_head = nn.Linear(n_embd, padded_vocab_size or vocab_size, bias=False)
        _init_linear(self.lm_head)
        self.linear = F.linear  # the matmul of the unfused head (gptx.parallel.zero_bubble may replace it)

    def forward(self, x: torch.Tensor):
        if self.fused:
            return x, self.lm_head.weight
        return vocab_logits(x, self.lm_head.weight, self.vocab_size, self.linear)  # (B, T, C) -> (B, T, padded V)
