"""Utterances: consecutive sentences of one split read by one voice, with each word's end time.

An utterance starts with a short silence, then reads its sentences one after another with a pause of 0.15–0.6 s
between them, until the next sentence would pass ``max_seconds``. Times are seconds from the utterance's first sample.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from training.data.corpus import TextRecord
from training.data.speech import SAMPLE_RATE, Voice, reset, synthesize

log = logging.getLogger(__name__)

LANGUAGES = ("en", "es", "de")


@dataclass(slots=True)
class Sentence:
    """One sentence of an utterance: its texts, where it is spoken, and the end (s) of each word of ``en``."""

    en: str
    es: str
    de: str | None
    start_s: float
    end_s: float
    word_ends: list[float] = field(default_factory=list)
    id: str = ""

    def text(self, language: str) -> str | None:
        """The sentence in ``language`` (``en``, ``es`` or ``de``); None if it has none (German of Brown)."""
        if language not in LANGUAGES:
            raise ValueError(f"unsupported language {language!r}; supported: {', '.join(LANGUAGES)}")
        return getattr(self, language)


@dataclass(slots=True)
class Utterance:
    """Audio (float32, 16 kHz, mono) of sentences read by one voice, with their texts and timings."""

    id: str
    audio: np.ndarray
    voice: str
    split: str
    sentences: list[Sentence]

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    @property
    def languages(self) -> tuple[str, ...]:
        """The target languages every sentence has (``de`` only for utterances of Ding sentences)."""
        return tuple(lang for lang in LANGUAGES if all(s.text(lang) for s in self.sentences))

    def text(self, language: str) -> str:
        """The whole utterance's text in ``language``: its sentences joined by one space."""
        parts = [s.text(language) for s in self.sentences]
        if any(p is None for p in parts):
            raise ValueError(f"utterance {self.id} has no {language!r} text for every sentence")
        return " ".join(" ".join(p.split()) for p in parts)

    def shifted(self, audio: np.ndarray, shift_s: float) -> Utterance:
        """This utterance with new ``audio`` whose speech starts ``shift_s`` later (silence padded in front)."""
        sentences = [
            replace(
                s,
                start_s=s.start_s + shift_s,
                end_s=s.end_s + shift_s,
                word_ends=[t + shift_s for t in s.word_ends],
            )
            for s in self.sentences
        ]
        return replace(self, audio=audio, sentences=sentences)


@dataclass(frozen=True, slots=True)
class UtteranceConfig:
    """How sentences are read into an utterance (seconds)."""

    max_seconds: float = 30.0
    lead_silence: tuple[float, float] = (0.05, 0.5)
    pause: tuple[float, float] = (0.15, 0.6)
    tail_silence: tuple[float, float] = (0.1, 0.4)

    def __post_init__(self) -> None:
        if self.max_seconds <= 1.0:
            raise ValueError(f"max_seconds must be above 1 s, not {self.max_seconds}")
        for name in ("lead_silence", "pause", "tail_silence"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be a range 0 <= low <= high, not {(lo, hi)}")


def read_sentences(
    records: Sequence[TextRecord],
    voice: Voice,
    rng: np.random.Generator,
    config: UtteranceConfig = UtteranceConfig(),
    utt_id: str = "",
    split: str = "",
) -> tuple[Utterance, int]:
    """Read ``records`` in order with ``voice`` until the next one would pass ``config.max_seconds``.

    Returns the utterance and how many records were consumed. Records too long for the cap alone are skipped (and
    counted as consumed) while no sentence has been read yet, so the utterance has no sentence only if every record
    was too long.
    """
    if not records:
        raise ValueError("no sentences to read")
    reset(int(rng.integers(2**32)))  # the audio depends only on rng's state, not on earlier syntheses
    pieces: list[np.ndarray] = []
    sentences: list[Sentence] = []
    t = _silence_s(rng, config.lead_silence)
    pieces.append(np.zeros(round(t * SAMPLE_RATE), np.float32))
    used = 0
    tail = _silence_s(rng, config.tail_silence)
    for record in records:
        syn = synthesize(record.en, voice)
        pause = _silence_s(rng, config.pause) if sentences else 0.0
        start = t + pause
        if start + syn.duration_s + tail > config.max_seconds:
            if not sentences:
                log.debug("sentence %s (%.1f s) is longer than the cap; skipped", record.id, syn.duration_s)
                used += 1
                continue
            break
        used += 1
        pieces.append(np.zeros(round(start * SAMPLE_RATE) - sum(len(p) for p in pieces), np.float32))
        pieces.append(syn.audio)
        ends = [start + e for e in syn.word_ends]
        sentences.append(Sentence(record.en, record.es, record.de, start, ends[-1] if ends else start, ends, record.id))
        t = start + syn.duration_s
    pieces.append(np.zeros(round(tail * SAMPLE_RATE), np.float32))
    audio = np.concatenate(pieces)
    utt = Utterance(utt_id, audio, voice_label(voice), split or (records[0].split if records else ""), sentences)
    return utt, used


def voice_label(voice: Voice) -> str:
    """``en-us+m3@175wpm/p50``: the voice name, speed and pitch of an utterance."""
    return f"{voice.name}@{voice.rate}wpm/p{voice.pitch}"


def _silence_s(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    # Rounded to whole samples, so that times and sample counts agree exactly.
    return round(float(rng.uniform(*bounds)) * SAMPLE_RATE) / SAMPLE_RATE
