"""Iteration-level (ORCA-style) scheduling policy: which streams form the next step.

Each engine step is one phase only:
- **prefill**: streams whose next chunk is waiting and who have no turn running, first come first served by
  the chunk's arrival, up to ``max_batch_size`` streams and ``max_prefill_tokens`` prompt tokens;
- **decode**: one token for every row of every stream in a turn (a beam-4 stream has 4 rows), oldest turn
  first, up to ``max_batch_size`` rows.
Prefill runs first whenever a prefill batch is due: when it is full (``max_batch_size`` streams or
``max_prefill_tokens`` tokens), or when its oldest chunk has waited ``batch_timeout_s`` for more streams to join
(0: at once). While a batch fills, decode steps run. New work joins at the next step.

The policy is a pure function of the streams' state: it never changes a stream, and it sees streams and token
counts, never tensors. Admission (worst-case memory reserved at stream start) is :mod:`.admission`.
"""

from __future__ import annotations

from dataclasses import dataclass

from infinisst_backend.config import EMBEDDINGS_PER_UNIT, EngineConfig
from infinisst_backend.engine.stream import Stream

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
    time: float  # the engine clock's time when the step was scheduled


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
        if ready:
            step = self.prefill_step(ready, system_len_hint)
            # A prefill is due once full (streams or token budget), or once its oldest chunk has waited
            # batch_timeout_s for more streams to join; until then decode steps run (or the idle engine waits).
            full = len(step.streams) < len(ready) or len(step.streams) >= self.cfg.max_batch_size
            if full or now - ready[0].chunks[0].arrival >= self.cfg.batch_timeout_s:
                return step
        if decoding:
            return self.decode_step(decoding)
        return None

    def wait_hint(self, streams: list[Stream], now: float) -> float | None:
        """Seconds until a held-back prefill batch is due (None: nothing held back)."""
        arrivals = [s.chunks[0].arrival for s in streams if s.ready_for_prefill]
        if not arrivals:
            return None
        return max(0.0, min(arrivals) + self.cfg.batch_timeout_s - now)

    def prefill_step(self, ready: list[Stream], system_len_hint: int) -> ScheduledStep:
        """Prefill the oldest ready streams, up to ``max_batch_size`` streams and ``max_prefill_tokens`` tokens."""
        chosen, tokens = [], 0
        for stream in ready:
            need = prompt_tokens(stream, system_len_hint)
            if chosen and (len(chosen) >= self.cfg.max_batch_size or tokens + need > self.cfg.max_prefill_tokens):
                break
            chosen.append(stream)
            tokens += need
        return ScheduledStep(PREFILL, chosen, len(chosen), tokens)

    def decode_step(self, decoding: list[Stream]) -> ScheduledStep:
        """One token for every row of the oldest turns, up to ``max_batch_size`` rows."""
        chosen, rows = [], 0
        for stream in decoding:
            n = len(stream.turn.rows)
            if chosen and rows + n > self.cfg.max_batch_size:
                break
            chosen.append(stream)
            rows += n
        return ScheduledStep(DECODE, chosen, rows, rows)
