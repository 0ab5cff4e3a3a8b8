"""Which source each sample of a mixture comes from (the rule is in gptx/data/mixture.py's docstring)."""
from __future__ import annotations

import math

import numpy as np

PERIOD = 10_000
"""Samples per block; weights are realised to 1/PERIOD."""


def quotas(weights: list[float], period: int = PERIOD) -> list[int]:
    """Samples of each source per block: shares of `period` rounded by largest remainders.
    The weights need not sum to 1 (they are divided by their sum; read_mixture checks them)."""
    total = sum(weights)
    if not math.isfinite(total):  # weights like 1e308: by the largest first
        weights = [w / max(weights) for w in weights]
        total = sum(weights)
    # Weights that sum to 1 (a mixture file's) are taken as they are: these quotas decide which
    # sample is which, and a checkpoint's consumed samples must keep meaning the same ones.
    exact = [w * period if math.isclose(total, 1.0, rel_tol=1e-12) else w / total * period for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:period - sum(counts)]:
        counts[i] += 1
    return counts


class Blend:
    """Global sample index -> (source, index of the sample within that source)."""

    def __init__(self, weights: list[float], seed: int, period: int = PERIOD):
        self.seed = seed
        self.quotas = quotas(weights, period) if len(weights) > 1 else [period]
        self.period = period
        self._block, self._order = -1, None

    def locate(self, sample: int) -> tuple[int, int]:
        if len(self.quotas) == 1:
            return 0, sample
        block, offset = divmod(sample, self.period)
        if block != self._block:
            deck = np.repeat(np.arange(len(self.quotas)), self.quotas)
            self._order = np.random.default_rng([self.seed, block, 7]).permutation(deck)
            self._block = block
        source = int(self._order[offset])
        return source, block * self.quotas[source] + int(np.count_nonzero(self._order[:offset] == source))
