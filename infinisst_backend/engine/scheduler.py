"""Iteration-level (ORCA-style) scheduling policy and admission control.

Each engine step is one phase only:
- **prefill**: streams whose next chunk is waiting and who have no turn running, first come first served by
  the chunk's arrival, up to ``max_batch_size`` streams and ``max_prefill_tokens`` prompt tokens;
- **decode**: one token for every row of every stream in a turn (a beam-4 stream has 4 rows), oldest turn
  first, up to ``max_batch_size`` rows.
Prefill runs first whenever a prefill batch is due: when it is full (``max_batch_size`` streams or
``max_prefill_tokens`` tokens), or when its oldest chunk has waited ``batch_timeout_s`` for more streams to join
(0: at once). While a batch fills, decode steps run. New work joins at the next step.

Admission reserves each stream's worst-case KV footprint when it opens, so page allocation never fails later
and nothing is ever preempted. The scheduler sees streams and page counts, never tensors.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from infinisst_backend.config import EMBEDDINGS_PER_UNIT, TOKENS_PER_UNIT, EngineConfig
from infinisst_backend.engine.stream import Stream
from infinisst_backend.errors import CapacityError

PREFILL = "prefill"
DECODE = "decode"


@dataclass(slots=True)
class ScheduledStep:
    phase: str  # PREFILL | DECODE
    streams: list[Stream]
    num_rows: int  # prefill: streams; decode: rows (beams)
    num_tokens: int  # tokens fed to the LLM this step


@dataclass(slots=True)
class StepRecord:
    """What one step ran (for metrics and for the scheduler tests)."""

    phase: str
    stream_ids: list
    num_rows: int
    num_tokens: int
    time: float = field(default_factory=time.monotonic)


def prompt_tokens(stream: Stream, system_len_hint: int) -> int:
    """Prompt tokens of the stream's next turn (first turn: with the system prompt)."""
    turn = EMBEDDINGS_PER_UNIT * stream.m + 10
    return turn + (system_len_hint if stream.turns_done == 0 else 0)


class Scheduler:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg

    def schedule(self, streams: list[Stream], system_len_hint: int, now: float) -> ScheduledStep | None:
        """Pick the next step, or None when there is nothing to do (or a short wait for a fuller batch pays)."""
        ready = sorted((s for s in streams if s.ready_for_prefill), key=lambda s: s.chunks[0].arrival)
        decoding = sorted((s for s in streams if s.turn is not None), key=lambda s: s.turn.started)
        if self.cfg.scheduling == "static" and decoding:
            return self._decode(decoding)  # the baseline: no new work joins a running batch
        if ready:
            step = self._prefill(ready, system_len_hint)
            # A prefill is due once full (streams or token budget), or once its oldest chunk has waited
            # batch_timeout_s for more streams to join; until then decode steps run (or the idle engine waits).
            full = len(step.streams) < len(ready) or len(step.streams) >= self.cfg.max_batch_size
            if full or now - ready[0].chunks[0].arrival >= self.cfg.batch_timeout_s:
                return step
        if decoding:
            return self._decode(decoding)
        return None

    def wait_hint(self, streams: list[Stream], now: float) -> float | None:
        """Seconds until a held-back prefill batch is due (None: nothing held back)."""
        arrivals = [s.chunks[0].arrival for s in streams if s.ready_for_prefill]
        if not arrivals:
            return None
        return max(0.0, min(arrivals) + self.cfg.batch_timeout_s - now)

    def _prefill(self, ready: list[Stream], system_len_hint: int) -> ScheduledStep:
        chosen, tokens = [], 0
        for stream in ready:
            need = prompt_tokens(stream, system_len_hint)
            if chosen and (len(chosen) >= self.cfg.max_batch_size or tokens + need > self.cfg.max_prefill_tokens):
                break
            chosen.append(stream)
            tokens += need
        return ScheduledStep(PREFILL, chosen, len(chosen), tokens)

    def _decode(self, decoding: list[Stream]) -> ScheduledStep:
        chosen, rows = [], 0
        for stream in decoding:
            n = len(stream.turn.rows)
            if chosen and rows + n > self.cfg.max_batch_size:
                break
            chosen.append(stream)
            rows += n
        return ScheduledStep(DECODE, chosen, rows, rows)


def worst_case_pages(
    cfg: EngineConfig, m: int, beam_size: int, system_len: int, prompt_tokens: tuple[int, int] | None = None
) -> int:
    """Upper bound on the KV pages one stream can ever hold at once.

    The committed cache never exceeds S + window after eviction (S + the last turn, if one turn is longer than the
    window); a turn adds its prompt and up to 10m generated tokens. ``prompt_tokens``: the lengths of the stream's
    first and later turn prompts; without them every turn is taken to be as long as S + 12m + 10, with a page of
    slack. Beams share that prefix copy-on-write; each live beam and each finished hypothesis (at most
    ``beam_size`` of each) holds at most its own generated tokens plus one copied partial page.
    """
    page = cfg.page_size
    max_new = TOKENS_PER_UNIT * m
    if prompt_tokens is None:
        turn_prompt = system_len + EMBEDDINGS_PER_UNIT * m + 10
        shared = math.ceil((system_len + cfg.max_llm_cache_tokens + turn_prompt + max_new) / page)
    else:
        first, later = prompt_tokens
        committed = system_len + max(cfg.max_llm_cache_tokens, later + max_new)
        shared = math.ceil((max(first, committed + later) + max_new) / page)
    if beam_size == 1:
        return shared + (prompt_tokens is None)  # the page of slack of the estimate without prompt lengths
    per_hypothesis = math.ceil(max_new / page) + 1
    return shared + 2 * beam_size * per_hypothesis


class Admission:
    """Reserves worst-case pages and a stream slot per open stream (thread-safe use is the caller's job)."""

    def __init__(self, cfg: EngineConfig, total_pages: int):
        self.cfg = cfg
        self.total_pages = total_pages
        self.reserved_pages = 0
        self.open_streams = 0

    def admit(self, pages: int) -> None:
        if self.open_streams >= self.cfg.max_streams:
            raise CapacityError(
                f"instance at capacity: {self.open_streams} streams open (max_streams={self.cfg.max_streams}); "
                "retry later or on another instance"
            )
        if self.reserved_pages + pages > self.total_pages:
            free = self.total_pages - self.reserved_pages
            raise CapacityError(
                f"instance at capacity: KV memory full ({free} of {self.total_pages} pages unreserved, "
                f"a new stream needs {pages}); retry later or on another instance"
            )
        self.reserved_pages += pages
        self.open_streams += 1

    def release(self, pages: int) -> None:
        self.reserved_pages -= pages
        self.open_streams -= 1
