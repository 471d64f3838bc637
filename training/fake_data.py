"""A stand-in for ``training.data``: random audio and fixed turn texts, for tests and smoke runs (``--fake-data``).

It follows the data pipeline's contract: utterances with ``id``, ``audio`` (float32, 16 kHz), ``voice``, ``split``
and ``sentences`` (``en``, ``es``, ``de`` or None, ``start_s``, ``end_s``, ``word_ends``), and :func:`turn_targets`
giving one text per chunk of 0.96*m s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from infinisst_backend.config import SAMPLE_RATE, SAMPLES_PER_UNIT

_WORDS = {
    "en": "the cat sat on a mat and the dog ran to the park".split(),
    "es": "el gato se sentó en una alfombra y el perro corrió al parque".split(),
    "de": "die katze saß auf einer matte und der hund lief in den park".split(),
}


@dataclass(slots=True)
class Sentence:
    en: str
    es: str
    de: str | None
    start_s: float
    end_s: float
    word_ends: list[float] = field(default_factory=list)


@dataclass(slots=True)
class Utterance:
    id: str
    audio: np.ndarray
    voice: str
    split: str
    sentences: list[Sentence]


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


def turn_targets(utt, language: str, m: int, tokenizer=None, max_tokens: int | None = None) -> list[str]:
    """Each word in the chunk where it ends (English timings for every language), one text per chunk."""
    chunk_s = SAMPLES_PER_UNIT * m / SAMPLE_RATE
    chunks = math.ceil(len(utt.audio) / (SAMPLES_PER_UNIT * m))
    turns: list[list[str]] = [[] for _ in range(chunks)]
    for sentence in utt.sentences:
        words = getattr(sentence, language).split()
        ends = sentence.word_ends
        for i, word in enumerate(words):
            end = ends[min(len(ends) - 1, i * len(ends) // len(words))]
            turns[min(chunks - 1, int(end // chunk_s))].append(word)
    return [" ".join(words) for words in turns]
