"""A stand-in for ``training.data``: random audio and fixed turn texts, for tests and smoke runs (``--fake-data``).

Its utterances are the data pipeline's (:class:`training.data.utterances.Utterance`), made of noise and fixed word
lists instead of synthesised speech; their turn targets come from :func:`training.data.trajectories.turn_targets`
like the real ones' (re-exported here as :func:`turn_targets`).
"""

from __future__ import annotations

import numpy as np
import torch

from infinisst_backend.config import SAMPLE_RATE
from training.data.trajectories import turn_targets
from training.data.utterances import Sentence, Utterance

__all__ = ["FakeDataset", "make_utterance", "turn_targets"]

_WORDS = {
    "en": "the cat sat on a mat and the dog ran to the park".split(),
    "es": "el gato se sentó en una alfombra y el perro corrió al parque".split(),
    "de": "die katze saß auf einer matte und der hund lief in den park".split(),
}


def make_utterance(rng: np.random.Generator, index: int, seconds: float, split: str = "train") -> Utterance:
    """Speech-like noise of ``seconds`` and one sentence per language, words spread evenly over the audio."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    audio = np.clip(tone + 0.05 * rng.standard_normal(n), -1, 1).astype(np.float32)
    count = max(2, int(seconds * 2.5))
    texts = {lang: " ".join(words[(index + i) % len(words)] for i in range(count)) for lang, words in _WORDS.items()}
    ends = [float(seconds * (i + 1) / (count + 1)) for i in range(count)]
    sentence = Sentence(texts["en"], texts["es"], texts["de"] if index % 2 == 0 else None, 0.0, seconds, ends)
    return Utterance(f"fake-{split}-{index}", audio, "noise", split, [sentence])


class FakeDataset(torch.utils.data.Dataset):
    """``size`` seeded utterances of 1.5 to ``max_seconds`` seconds (map-style)."""

    description = "fake: speech-like noise and fixed word lists (tests and smoke runs only)"

    def __init__(self, size: int = 64, max_seconds: float = 6.0, seed: int = 0, split: str = "train"):
        rng = np.random.default_rng(seed)
        self.items = [make_utterance(rng, i, float(rng.uniform(1.5, max_seconds)), split) for i in range(size)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Utterance:
        return self.items[i]
