"""Triton requests of the wire contract (docs/interface.md): request flags, parsing with clear errors, and the
registry of live streams by correlation id."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from infinisst_backend.errors import InvalidArgument, UnknownStream

# Triton request flags (TRITONSERVER_REQUEST_FLAG_SEQUENCE_START / _END).
FLAG_SEQUENCE_START = 1
FLAG_SEQUENCE_END = 2


@dataclass(slots=True)
class AudioRequest:
    """One Triton request of the wire contract (docs: interface.md), parsed and checked for shape and type."""

    end: bool
    audio: np.ndarray  # float32 [n]; a view of the request's input (the engine copies it)
    language: str | None  # only read on START
    latency_multiplier: int | None  # only read on START


def parse_request(request: Any, pb: Any) -> AudioRequest:
    """Parse a Triton request; raises InvalidArgument naming the bad input."""
    corrid = request.correlation_id()
    if corrid in (0, ""):
        raise InvalidArgument("requests to this model need a non-zero sequence_id (one per audio stream)")
    flags = request.flags()
    audio = _single_row("AUDIO", _input(request, pb, "AUDIO"))
    if audio is None:
        raise InvalidArgument("input AUDIO is missing")
    if audio.dtype != np.float32:
        raise InvalidArgument(f"input AUDIO must be FP32, got {audio.dtype}")
    language = _single_row("TARGET_LANGUAGE", _input(request, pb, "TARGET_LANGUAGE"))
    multiplier = _single_row("LATENCY_MULTIPLIER", _input(request, pb, "LATENCY_MULTIPLIER"))
    return AudioRequest(
        end=bool(flags & FLAG_SEQUENCE_END),
        audio=audio.reshape(-1),
        language=None if language is None else _text("TARGET_LANGUAGE", language),
        latency_multiplier=None if multiplier is None else _integer("LATENCY_MULTIPLIER", multiplier),
    )


def _input(request: Any, pb: Any, name: str) -> np.ndarray | None:
    tensor = pb.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _single_row(name: str, array: np.ndarray | None) -> np.ndarray | None:
    """Strip the batch dimension: every request of a sequence carries exactly one row."""
    if array is None:
        return None
    if array.ndim < 1 or array.shape[0] != 1:
        raise InvalidArgument(f"input {name} must have batch size 1 (one stream per request), got shape {array.shape}")
    return array[0]


def _text(name: str, row: np.ndarray) -> str:
    if row.size != 1:
        raise InvalidArgument(f"input {name} must hold one string, got {row.size}")
    value = row.reshape(-1)[0]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(f"input {name} is not valid UTF-8") from None
    return str(value).strip()


def _integer(name: str, row: np.ndarray) -> int:
    if row.size != 1 or row.dtype.kind not in "iu":
        raise InvalidArgument(f"input {name} must hold one integer, got {row.size} value(s) of {row.dtype}")
    return int(row.reshape(-1)[0])


@dataclass(frozen=True, slots=True)
class StreamKey:
    """The engine's id for one Triton sequence: the correlation id plus a serial number.

    A START for a correlation id that is still being served (its END request decoding, or abandoned by the
    client) begins a new stream under a new key, so the two never mix. The engine names streams in error
    messages with ``repr``, which shows the client's sequence id only.
    """

    corrid: int | str
    serial: int

    def __repr__(self) -> str:
        return str(self.corrid)


class StreamRegistry:
    """Correlation id -> the engine stream that currently serves it. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: dict[int | str, StreamKey] = {}
        self._serials = itertools.count(1)

    def start(self, corrid: int | str) -> tuple[StreamKey, StreamKey | None]:
        """A new key for a START request, and the key it replaces (None if the id was free)."""
        key = StreamKey(corrid, next(self._serials))
        with self._lock:
            previous = self._current.get(corrid)
            self._current[corrid] = key
        return key, previous

    def lookup(self, corrid: int | str) -> StreamKey:
        with self._lock:
            key = self._current.get(corrid)
        if key is None:
            raise UnknownStream(f"stream {corrid} is not open (never started, ended, or expired); start a new sequence")
        return key

    def forget(self, key: StreamKey) -> None:
        """The stream ended: drop the id, unless a newer START already took it over."""
        with self._lock:
            if self._current.get(key.corrid) == key:
                del self._current[key.corrid]

    def orphan(self, corrid: int | str) -> StreamKey:
        """A key for a request that could not be resolved (its responses are ordered on their own)."""
        return StreamKey(corrid, next(self._serials))

    def __len__(self) -> int:
        with self._lock:
            return len(self._current)
