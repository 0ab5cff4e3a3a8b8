"""Text generation from the single-device model, with a KV cache."""
from __future__ import annotations

import torch

from gptx.model.gpt import GPT


def _next_token(logits: torch.Tensor, greedy: bool, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> int:
    """Pick one token from (V,) logits."""
    if greedy or temperature == 0:
        return int(logits.argmax())
    logits = logits.float()
    # From the largest logit down, so a tiny temperature gives -inf, not inf - inf; rows that are
    # no token stay -inf at any temperature (-inf / inf would be NaN).
    logits = torch.where(logits == float("-inf"), logits, (logits - logits.max()) / temperature)
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: GPT, prompt: list[int], max_new_tokens: int, greedy: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_token: int | None = None, use_cache: bool = True, stop_when=None,
             vocabulary: int | None = None) -> list[int]:
    """The prompt followed by up to max_new_tokens new ids; stops after stop_token, or once
    `stop_when(ids)` is true (e.g. a stop string in the decoded text). Only ids below
    `vocabulary` are picked (a table padded by hand has rows that are no token).

    A model with learned positions sees at most its seq_len tokens: past that, each new
    token is predicted from the last seq_len (a sliding window, recomputed without the cache).
    """
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    ids = list(prompt)
    limit = model.cfg.seq_len if model.cfg.position_embedding == "learned" else None
    caches = model.new_caches() if use_cache else None
    pending = ids  # tokens the model has not seen yet
    for _ in range(max_new_tokens):
        if limit is not None and len(ids) >= limit:
            caches = None  # the window slides: positions restart at the new first token
        if caches is not None:
            logits = model(torch.tensor([pending], device=device), caches)[0, -1]
        else:
            context = ids[-limit:] if limit is not None else ids
            logits = model(torch.tensor([context], device=device))[0, -1]
        token = _next_token(logits[:vocabulary].cpu(), greedy, temperature, top_k, top_p, generator)
        ids.append(token)
        pending = [token]
        if token == stop_token or (stop_when is not None and stop_when(ids)):
            break
    return ids
