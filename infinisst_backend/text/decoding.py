"""One assistant turn, token by token: the paper's logits processors, greedy search and beam search (docs/model.md §6).

The engine owns the model and the KV cache; a :class:`TurnDecoder` owns the choice of tokens. The engine calls
``step(logits)`` first with the prefill's logits (one row), then with the logits of the rows that the previous
step asked for. Each :class:`DecodeStep` says, for every row of the next step, which current row's cache it
continues (``parents``, the engine forks it copy-on-write) and which token it feeds (``tokens``).

Semantics follow the reference stack (InfiniSST ``release`` on transformers 4.47):

* Processors, in this order: repetition penalty over the *current turn's* ids (prompt with its speech
  placeholders, plus the hypothesis), no-repeat n-gram over the same ids, "encoder" no-repeat n-gram against the
  target ids emitted before this turn (the history), no suppressed tokens.
* Beam search (:class:`BeamTurn`) is 4.47's ``BeamSearchScorer``: log-softmax, processors, plus the beam's
  cumulative score; top ``max(2, 1 + #EOS) * beams`` candidates; an EOS candidate ranked below ``beams`` becomes a
  finished hypothesis scored ``cum / generated_len`` (the EOS counted); stop when ``beams`` hypotheses are finished
  and the worst of them is at least the best candidate's ``cum / generated_len``, or at max length, where the open
  beams become hypotheses scored ``cum / max_new_tokens``. The best hypothesis has the maximum score, ties going
  to the one added last.
* Greedy search (:class:`GreedyTurn`, ``beam_size == 1``) is 4.47's greedy path: the same processors, applied to
  the raw logits (generate() with ``num_beams=1`` does not take a log-softmax), then argmax.
* The turn's emitted ids drop its last token: the EOS, or the ``max_new_tokens``-th token, which is never fed.

Vocabulary-sized work runs in torch on the logits' device; Python loops run over rows and candidates only.
Scores are computed in float32 (as 4.47 does), or float64 when the logits are float64 (tests).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from infinisst_backend.config import DecodingConfig

# 4.47 starts beams 1.. with this cumulative score, so that the first step expands beam 0 only.
_DEAD_BEAM_SCORE = -1e9


@dataclass(slots=True)
class DecodeStep:
    """What the engine must do after one ``step()``."""

    parents: list[int]  # for each row of the next step: the current row whose cache it continues
    tokens: list[int]  # the token each next row feeds
    # Current rows whose cache a newly finished hypothesis keeps, in order; the k-th row listed over the whole
    # turn is snapshot k. Take them before applying ``done`` (the final step may list some).
    snapshots: list[int]
    committed: list[int]  # ids final as of this step (greedy streams them; beam: all of them at done)
    done: bool


@dataclass(slots=True)
class TurnResult:
    """The finished turn."""

    emitted_ids: list[int]  # the turn's ids with the EOS / last unfed token dropped
    cache_row: int | None  # the turn's cache is this current row's (greedy, or an open beam at max length) ...
    cache_snapshot: int | None  # ... or snapshot k (a beam hypothesis that finished with an EOS)


def _compute_dtype(logits: Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 logits (4.47 casts to float32), float64 kept for exact tests."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _ngram_table(ids: Sequence[int], n: int) -> dict[tuple[int, ...], tuple[int, ...]]:
    """Map every (n-1)-token prefix occurring in ``ids`` to the tokens that followed it."""
    table: dict[tuple[int, ...], tuple[int, ...]] = {}
    if n <= 0:
        return table
    for i in range(len(ids) - n + 1):
        key = tuple(ids[i : i + n - 1])
        table[key] = table.get(key, ()) + (ids[i + n - 1],)
    return table


@dataclass(slots=True)
class _Hypothesis:
    """One sequence of generated ids (the prompt is shared) with its processor state."""

    tokens: list[int]
    # Ids that get the repetition penalty: the prompt's distinct ids, then the generated ids (duplicates are
    # harmless). An int64 array, so that a batch's lists join with memcpy and reach torch without a Python loop.
    penalized: array
    # (n-1)-prefix -> following tokens, for the n-grams ending in a generated token. Values are tuples so that a
    # shallow copy of the dict is a safe fork.
    ngrams: dict[tuple[int, ...], tuple[int, ...]] = field(default_factory=dict)
    score: float = 0.0  # cumulative processed log-prob (beam search)


class TurnProcessors:
    """The paper's logits processors for one turn, as index lists that :func:`apply_processors` applies."""

    def __init__(self, cfg: DecodingConfig, prompt_ids: Sequence[int], history_ids: Sequence[int]):
        self.penalty = float(cfg.repetition_penalty)
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.prompt_vocab = array("q", sorted(set(self.prompt_ids)))  # penalized ids every hypothesis shares
        self.ngram_size = cfg.no_repeat_ngram_size
        self.prompt_ngrams = _ngram_table(self.prompt_ids, self.ngram_size)
        history = [int(t) for t in history_ids][-cfg.ngram_lookback :] if cfg.ngram_lookback > 0 else []
        self.history_ngram_size = cfg.encoder_no_repeat_ngram_size
        self.history_ngrams = _ngram_table(history, self.history_ngram_size)

    def root(self) -> _Hypothesis:
        """The empty hypothesis (nothing generated yet)."""
        return _Hypothesis([], array("q", self.prompt_vocab))

    def _tail(self, hyp: _Hypothesis, k: int) -> list[int]:
        """The last ``k`` ids of prompt + hypothesis (fewer when the sequence is shorter)."""
        tokens = hyp.tokens
        if k <= len(tokens):
            return tokens[len(tokens) - k :]
        need = k - len(tokens)
        return self.prompt_ids[max(0, len(self.prompt_ids) - need) :] + tokens

    def penalized(self, hyp: _Hypothesis) -> array:
        """Ids whose score gets the repetition penalty: every id of the current turn's sequence."""
        return hyp.penalized

    def banned(self, hyp: _Hypothesis) -> list[int]:
        """Ids that would repeat an n-gram of the current turn, or an n-gram of the history."""
        out: list[int] = []
        length = len(self.prompt_ids) + len(hyp.tokens)
        n = self.ngram_size
        if n > 0 and length >= n - 1:
            key = tuple(self._tail(hyp, n - 1))
            out.extend(self.prompt_ngrams.get(key, ()))
            out.extend(hyp.ngrams.get(key, ()))
        m = self.history_ngram_size
        if m > 0 and self.history_ngrams and length >= m - 1:
            if m != n:  # (with m == n the block above has computed the same key)
                key = tuple(self._tail(hyp, m - 1))
            out.extend(self.history_ngrams.get(key, ()))
        return out

    def append(self, hyp: _Hypothesis, token: int) -> None:
        """Append ``token`` to ``hyp`` in place, recording the n-gram it completes."""
        hyp.tokens.append(token)
        hyp.penalized.append(token)
        n = self.ngram_size
        if n > 0 and len(self.prompt_ids) + len(hyp.tokens) >= n:
            gram = self._tail(hyp, n)
            key = tuple(gram[:-1])
            hyp.ngrams[key] = hyp.ngrams.get(key, ()) + (token,)

    def child(self, hyp: _Hypothesis, token: int, score: float) -> _Hypothesis:
        """A new hypothesis: ``hyp`` followed by ``token``."""
        new = _Hypothesis(list(hyp.tokens), array("q", hyp.penalized), dict(hyp.ngrams), score)
        self.append(new, token)
        return new


