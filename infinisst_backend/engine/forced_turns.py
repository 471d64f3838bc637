"""Forced turn lengths, for benchmarks with dummy weights only (docs/benchmarks.md "The workload").

Random weights never emit EOT, so a benchmark caps each turn at a length drawn from a fixed seeded
distribution: ``1 + Poisson(5m - 1)`` tokens, EOT included, at most ``10m`` (mean about 5 tokens per 0.96 s of
audio, about 2.5 words/s of speech). The engine takes it as ``Engine.turn_length_hook``; the Triton model sets
it from the ``benchmark_forced_turn_seed`` parameter. Never set in a real deployment.
"""

from __future__ import annotations

import threading

import numpy as np

from infinisst_backend.config import TOKENS_PER_UNIT

TOKENS_PER_UNIT_MEAN = 5.0  # forced turn length per 0.96 s of audio, EOT included


class TurnLengths:
    """Seeded forced turn lengths; ``draw(m, max_new_tokens)`` is an ``Engine.turn_length_hook``."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.count = 0
        self.total = 0
        self._lock = threading.Lock()

    @property
    def mean(self) -> float:
        """Mean drawn length so far (0 before the first draw)."""
        return self.total / self.count if self.count else 0.0

    def draw(self, m: int, max_new_tokens: int) -> int:
        with self._lock:
            n = 1 + int(self.rng.poisson(TOKENS_PER_UNIT_MEAN * m - 1))
            n = max(1, min(n, TOKENS_PER_UNIT * m, max_new_tokens))
            self.count += 1
            self.total += n
        return n
