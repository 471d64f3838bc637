"""Per-stream state: audio buffering into chunks, the request FIFO, caches, the running turn, eviction.

A stream is one speaker's audio. Audio arrives in pieces of any size; the stream cuts it into chunks of
0.96 s x m (the policy's read unit). Each chunk triggers one LLM turn, and a stream's next chunk waits until
its current turn has ended. Everything here runs on the engine thread only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infinisst_backend.config import SAMPLE_RATE, SAMPLES_PER_UNIT, TOKENS_PER_UNIT, DecodingConfig

# A stream shorter than this in total is finished without a turn (docs/model.md §6.5).
MIN_SOURCE_SAMPLES = int(0.32 * SAMPLE_RATE)


@dataclass(slots=True)
class PendingRequest:
    """One add_audio call; done once every chunk it completed has finished its turn."""

    tag: Any
    open_chunks: int = 0


@dataclass(slots=True)
class Chunk:
    """Audio that triggers one turn: 15360*m samples, or fewer for the stream's final chunk."""

    samples: np.ndarray  # float32 [n]
    request: PendingRequest  # the request whose audio completed this chunk
    arrival: float  # monotonic time its last sample reached the engine
    source_seconds: float  # source read once this chunk is read
    final: bool


@dataclass(slots=True)
class Turn:
    """The assistant turn in flight: one row per live hypothesis (greedy: one)."""

    chunk: Chunk
    decoder: Any  # decoding.TurnDecoder
    rows: list  # list[SequenceKV], the caches of the current rows
    tokens: list[int]  # the token each row feeds at the next decode step
    snapshots: list = field(default_factory=list)  # SequenceKV of finished hypotheses
    committed: int = 0  # emitted ids already streamed to the detokenizer
    started: float = 0.0  # the engine clock's time when the turn was prefilled (the scheduler's decode order)

    def release(self) -> None:
        """Drop the turn's caches (its rows and finished hypotheses)."""
        for seq in self.rows + self.snapshots:
            seq.release()
        self.rows, self.snapshots = [], []


@dataclass(slots=True)
class Stream:
    id: Hashable
    language: str
    m: int
    decoding: DecodingConfig
    separator: str
    speech_cache: Any  # speech_cache.SpeechCache
    kv: Any  # kv_cache.SequenceKV: the committed LLM cache (turns so far)
    detok: Any  # detokenizer.IncrementalDetokenizer
    reserved_pages: int
    buffer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    chunks: deque[Chunk] = field(default_factory=deque)
    requests: deque[PendingRequest] = field(default_factory=deque)
    turn: Turn | None = None
    system_len: int = 0  # S, once the first turn has been prefilled
    turns_done: int = 0
    samples_read: int = 0  # source samples cut into chunks so far
    ended: bool = False  # END received: no more audio
    checkpoints: list[int] = field(default_factory=list)  # cache lengths at turn ends (eviction)
    history: deque[int] = field(default_factory=deque)  # recent emitted target ids

    @property
    def chunk_samples(self) -> int:
        return SAMPLES_PER_UNIT * self.m

    @property
    def max_new_tokens(self) -> int:
        return TOKENS_PER_UNIT * self.m

    def add_audio(self, samples: np.ndarray, tag: Any, end: bool, now: float) -> None:
        """Buffer samples, cut complete chunks, and record the request they belong to."""
        request = PendingRequest(tag)
        self.requests.append(request)
        if samples.size:
            self.buffer = np.concatenate([self.buffer, samples])
        while self.buffer.size >= self.chunk_samples:
            self._cut_chunk(self.chunk_samples, request, now, final=False)
        if end:
            self.ended = True
            total = self.samples_read + self.buffer.size
            if self.buffer.size and total >= MIN_SOURCE_SAMPLES:
                self._cut_chunk(self.buffer.size, request, now, final=True)
            self.buffer = np.zeros(0, np.float32)

    def _cut_chunk(self, n: int, request: PendingRequest, now: float, final: bool) -> None:
        samples, self.buffer = self.buffer[:n], self.buffer[n:]
        self.samples_read += n
        request.open_chunks += 1
        self.chunks.append(Chunk(samples, request, now, self.samples_read / SAMPLE_RATE, final))

    def pop_done_requests(self) -> list[Any]:
        """Tags of leading requests with no open chunks, in order (their FINAL can go out)."""
        done = []
        while self.requests and self.requests[0].open_chunks == 0:
            done.append(self.requests.popleft().tag)
        return done

    def close_chunk(self, chunk: Chunk) -> None:
        """The chunk's turn has ended: its request has one open chunk fewer."""
        chunk.request.open_chunks -= 1

    def remember_target(self, ids: list[int], lookback: int) -> None:
        self.history.extend(ids)
        while len(self.history) > lookback:
            self.history.popleft()

    @property
    def ready_for_prefill(self) -> bool:
        return self.turn is None and bool(self.chunks)

    @property
    def finished(self) -> bool:
        """END received and every chunk has been translated."""
        return self.ended and self.turn is None and not self.chunks

    @property
    def idle(self) -> bool:
        return self.turn is None and not self.chunks and not self.requests


def eviction_cut(checkpoints: list[int], length: int, window: int, system_len: int) -> int | None:
    """The paper's turn-aligned sliding window (docs/model.md §5.4), per stream.

    ``checkpoints`` holds the cache length after each turn (the current one last). Returns the cache index
    where the retained tail starts (a turn boundary), or None when nothing is evicted, and rewrites
    ``checkpoints`` in place for the compacted cache. The system prompt [0, system_len) is always kept.
    """
    if length <= window:
        return None
    # The first (oldest) turn boundary whose tail fits the window; the last checkpoint is `length` itself.
    i = next(k for k, c in enumerate(checkpoints) if length - c <= window)
    c = checkpoints[i]
    if c >= length:
        # Even the last turn alone exceeds the window (only with tiny test windows): keep just that turn.
        if i == 0:
            return None
        i -= 1
        c = checkpoints[i]
    trim = c - system_len
    del checkpoints[: i + 1]
    checkpoints[:] = [x - trim for x in checkpoints]
    return c