def apply_processors(
    scores: Tensor,
    penalties: Sequence[float],
    penalized: Sequence[Iterable[int]],
    banned: Sequence[Iterable[int]],
) -> None:
    """Apply the processors in place. scores: [R, V]; row r gets repetition penalty ``penalties[r]`` on the ids
    ``penalized[r]`` (x*p where x < 0, else x/p), then -inf on the ids ``banned[r]``.

    The index lists are joined on the host (int64 arrays join with memcpy) and sent once; all vocabulary-sized
    work stays on the device. Duplicate ids in a row are harmless: every copy reads the same old value and writes
    the same new one.
    """
    cols = array("q")
    counts: list[int] = []
    for p, ids in zip(penalties, penalized):
        start = len(cols)
        if p != 1.0:
            cols.extend(ids)
        counts.append(len(cols) - start)
    if cols:
        col_index = torch.frombuffer(cols, dtype=torch.int64)
        row_index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts), output_size=len(cols))
        index = torch.stack([row_index, col_index]).to(scores.device, non_blocking=True)  # [2, N]
        values = scores[index[0], index[1]]
        used = {p for p, c in zip(penalties, counts) if c}
        if len(used) == 1:
            factor: Tensor | float = used.pop()
        else:
            per_row = torch.tensor([float(p) for p in penalties], dtype=scores.dtype).to(scores.device)
            factor = per_row[index[0]]
        scores[index[0], index[1]] = torch.where(values < 0, values * factor, values / factor)

    ban_rows: list[int] = []
    ban_cols: list[int] = []
    for r, ids in enumerate(banned):
        start = len(ban_cols)
        ban_cols.extend(ids)
        ban_rows.extend([r] * (len(ban_cols) - start))
    if ban_cols:
        index = torch.tensor([ban_rows, ban_cols], dtype=torch.long).to(scores.device, non_blocking=True)
        scores[index[0], index[1]] = float("-inf")


