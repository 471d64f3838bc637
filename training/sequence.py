"""One training example as the server would feed it, and padded batches of them (docs/model.md §5, issue 18).

The sequence of an utterance at latency multiplier m, language L (chatml, :class:`PromptBuilder`'s turns):

    first turn:  <system prompt>  <|im_start|>user\\n [12*k speech rows] <|im_end|>\\n<|im_start|>assistant\\n
                 t_1 .. t_r                                   <- the turn's target tokens (r may be 0)
    later turns: <|im_end|>\\n<|im_start|>user\\n [12*k rows] <|im_end|>\\n<|im_start|>assistant\\n t_1 .. t_r
    end:         <|im_end|>                                   <- closes the last turn

k = m for every chunk but a partial last one (the server splices 12*k rows there too). The turn's end token is the
first token of the next turn's prompt (it closes the assistant turn, as at inference, where the generated EOS is
never fed). Labels: the position before t_1 predicts t_1, ..., t_r predicts the end token; every other position is
ignored. So an empty turn teaches waiting: its assistant header predicts the end token at once.

A turn's target text is tokenized stripped, without a leading space: the server's detokenizer strips every turn and
joins the non-empty ones with one space, so that is the text the model's ids must decode to.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from infinisst_backend.config import EMBEDDINGS_PER_UNIT, FRAMES_PER_UNIT, SAMPLES_PER_UNIT, TOKENS_PER_UNIT
from infinisst_backend.text.prompt import PromptBuilder

IGNORE = -100
# The auxiliary CTC head's characters (index + 1; 0 is the blank).
CTC_ALPHABET = " abcdefghijklmnopqrstuvwxyz'0123456789"
_CTC_INDEX = {c: i + 1 for i, c in enumerate(CTC_ALPHABET)}
# The server's window (EngineConfig.max_llm_cache_tokens): training sequences stay within it, so none is evicted.
MAX_SEQUENCE_TOKENS = 1000

# turn_targets(utt, language, m, tokenizer=None, max_tokens=None) -> one text per chunk (training.data's contract).
TargetsFn = Callable[..., list[str]]


def max_turn_tokens(m: int) -> int:
    """Target tokens a turn may hold: the server generates at most 10*m and never emits the last one."""
    return TOKENS_PER_UNIT * m - 1


def ctc_labels(text: str) -> list[int]:
    """The CTC targets of an English text: lower case, letters, digits, apostrophes, single spaces."""
    text = re.sub(r"[\s\-]+", " ", text.lower())
    text = "".join(c for c in text if c in _CTC_INDEX)
    return [_CTC_INDEX[c] for c in " ".join(text.split())]


@dataclass(slots=True)
class Example:
    """One utterance's training sequence."""

    id: str
    audio: np.ndarray  # float32, cut to the chunks the sequence holds
    language: str
    m: int
    tokens: list[int]  # input ids; speech positions hold the placeholder id
    speech_rows: list[int]  # per position: the speech row it takes, or -1
    targets: list[int]  # per position: the id to predict next, or IGNORE
    turn_targets: list[list[int]]  # each turn's target ids (without the end token)
    ctc: list[int]  # CTC labels of the English transcript of those chunks

    @property
    def units(self) -> int:
        return math.ceil(len(self.audio) / SAMPLES_PER_UNIT)


def build_example(
    utt,
    language: str,
    m: int,
    builder: PromptBuilder,
    tokenizer,
    targets_fn: TargetsFn,
    max_tokens: int = MAX_SEQUENCE_TOKENS,
) -> Example:
    """The sequence of ``utt`` in ``language`` at multiplier ``m``; chunks that would pass ``max_tokens`` are left out
    (with their audio). Raises ValueError for empty audio or a template whose later turns do not start by closing
    the previous one."""
    audio = np.asarray(utt.audio, dtype=np.float32)
    if audio.size == 0:
        raise ValueError(f"utterance {utt.id}: empty audio")
    units = math.ceil(audio.size / SAMPLES_PER_UNIT)
    chunks = math.ceil(units / m)
    cap = max_turn_tokens(m)
    texts = list(targets_fn(utt, language, m, tokenizer=tokenizer, max_tokens=cap))
    texts = (texts + [""] * chunks)[:chunks]
    first, later = builder.first_turn(language, m), builder.next_turn(m)
    end_id = later.prefix_ids[0]
    if end_id not in builder.eos_ids:
        raise ValueError("the template's later turns must start with the end token of the previous turn")

    tokens: list[int] = []
    rows: list[int] = []
    targets: list[int] = []
    turn_ids: list[list[int]] = []
    used = 0
    for j in range(chunks):
        turn = first if j == 0 else later
        k = min(m, units - j * m)
        text = texts[j].strip()
        ids = tokenizer.encode(text, add_special_tokens=False)[:cap] if text else []
        size = len(turn.prefix_ids) + EMBEDDINGS_PER_UNIT * k + len(turn.suffix_ids) + len(ids)
        if j and len(tokens) + size + 1 > max_tokens:
            break
        tokens += turn.prefix_ids
        tokens += [turn.speech_token_id] * (EMBEDDINGS_PER_UNIT * k)
        rows += [-1] * len(turn.prefix_ids) + list(range(used * EMBEDDINGS_PER_UNIT, (used + k) * EMBEDDINGS_PER_UNIT))
        tokens += turn.suffix_ids + ids
        rows += [-1] * (len(turn.suffix_ids) + len(ids))
        targets += [IGNORE] * (len(tokens) - len(targets) - len(ids) - 1) + ids + [end_id]
        turn_ids.append(ids)
        used += k
    tokens.append(end_id)  # closes the last turn: an input only
    rows.append(-1)
    targets.append(IGNORE)

    english = targets_fn(utt, "en", m) if language != "en" else texts
    transcript = " ".join(t.strip() for t in list(english)[: len(turn_ids)] if t.strip())
    return Example(
        id=str(utt.id),
        audio=audio[: used * SAMPLES_PER_UNIT],
        language=language,
        m=m,
        tokens=tokens,
        speech_rows=rows,
        targets=targets,
        turn_targets=turn_ids,
        ctc=ctc_labels(transcript),
    )


