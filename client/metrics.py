"""Translation and transcription scores (:mod:`training.evaluate`, :mod:`client.evaluate`): WER, BLEU and chrF.

English (transcription) is scored by word error rate with ``jiwer`` after :func:`normalize_text` on both sides:

1. Unicode NFKC, then lowercase;
2. apostrophes (``'``, ``’``, ``‘``) deleted, so ``don't`` and ``dont`` are one word;
3. every other punctuation or symbol character (Unicode categories ``P*`` and ``S*``) becomes a space;
4. runs of white space collapse to one space, none at the ends.

Digits are kept as they are: eSpeak reads ``1961`` aloud as words, and the model is taught to write the text as the
corpus has it, so both sides keep the reference's way of writing numbers (``$3.50`` becomes ``3 50`` on both sides).

Translations are scored against the utterance's reference text (Apertium's Spanish, Ding's German) with
``sacrebleu``'s corpus-level BLEU and chrF, default settings (BLEU's ``13a`` tokenisation), on the texts as written.
Every language also gets the mean over utterances of the hypothesis's length over the reference's, in words of the
normalised texts (a model that stops early or repeats itself shows there first).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

_APOSTROPHES = re.compile("['\u2019\u2018]")
NORMALISATION = (
    "NFKC, lowercase; apostrophes deleted; every other punctuation or symbol character becomes a space; spaces "
    "collapsed. Digits kept as written (both sides keep the reference's way of writing numbers)."
)


def normalize_text(text: str) -> str:
    """The text as WER compares it (see the module docstring): lowercase, no punctuation, single spaces."""
    text = _APOSTROPHES.sub("", unicodedata.normalize("NFKC", text).lower())
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    return " ".join(text.split())


def length_ratio(hypothesis: str, reference: str) -> float:
    """Words of the normalised hypothesis over words of the normalised reference (0 for an empty reference)."""
    ref_words = len(normalize_text(reference).split())
    return len(normalize_text(hypothesis).split()) / ref_words if ref_words else 0.0


def utterance_wer(hypothesis: str, reference: str) -> float:
    """WER of one utterance after normalisation (the hypothesis's word count when the reference is empty)."""
    import jiwer

    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    if not ref:
        return float(len(hyp.split()))
    return float(jiwer.wer(ref, hyp))


def corpus_wer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus WER after normalisation: all edits over all reference words (not a mean of utterance WERs)."""
    import jiwer

    _check_pairs(hypotheses, references)
    pairs = [(normalize_text(r), normalize_text(h)) for h, r in zip(hypotheses, references)]
    ref_words = sum(len(r.split()) for r, _ in pairs)
    if ref_words == 0:
        raise ValueError("every reference is empty after normalisation: WER is undefined")
    # jiwer rejects empty references: such pairs add their hypothesis's words as insertions.
    scored = [(r, h) for r, h in pairs if r]
    out = jiwer.process_words([r for r, _ in scored], [h for _, h in scored])
    errors = out.substitutions + out.deletions + out.insertions + sum(len(h.split()) for r, h in pairs if not r)
    return errors / ref_words


def corpus_bleu_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, float]:
    """sacrebleu's corpus BLEU and chrF (default settings), one reference per hypothesis."""
    import sacrebleu

    _check_pairs(hypotheses, references)
    hyps, refs = list(hypotheses), [list(references)]
    return float(sacrebleu.corpus_bleu(hyps, refs).score), float(sacrebleu.corpus_chrf(hyps, refs).score)


@dataclass(slots=True)
class LanguageScore:
    """The scores of one (language, m): WER for English, BLEU and chrF for the others; always the length ratio."""

    count: int
    length_ratio: float
    wer: float | None = None
    bleu: float | None = None
    chrf: float | None = None

    def to_dict(self) -> dict:
        out = {"count": self.count, "length_ratio": self.length_ratio}
        if self.wer is not None:
            out["wer"] = self.wer
        if self.bleu is not None:
            out.update(bleu=self.bleu, chrf=self.chrf)
        return out


def score(language: str, hypotheses: Sequence[str], references: Sequence[str]) -> LanguageScore:
    """WER for ``en``, BLEU and chrF for any other language; with the mean length ratio."""
    _check_pairs(hypotheses, references)
    ratio = sum(length_ratio(h, r) for h, r in zip(hypotheses, references)) / len(references)
    if language == "en":
        return LanguageScore(len(references), ratio, wer=corpus_wer(hypotheses, references))
    bleu, chrf = corpus_bleu_chrf(hypotheses, references)
    return LanguageScore(len(references), ratio, bleu=bleu, chrf=chrf)


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not references:
        raise ValueError("nothing to score: no references")