class TurnDecoder(ABC):
    """Chooses the tokens of one assistant turn (see the module docstring for the protocol)."""

    @abstractmethod
    def step(self, logits: Tensor) -> DecodeStep:
        """Consume the logits [rows, V] of the current rows; say what the next step feeds."""

    @abstractmethod
    def result(self) -> TurnResult:
        """The finished turn; only after a step returned ``done=True``."""

    @property
    @abstractmethod
    def done(self) -> bool:
        """Whether the turn has finished."""


def _check_logits(logits: Tensor, rows: int) -> None:
    if logits.dim() != 2 or logits.shape[0] != rows:
        raise ValueError(f"expected logits of shape [{rows}, vocab], got {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"expected floating-point logits, got {logits.dtype}")


class GreedyTurn(TurnDecoder):
    """Greedy search: every generated id that is neither EOS nor the last allowed one is committed at once."""

    def __init__(self, processors: TurnProcessors, max_new_tokens: int, eos_ids: frozenset[int]):
        self.processors = processors
        self.max_new_tokens = max_new_tokens
        self.eos_ids = eos_ids
        self._hyp = processors.root()
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def step(self, logits: Tensor) -> DecodeStep:
        return _step_one(greedy_step, self, logits)

    def result(self) -> TurnResult:
        if not self._done:
            raise RuntimeError("the turn has not finished")
        # The dropped token was never fed: the only row's cache is the turn's cache.
        return TurnResult(list(self._hyp.tokens), cache_row=0, cache_snapshot=None)

    def _advance(self, token: int) -> DecodeStep:
        """Apply the chosen token."""
        if token in self.eos_ids or len(self._hyp.tokens) + 1 >= self.max_new_tokens:
            self._done = True
            return DecodeStep([], [], [], [], True)
        self.processors.append(self._hyp, token)
        return DecodeStep([0], [token], [], [token], False)


def greedy_step(turns: Sequence[GreedyTurn], logits: Tensor) -> list[DecodeStep]:
    """One greedy step for many streams at once: row i of ``logits`` [B, V] is the one row of ``turns[i]``.

    One device copy of the logits, two scatters, one argmax and one device-to-host transfer for the whole batch.
    """
    _check_logits(logits, len(turns))
    for turn in turns:
        if turn.done:
            raise RuntimeError("step() called on a finished turn")
    scores = logits.to(_compute_dtype(logits), copy=True)  # [B, V]; the processors write into it
    apply_processors(
        scores,
        [t.processors.penalty for t in turns],
        [t.processors.penalized(t._hyp) for t in turns],
        [t.processors.banned(t._hyp) for t in turns],
    )
    tokens = scores.argmax(dim=-1).tolist()  # ties go to the lowest id, as in generate()
    return _step_each(turns, lambda i, turn: turn._advance(tokens[i]))


class PartialStepError(Exception):
    """Some turns of a batched step failed after others had stepped. ``steps[i]`` is turn i's step (``None`` where
    it failed) and ``failures[i]`` its exception. The turns that stepped have moved on: they must not step again."""

    def __init__(self, steps: list[DecodeStep | None], failures: dict[int, Exception]):
        super().__init__(f"{len(failures)} of {len(steps)} turns failed: {next(iter(failures.values()))!r}")
        self.steps, self.failures = steps, failures


def _step_each(turns: Sequence[TurnDecoder], step) -> list[DecodeStep]:
    """``step(i, turns[i])`` for every turn, each on its own: one turn's failure does not stop the others, and
    :class:`PartialStepError` carries every outcome."""
    steps: list[DecodeStep | None] = []
    failures: dict[int, Exception] = {}
    for i, turn in enumerate(turns):
        try:
            steps.append(step(i, turn))
        except Exception as e:
            steps.append(None)
            failures[i] = e
    if failures:
        raise PartialStepError(steps, failures)
    return steps  # type: ignore[return-value]


def _step_one(step_fn, turn: TurnDecoder, logits: Tensor) -> DecodeStep:
    """``step_fn`` (greedy_step or beam_step) for one turn alone; its failure is raised as it is."""
    try:
        return step_fn([turn], logits)[0]
    except PartialStepError as e:
        raise e.failures[0] from None


@dataclass(slots=True)
class _Finished:
    score: float
    emitted_ids: list[int]
    cache_row: int | None
    cache_snapshot: int | None


class BeamTurn(TurnDecoder):
    """Beam search over one turn with transformers 4.47's ``BeamSearchScorer`` semantics (docs/model.md §6.3-6.5)."""

    def __init__(self, processors: TurnProcessors, num_beams: int, max_new_tokens: int, eos_ids: frozenset[int]):
        self.processors = processors
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.eos_ids = eos_ids
        self.num_candidates = max(2, 1 + len(eos_ids)) * num_beams
        self._beams: list[_Hypothesis] = []  # open beams = current rows; empty before the first step
        self._finished: list[_Finished] = []  # at most num_beams, in insertion order (ties favour later ones)
        self._worst = 1e9
        self._num_snapshots = 0
        self._result: TurnResult | None = None

    @property
    def done(self) -> bool:
        return self._result is not None

    def result(self) -> TurnResult:
        if self._result is None:
            raise RuntimeError("the turn has not finished")
        return self._result

    def step(self, logits: Tensor) -> DecodeStep:
        return _step_one(beam_step, self, logits)

    def _current(self) -> tuple[list[_Hypothesis], list[int], list[float]]:
        """This step's beams: each one's hypothesis, its row among the turn's logits rows, its cumulative score.
        Before the first step the turn has one row, the root: 4.47 runs ``beams`` identical rows whose beams 1..
        start at -1e9, so that only beam 0 expands."""
        if self._result is not None:
            raise RuntimeError("step() called on a finished turn")
        if not self._beams:
            n = self.num_beams
            return [self.processors.root()] * n, [0] * n, [0.0] + [_DEAD_BEAM_SCORE] * (n - 1)
        return self._beams, list(range(len(self._beams))), [h.score for h in self._beams]

    def _select(
        self, values: list[float], indices: list[int], vocab: int, current: list[_Hypothesis], beam_rows: list[int]
    ) -> DecodeStep:
        """Walk the candidates best first: EOS ones finish hypotheses, the others fill the next beams."""
        generated_len = len(current[0].tokens) + 1  # the candidates' length, counting the candidate token
        beams: list[_Hypothesis] = []
        parents: list[int] = []
        snapshots: list[int] = []
        snapshot_of_row: dict[int, int] = {}  # two EOS candidates of one row share its snapshot
        for rank, (value, index) in enumerate(zip(values, indices)):
            beam, token = divmod(index, vocab)
            row = beam_rows[beam]
            if token in self.eos_ids:
                if rank >= self.num_beams:
                    continue
                # The hypothesis excludes the EOS; its cache is the row's cache now, so snapshot the row.
                hyp = _Finished(value / generated_len, list(current[beam].tokens), None, None)
                if self._add(hyp):
                    if row not in snapshot_of_row:
                        snapshot_of_row[row] = self._num_snapshots
                        self._num_snapshots += 1
                        snapshots.append(row)
                    hyp.cache_snapshot = snapshot_of_row[row]
            else:
                beams.append(self.processors.child(current[beam], token, value))
                parents.append(row)
                if len(beams) == self.num_beams:
                    break
        if len(beams) < self.num_beams:
            raise ValueError(f"only {len(beams)} of {self.num_beams} beams could continue (vocabulary too small?)")

        if len(self._finished) >= self.num_beams and self._worst >= values[0] / generated_len:
            return self._finish(snapshots)
        if generated_len >= self.max_new_tokens:
            # Max length: open beams become hypotheses; their last token is never fed, so their cache is
            # the parent row's.
            for hyp, parent in zip(beams, parents):
                self._add(_Finished(hyp.score / generated_len, hyp.tokens[:-1], parent, None))
            return self._finish(snapshots)
        self._beams = beams
        return DecodeStep(parents, [h.tokens[-1] for h in beams], snapshots, [], False)

    def _add(self, hyp: _Finished) -> bool:
        """4.47 ``BeamHypotheses.add``: keep the best ``num_beams``, dropping the earliest of equal worst ones.
        Returns whether ``hyp`` was kept."""
        if len(self._finished) >= self.num_beams and hyp.score <= self._worst:
            return False
        self._finished.append(hyp)
        if len(self._finished) > self.num_beams:
            worst = min(range(len(self._finished)), key=lambda i: (self._finished[i].score, i))
            del self._finished[worst]
            self._worst = min(h.score for h in self._finished)
        else:
            self._worst = min(hyp.score, self._worst)
        return True

    def _finish(self, snapshots: list[int]) -> DecodeStep:
        # Best = maximum score; among equal scores the one added last (4.47 sorts stably and pops the end).
        best = max(range(len(self._finished)), key=lambda i: (self._finished[i].score, i))
        hyp = self._finished[best]
        self._result = TurnResult(list(hyp.emitted_ids), hyp.cache_row, hyp.cache_snapshot)
        self._beams = []
        return DecodeStep([], [], snapshots, list(hyp.emitted_ids), True)


def beam_step(turns: Sequence[BeamTurn], logits: Tensor) -> list[DecodeStep]:
    """One beam-search step for many streams at once. ``logits`` [R, V] holds each turn's rows in order: one row
    before a turn's first step, one per beam after.

    One log-softmax and one processor pass over all rows; per beam width, one top-k over every turn's beams and
    one device-to-host transfer. Each turn then walks its own candidates, so stepping turns together chooses what
    stepping each alone would. An error before that walk changes no turn; one in a turn's walk fails that turn only
    (:class:`PartialStepError`).
    """
    current = [t._current() for t in turns]
    counts = [rows[-1] + 1 for _, rows, _ in current]
    _check_logits(logits, sum(counts))
    # log_softmax allocates a new tensor: the caller's logits are left alone.
    scores = torch.log_softmax(logits.to(_compute_dtype(logits)), dim=-1)  # [R, V]
    row_hyps = [(t.processors, h) for t, (hyps, _, _), n in zip(turns, current, counts) for h in hyps[:n]]
    apply_processors(
        scores,
        [p.penalty for p, _ in row_hyps],
        [p.penalized(h) for p, h in row_hyps],
        [p.banned(h) for p, h in row_hyps],
    )
    starts = list(itertools.accumulate(counts, initial=0))
    vocab = scores.shape[1]
    candidates: list[tuple[list[float], list[int]]] = [([], [])] * len(turns)
    for width in sorted({t.num_beams for t in turns}):
        group = [i for i, t in enumerate(turns) if t.num_beams == width]
        index = torch.tensor([starts[i] + r for i in group for r in current[i][1]], device=scores.device)
        cum = torch.tensor([c for i in group for c in current[i][2]], dtype=scores.dtype).to(scores.device)
        totals = (scores[index] + cum[:, None]).view(len(group), width * vocab)
        wanted = [min(turns[i].num_candidates, width * vocab) for i in group]
        values, indices = totals.topk(max(wanted), dim=1)  # sorted, descending
        for i, n, v, x in zip(group, wanted, values.tolist(), indices.tolist()):
            candidates[i] = (v[:n], x[:n])
    return _step_each(turns, lambda i, turn: turn._select(*candidates[i], vocab, current[i][0], current[i][1]))


def make_turn_decoder(
    cfg: DecodingConfig,
    prompt_ids: Sequence[int],
    history_ids: Sequence[int],
    max_new_tokens: int,
    eos_ids: Iterable[int],
) -> TurnDecoder:
    """A decoder for one assistant turn.

    prompt_ids: the turn's input ids as the processors see them (prefix, one placeholder per speech embedding
    slot, suffix); history_ids: target ids emitted before this turn (only the last ``cfg.ngram_lookback`` are
    used); max_new_tokens: at most this many tokens are generated, the last of which is never emitted.
    """
    cfg.validate()
    eos = frozenset(int(t) for t in eos_ids)
    if not eos:
        raise ValueError("eos_ids must name at least one token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"invalid max_new_tokens={max_new_tokens!r}: expected an int >= 1")
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids must not be empty")
    processors = TurnProcessors(cfg, prompt_ids, history_ids)
    if cfg.beam_size == 1:
        return GreedyTurn(processors, max_new_tokens, eos)
    return BeamTurn(processors, cfg.beam_size, max_new_tokens, eos)
