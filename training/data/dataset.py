"""Training and held-out utterances, synthesised on the fly.

``SpeechDataset`` is a ``torch.utils.data.IterableDataset``: each DataLoader worker (and each distributed rank) draws
its own stream from a generator seeded by ``(seed, epoch, rank, worker)``, so workers and epochs give different
sentences, voices, speeds, pitches and augmentations; eSpeak is initialised once in each worker process. An utterance
is a run of consecutive sentences of one source (Brown or Ding) of one split, read by one voice; it keeps all its
targets (``en``, ``es``, and ``de`` for Ding) and the trainer picks the language (``Utterance.languages``).

The held-out split is fixed: :func:`heldout_set` gives the same utterances every time, read by held-out voices
(:func:`training.data.speech.voice_names`) from held-out sentences only (corpus records with ``split == "heldout"``),
without augmentation. Training uses neither.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.data.augment import AugmentConfig, augment
from training.data.corpus import SOURCES, TextRecord, load_corpus
from training.data.speech import Voice, random_voice
from training.data.utterances import LANGUAGES, Utterance, UtteranceConfig, read_sentences

log = logging.getLogger(__name__)

# Planning a group of sentences before synthesising it: eSpeak reads a little faster than its nominal words per
# minute (about 0.85 · words · 60 / rate seconds for Brown and Ding sentences); each sentence adds a pause.
_RATE_FACTOR = 0.85
_SENTENCE_OVERHEAD_S = 0.5


@dataclass(frozen=True, slots=True)
class _Plan:
    source: str
    start: int  # index into the split's records of that source
    count: int
    voice: Voice
    max_seconds: float
    seed: int


def _estimate_seconds(record: TextRecord, voice: Voice) -> float:
    return _RATE_FACTOR * len(record.en.split()) * 60.0 / voice.rate + _SENTENCE_OVERHEAD_S


def _plan_count(records: Sequence[TextRecord], start: int, voice: Voice, max_seconds: float) -> int:
    """How many records from ``start`` (wrapping around) should fit ``max_seconds`` when read by ``voice``."""
    total, count = 0.5, 0
    while count < len(records):
        est = _estimate_seconds(records[(start + count) % len(records)], voice)
        if count and total + est > max_seconds:
            break
        total += est
        count += 1
    return count  # read_sentences still stops at the cap by the real durations


def _records_from(records: Sequence[TextRecord], start: int, count: int) -> list[TextRecord]:
    return [records[(start + i) % len(records)] for i in range(count)]


class SpeechDataset(torch.utils.data.IterableDataset):
    """Utterances synthesised on the fly from the corpus file (see the module docstring).

    ``split="train"`` draws random runs of training sentences with training voices, forever unless ``num_examples``
    (per epoch, over all workers and ranks) is given, with augmentation unless ``augment=False``. ``split="heldout"``
    yields the fixed :func:`heldout_set` of ``num_examples`` (default 200) utterances, sharded over workers.
    ``languages`` decides the mix of sources: with ``de`` in it, ``ding_fraction`` (default 0.4) of the utterances
    are read from Ding (the only sentences with German), otherwise Ding comes in proportion to its size.
    Utterance caps are drawn uniformly from [``min_seconds``, ``max_seconds``].
    """

    def __init__(
        self,
        corpus_path: str | Path | Sequence[TextRecord],
        split: str = "train",
        languages: Sequence[str] = LANGUAGES,
        seed: int = 0,
        max_seconds: float = 30.0,
        min_seconds: float = 8.0,
        num_examples: int | None = None,
        augment: bool | None = None,
        augment_config: AugmentConfig | None = None,
        ding_fraction: float | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
        bad = [lang for lang in languages if lang not in LANGUAGES]
        if bad or not languages:
            raise ValueError(f"unsupported languages {bad or list(languages)}; supported: {', '.join(LANGUAGES)}")
        if not 1.0 < min_seconds <= max_seconds:
            raise ValueError(f"need 1 < min_seconds <= max_seconds, got {min_seconds}, {max_seconds}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if ding_fraction is not None and not 0.0 <= ding_fraction <= 1.0:
            raise ValueError(f"ding_fraction must be in [0, 1], not {ding_fraction}")
        records = corpus_path if not isinstance(corpus_path, (str, Path)) else load_corpus(Path(corpus_path))
        self.records = {s: [r for r in records if r.source == s and r.split == split] for s in SOURCES}
        if not any(self.records.values()):
            raise ValueError(f"the corpus has no {split!r} sentences")
        self.split = split
        self.languages = tuple(languages)
        self.seed = seed
        self.min_seconds, self.max_seconds = min_seconds, max_seconds
        self.num_examples = num_examples if num_examples is not None or split == "train" else 200
        self.augment = (split == "train") if augment is None else augment
        self.augment_config = augment_config or AugmentConfig()
        sizes = {s: len(v) for s, v in self.records.items()}
        if not self.records["ding"]:
            self.ding_fraction = 0.0
        elif ding_fraction is not None:
            self.ding_fraction = ding_fraction
        elif "de" in self.languages:
            self.ding_fraction = 0.4
        else:
            self.ding_fraction = sizes["ding"] / sum(sizes.values())
        if not self.records["brown"]:
            self.ding_fraction = 1.0
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the random stream of ``epoch`` (call before iterating; workers copy the dataset when they start)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Utterance]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shard, shards = self.rank * workers + worker, self.world_size * workers
        if self.split == "heldout":
            plans = _heldout_plans(self.records, self.num_examples, self.seed, self.min_seconds, self.max_seconds)
            for i in range(shard, len(plans), shards):
                yield self._read(plans[i], f"heldout-{self.seed}-{i:04d}")
            return
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        count = None if self.num_examples is None else len(range(shard, self.num_examples, shards))
        i = 0
        while count is None or i < count:
            utt = self._read(self._train_plan(rng), f"train-{self.seed}-{self.epoch}-{shard}-{i}")
            if utt.sentences:
                yield utt
                i += 1

    def _train_plan(self, rng: np.random.Generator) -> _Plan:
        source = "ding" if rng.random() < self.ding_fraction else "brown"
        records = self.records[source]
        voice = random_voice(rng, "train")
        cap = float(rng.uniform(self.min_seconds, self.max_seconds))
        start = int(rng.integers(len(records)))
        return _Plan(source, start, _plan_count(records, start, voice, cap), voice, cap, int(rng.integers(2**63)))

    def _read(self, plan: _Plan, utt_id: str) -> Utterance:
        rng = np.random.default_rng(plan.seed)
        records = _records_from(self.records[plan.source], plan.start, plan.count)
        utt, _ = read_sentences(records, plan.voice, rng, UtteranceConfig(max_seconds=plan.max_seconds), utt_id)
        if not utt.sentences and self.split == "heldout":
            # The first sentence came out longer than its planned cap: read it again under the dataset's cap.
            rng = np.random.default_rng(plan.seed)
            utt, _ = read_sentences(records, plan.voice, rng, UtteranceConfig(max_seconds=self.max_seconds), utt_id)
            if not utt.sentences:
                log.warning(
                    "held-out utterance %s: sentence %s is longer than %s s", utt_id, records[0].id, self.max_seconds
                )
        utt.split = self.split
        if self.augment and utt.sentences:
            audio, shift = augment(utt.audio, rng, self.augment_config)
            utt = utt.shifted(audio, shift)
        return utt


def _heldout_plans(
    records: dict[str, list[TextRecord]], n: int, seed: int, min_seconds: float, max_seconds: float
) -> list[_Plan]:
    """``n`` fixed utterance plans: each source's held-out sentences walked in order, cut into groups, read by
    held-out voices; sources interleaved in proportion to their groups. Cheap (no synthesis), so every worker
    computes the same list."""
    rng = np.random.default_rng([seed, 0x4E1D])
    per_source: dict[str, list[_Plan]] = {}
    for source in SOURCES:
        recs = records.get(source, [])
        plans, start = [], 0
        while start < len(recs):
            voice = random_voice(rng, "heldout")
            first = _estimate_seconds(recs[start], voice) + 1.0
            if first > 0.85 * max_seconds:  # too long for any utterance: not part of the held-out set
                start += 1
                continue
            cap = max(float(rng.uniform(min_seconds, max_seconds)), first)
            count = _plan_count(recs, start, voice, cap)
            count = min(count, len(recs) - start)
            plans.append(_Plan(source, start, count, voice, cap, int(rng.integers(2**63))))
            start += count
        per_source[source] = plans
    merged = sorted(
        ((i + 0.5) / len(plans), s, plan) for s, plans in per_source.items() for i, plan in enumerate(plans)
    )
    out = [plan for _, _, plan in merged]
    if n > len(out):
        raise ValueError(f"asked for {n} held-out utterances; the held-out sentences give at most {len(out)}")
    # Keep the interleaving of the whole set, taking the first n of it.
    return out[:n]


def heldout_set(
    corpus_path: str | Path | Sequence[TextRecord],
    n: int = 200,
    seed: int = 0,
    max_seconds: float = 30.0,
    min_seconds: float = 8.0,
) -> list[Utterance]:
    """The fixed held-out utterances for evaluation: held-out voices reading held-out sentences, no augmentation.

    The same arguments give the same utterances (audio and texts) every time, and no held-out sentence is read twice;
    ``n`` larger than the held-out sentences allow (about 430 at the default caps) is a ``ValueError``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, not {n}")
    dataset = SpeechDataset(
        corpus_path, "heldout", seed=seed, max_seconds=max_seconds, min_seconds=min_seconds, num_examples=n
    )
    return list(iter(dataset))
