"""Turn targets: the text the model emits after each speech chunk (InfiniSST's trajectories).

An utterance is cut into chunks of 0.96·m s (chunk k covers [k·0.96m, (k+1)·0.96m) s; a last partial chunk counts).
After reading chunk k, the model emits the text that became due during chunk k, possibly nothing (an empty turn
teaches it to wait). Turns hold whole words; streamed, they are joined by one space (the server's detokenizer joins
turns with " "), so the non-empty turns joined by " " give the whole target text, nothing lost or repeated.

**When a word is due.**

- *English (transcription).* A word is due in the chunk in which it ends: eSpeak's word events give each word's end.
- *Spanish and German (translation), proportional alignment within each sentence.* A sentence spoken from ``s`` to
  ``e`` (its first word's start to its last word's end) spans chunks ``a..b``. At the end of chunk k < b, a fraction
  ``f = (end of chunk k − s) / (e − s)`` of the sentence has been heard, and the first ``floor(f · N)`` of its N target
  words are due; the sentence's remaining words are due in its last chunk b, when all its source words have been heard.
  No word of a sentence is due before the sentence starts, and all of it is due when it ends. This is a monotone
  alignment: it assumes the translation follows the source's order, roughly true of Apertium's Spanish (rule-based,
  mostly in source word order), looser for Ding's human German (verbs move to the end: the model must sometimes
  anticipate, or learn to lag). A sentence boundary is exact (the synthesiser reads one sentence at a time), so the
  error stays within a sentence.

**Cap.** A turn may hold at most ``max_tokens`` tokens (by default ``10·m − 1`` when a tokenizer is given: the server
generates at most 10·m tokens per turn and the last is the end of the turn). Words that do not fit are carried to the
next turn, in order, ahead of that turn's own words. What is still carried at the last chunk is flushed there: the
last turn is the only one that may pass the cap, and only because there is no later turn to carry it to. A single
word longer than the cap on its own (a long German compound at m=1) is emitted alone in its turn, past the cap, since
a word cannot be split across turns (the detokenizer would put a space into it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from infinisst_backend.config import SAMPLE_RATE, SAMPLES_PER_UNIT, TOKENS_PER_UNIT
from training.data.utterances import LANGUAGES, Utterance

log = logging.getLogger(__name__)


def chunk_count(utt: Utterance, m: int) -> int:
    """Number of chunks of 0.96·m s in the utterance's audio (the last partial chunk counts)."""
    return max(1, math.ceil(len(utt.audio) / (SAMPLES_PER_UNIT * m)))


def _chunk_ending(t: float, chunk_s: float, chunks: int) -> int:
    """The chunk in which an event at time ``t`` has been heard: t in (k·c, (k+1)·c] → k."""
    return min(chunks - 1, max(0, math.ceil(t / chunk_s - 1e-9) - 1))


def due_words(utt: Utterance, language: str, m: int) -> list[list[str]]:
    """The words due in each chunk (before any token cap); see the module docstring."""
    if language not in LANGUAGES:
        raise ValueError(f"unsupported language {language!r}; supported: {', '.join(LANGUAGES)}")
    if m < 1:
        raise ValueError(f"the latency multiplier m must be >= 1, not {m}")
    chunk_s = SAMPLES_PER_UNIT * m / SAMPLE_RATE
    chunks = chunk_count(utt, m)
    turns: list[list[str]] = [[] for _ in range(chunks)]
    for sentence in utt.sentences:
        text = sentence.text(language)
        if text is None:
            raise ValueError(f"utterance {utt.id}: sentence {sentence.id or sentence.en!r} has no {language!r} text")
        words = text.split()
        if language == "en":
            if len(sentence.word_ends) != len(words):
                raise ValueError(
                    f"utterance {utt.id}: {len(sentence.word_ends)} word ends for {len(words)} words of {text!r}"
                )
            for word, end in zip(words, sentence.word_ends):
                turns[_chunk_ending(end, chunk_s, chunks)].append(word)
        else:
            _spread_proportionally(words, sentence.start_s, sentence.end_s, chunk_s, turns)
    return turns


def _spread_proportionally(words: list[str], start: float, end: float, chunk_s: float, turns: list[list[str]]):
    chunks = len(turns)
    first = min(chunks - 1, max(0, math.floor(start / chunk_s)))
    last = max(first, _chunk_ending(end, chunk_s, chunks))
    emitted = 0
    for k in range(first, last):
        heard = ((k + 1) * chunk_s - start) / max(end - start, 1e-9)
        due = min(len(words), math.floor(max(0.0, heard) * len(words)))
        turns[k].extend(words[emitted:due])
        emitted = max(emitted, due)
    turns[last].extend(words[emitted:])


def turn_targets(utt: Utterance, language: str, m: int, tokenizer=None, max_tokens: int | None = None) -> list[str]:
    """The text the model should emit after each chunk of 0.96·m s of ``utt`` (one string per chunk, maybe empty).

    ``language`` is ``en`` (transcription), ``es`` or ``de``. With ``tokenizer`` (an object with Hugging Face's
    ``encode(text, add_special_tokens=False)``) turns are capped at ``max_tokens`` tokens, ``10·m − 1`` by default;
    without one, ``max_tokens`` (if given) counts words. Overflow is carried to later turns (module docstring).
    """
    turns = due_words(utt, language, m)
    if tokenizer is not None and max_tokens is None:
        max_tokens = TOKENS_PER_UNIT * m - 1
    if max_tokens is None:
        return [" ".join(t) for t in turns]
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, not {max_tokens}")
    count = _token_counter(tokenizer)
    return cap_turns(turns, max_tokens, count)


def _token_counter(tokenizer):
    if tokenizer is None:
        return lambda words: len(words)

    def count(words: Sequence[str]) -> int:
        return len(tokenizer.encode(" ".join(words), add_special_tokens=False))

    return count


def cap_turns(turns: list[list[str]], max_tokens: int, count) -> list[str]:
    """``turns`` (words due per chunk) with at most ``max_tokens`` per turn as counted by ``count(words)``; overflow
    carried forward and flushed into the last turn (the module docstring's rule)."""
    out: list[str] = []
    pending: list[str] = []
    for k, due in enumerate(turns):
        pending.extend(due)
        if k == len(turns) - 1:
            if pending and count(pending) > max_tokens:
                log.debug("last turn holds %d tokens, over the cap of %d", count(pending), max_tokens)
            out.append(" ".join(pending))
            break
        n = _fitting_prefix(pending, max_tokens, count)
        out.append(" ".join(pending[:n]))
        pending = pending[n:]
    return out


def _fitting_prefix(words: list[str], max_tokens: int, count) -> int:
    """How many leading ``words`` fit ``max_tokens`` (at least one if any: a word longer than the cap goes alone)."""
    if not words:
        return 0
    n = 0
    while n < len(words) and count(words[: n + 1]) <= max_tokens:
        n += 1
    return max(n, 1)
