"""Events the engine emits for the serving layer. All are plain frozen dataclasses.

``tag`` is whatever the caller passed with the audio (the Triton layer passes its request handle), so every
event can be routed to the request whose audio caused it.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Newly committed translation text (never a split UTF-8 character; may be empty only at turn end)."""

    stream_id: Hashable
    tag: Any
    text: str
    source_seconds: float  # seconds of source audio read when the text was committed


@dataclass(frozen=True, slots=True)
class TurnEnded:
    stream_id: Hashable
    tag: Any
    token_ids: tuple[int, ...]  # the turn's emitted ids (EOS / last unfed token dropped)
    chunk_latency_s: float  # from the chunk's last sample reaching the engine to the turn's end


@dataclass(frozen=True, slots=True)
class RequestDone:
    """Everything caused by the audio passed with ``tag`` has been emitted; send the request's FINAL."""

    stream_id: Hashable
    tag: Any


@dataclass(frozen=True, slots=True)
class StreamFinished:
    """The stream ended (END processed, cancelled, expired or failed) and all its memory is freed."""

    stream_id: Hashable
    reason: str  # "end" | "cancelled" | "expired" | "error" | "shutdown"


@dataclass(frozen=True, slots=True)
class StreamError:
    """Processing of the stream failed; it is freed. ``code`` as in errors.EngineError."""

    stream_id: Hashable
    tag: Any
    code: str
    message: str


Event = TextDelta | TurnEnded | RequestDone | StreamFinished | StreamError