@dataclass(slots=True)
class TrainingBatch:
    """Padded examples of one m: audio ``[B, L]``, sequences ``[B, T]`` padded at the end (targets IGNORE)."""

    audio: Tensor  # [B, L] float32, zeros after each stream's samples
    audio_lengths: list[int]
    m: int
    tokens: Tensor  # [B, T] long
    speech_rows: Tensor  # [B, T] long, -1 at token positions
    targets: Tensor  # [B, T] long, IGNORE where nothing is predicted
    seq_lengths: list[int]
    ctc_targets: Tensor  # [sum of lengths] long
    ctc_lengths: Tensor  # [B] long
    ctc_frames: Tensor  # [B] long: 48 * units of each stream
    ids: list[str]
    languages: list[str]

    def to(self, device, non_blocking: bool = False) -> TrainingBatch:
        moved = {
            name: getattr(self, name).to(device, non_blocking=non_blocking)
            for name in ("audio", "tokens", "speech_rows", "targets", "ctc_targets", "ctc_lengths", "ctc_frames")
        }
        return TrainingBatch(
            **moved,
            audio_lengths=self.audio_lengths,
            m=self.m,
            seq_lengths=self.seq_lengths,
            ids=self.ids,
            languages=self.languages,
        )

    def pin_memory(self) -> TrainingBatch:
        """Page-locked copies (the DataLoader's ``pin_memory=True``, CUDA only)."""
        for name in ("audio", "tokens", "speech_rows", "targets", "ctc_targets", "ctc_lengths", "ctc_frames"):
            setattr(self, name, getattr(self, name).pin_memory())
        return self

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    @property
    def audio_seconds(self) -> float:
        return sum(self.audio_lengths) / 16_000


def collate(examples: Sequence[Example], pad_id: int) -> TrainingBatch:
    """Pad examples of one m into a :class:`TrainingBatch`."""
    ms = {e.m for e in examples}
    if len(ms) != 1:
        raise ValueError(f"a batch holds one latency multiplier, got {sorted(ms)}")
    lengths = [len(e.audio) for e in examples]
    audio = torch.zeros(len(examples), max(lengths))
    for i, e in enumerate(examples):
        audio[i, : len(e.audio)] = torch.from_numpy(e.audio)
    width = max(len(e.tokens) for e in examples)

    def pad(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (width - len(values))

    return TrainingBatch(
        audio=audio,
        audio_lengths=lengths,
        m=ms.pop(),
        tokens=torch.tensor([pad(e.tokens, pad_id) for e in examples]),
        speech_rows=torch.tensor([pad(e.speech_rows, -1) for e in examples]),
        targets=torch.tensor([pad(e.targets, IGNORE) for e in examples]),
        seq_lengths=[len(e.tokens) for e in examples],
        ctc_targets=torch.tensor([c for e in examples for c in e.ctc], dtype=torch.long),
        ctc_lengths=torch.tensor([len(e.ctc) for e in examples]),
        ctc_frames=torch.tensor([e.units * FRAMES_PER_UNIT for e in examples]),
        ids=[e.id for e in examples],
        languages=[e.language for e in examples],
    )


def has_language(utt, language: str) -> bool:
    """Whether every sentence of ``utt`` has a reference in ``language`` (German exists for Ding's sentences)."""
    return bool(utt.sentences) and all(getattr(s, language, None) for s in utt.sentences)


class Collator:
    """DataLoader ``collate_fn``: samples m per batch and a language per utterance, builds and pads the examples.

    Random choices come from a generator seeded by the worker's torch seed (the DataLoader's generator seeds the
    workers), so a run's batches follow from its seed.
    """

    def __init__(
        self,
        tokenizer,
        builder: PromptBuilder,
        targets_fn: TargetsFn,
        multipliers: Sequence[int] = (1, 2),
        languages: dict[str, float] | None = None,
        max_tokens: int = MAX_SEQUENCE_TOKENS,
    ):
        self.tokenizer = tokenizer
        self.builder = builder
        self.targets_fn = targets_fn
        self.multipliers = list(multipliers)
        self.languages = dict(languages or {"en": 1.0, "es": 1.0, "de": 1.0})
        self.max_tokens = max_tokens
        self.pad_id = builder.next_turn(1).prefix_ids[0]
        self._rng: np.random.Generator | None = None

    def rng(self) -> np.random.Generator:
        if self._rng is None:
            self._rng = np.random.default_rng(torch.initial_seed())
        return self._rng

    def __call__(self, utterances: Sequence) -> TrainingBatch:
        rng = self.rng()
        m = int(rng.choice(self.multipliers))
        examples = []
        for utt in utterances:
            choices = [lang for lang in self.languages if has_language(utt, lang)] or ["en"]
            weights = np.array([self.languages.get(lang, 1.0) for lang in choices], dtype=float)
            language = str(rng.choice(choices, p=weights / weights.sum()))
            examples.append(
                build_example(utt, language, m, self.builder, self.tokenizer, self.targets_fn, self.max_tokens)
            )
        return collate(examples, self.pad_id)
