"""The GPT as a flat list of LayerSpecs, its loss, and the same layers as one nn.Module.

The list is a file format: a pipeline checkpoint holds one file per position in it
(`layer_XX-model_states.pt`), so keep the order stable. Today it is

    0            TokenEmbedding     (tied with the head when tie_embeddings)
    1            PositionEmbedding  (EmbeddingDropout when positions are ALiBi, rotary or none)
    2 .. L+1     Block x n_layer
    L+2          FinalNorm
    L+3          head: the tied TokenEmbedding's logits, or LMHead

Each spec carries its own init seed (base seed + its position), so a layer's initial
weights do not depend on which stage builds it: 1, 2 or 8 stages start identical.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec

from gptx.config import ModelConfig
from gptx.config_checks import n_pipeline_layers
from gptx.model.layers import (Block, EmbeddingDropout, FinalNorm, KVCache, LMHead, PositionEmbedding, TokenEmbedding,
                               tied_hidden_and_weight, tied_logits)

EMBEDDING_KEY = "embed"


class _SeededBuild:
    """build() draws the layer's init from its own seed, leaving the global RNG alone.

    Stands in for PipelineModule(seed_layers=True), which crashes on DeepSpeed 0.19.8 with
    Python 3.11 (it hands random.seed a numpy integer).
    """

    seed: int

    def build(self, log=False):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return super().build(log=log)


class SeededLayerSpec(_SeededBuild, LayerSpec):
    def __init__(self, seed: int, typename, *args, **kwargs):
        super().__init__(typename, *args, **kwargs)
        self.seed = seed


class SeededTiedLayerSpec(_SeededBuild, TiedLayerSpec):
    def __init__(self, seed: int, key, typename, *args, **kwargs):
        super().__init__(key, typename, *args, **kwargs)
        self.seed = seed


def layer_specs(cfg: ModelConfig, seed: int, fused_loss: bool = False) -> list[LayerSpec]:
    """`fused_loss`: the head returns (hidden, weight) for gptx.model.fused_loss instead of logits (same
    parameters, same files). Only the training engines ask for it (train.fused_loss)."""
    C, V, P = cfg.n_embd, cfg.vocab_size, cfg.padded_vocab_size
    if cfg.tie_embeddings:
        embed = SeededTiedLayerSpec(seed, EMBEDDING_KEY, TokenEmbedding, V, C, P, tied_weight_attr="wte.weight")
    else:
        embed = SeededLayerSpec(seed, TokenEmbedding, V, C, P)
    if cfg.position_embedding == "learned":
        positions = SeededLayerSpec(seed + 1, PositionEmbedding, cfg.seq_len, C, cfg.dropout)
    else:  # positions come from attention (or nowhere); keep the slot so indices stay put
        positions = SeededLayerSpec(seed + 1, EmbeddingDropout, cfg.dropout)
    specs: list[LayerSpec] = [embed, positions]
    for i in range(cfg.n_layer):
        specs.append(SeededLayerSpec(seed + 2 + i, Block, cfg))
    specs.append(SeededLayerSpec(seed + 2 + cfg.n_layer, FinalNorm, cfg))
    if cfg.tie_embeddings:
        # Same seed as position 0: both copies start equal even before DeepSpeed broadcasts.
        specs.append(SeededTiedLayerSpec(seed, EMBEDDING_KEY, TokenEmbedding, V, C, P,
                                         forward_fn=tied_hidden_and_weight if fused_loss else tied_logits,
                                         tied_weight_attr="wte.weight"))
    elif fused_loss:
        specs.append(SeededLayerSpec(seed + 3 + cfg.n_layer, LMHead, C, V, P, fused=True))
    else:
        specs.append(SeededLayerSpec(seed + 3 + cfg.n_layer, LMHead, C, V, P))
    assert len(specs) == n_pipeline_layers(cfg)
    return specs


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over all B*T positions, computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())  # (B*T, V), (B*T,)


class GPT(nn.Module):
    """The pipeline's layers assembled on one device, for tests, sampling and export.

    Its submodules are named by their position in the spec list ("layers.3" is spec 3),
    so a pipeline checkpoint's layer_03 file loads into `layers["3"]`.
    """

    def __init__(self, cfg: ModelConfig, seed: int = 1234):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleDict()
        self._forward_fns = []
        tied: dict[str, nn.Module] = {}
        for idx, spec in enumerate(layer_specs(cfg, seed)):
            if isinstance(spec, TiedLayerSpec):
                if spec.key not in tied:
                    tied[spec.key] = spec.build()
                    self.layers[str(idx)] = tied[spec.key]
                module = tied[spec.key]
                self._forward_fns.append(module if spec.forward_fn is None else partial(spec.forward_fn, module))
            else:
                self.layers[str(idx)] = spec.build()
                self._forward_fns.append(self.layers[str(idx)])

    def forward(self, idx: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, V) logits, V the table's rows: with pad_vocab_to_multiple the
        padding columns are there, at -inf. With `caches` (one per block, from new_caches()),
        idx holds only the tokens after those already cached."""
        if caches is None:
            x = idx
            for fn in self._forward_fns:
                x = fn(x)
            return x
        start = caches[0].length
        x = self._forward_fns[0](idx)
        x = self._forward_fns[1](x, start=start)
        blocks = self._forward_fns[2:2 + self.cfg.n_layer]
        for block, cache in zip(blocks, caches):
            x = block(x, cache=cache)
        for fn in self._forward_fns[2 + self.cfg.n_layer:]:
            x = fn(x)
        return x

    def head(self) -> nn.Module:
        """The module whose table makes the logits: the embedding when tied."""
        return self.layers["0"] if self.cfg.tie_embeddings else self.layers[str(len(self._forward_fns) - 1)]

    def new_caches(self) -> list[KVCache]:
        return [KVCache() for _ in range(self.cfg.n_layer)]
