"""Errors the engine raises or reports. The Triton layer maps ``code`` to a Triton error code."""

from __future__ import annotations


class EngineError(Exception):
    """Base class. ``code`` is one of INVALID_ARG, UNAVAILABLE, NOT_FOUND, INTERNAL (a CANCELLED stream is only
    reported, as a StreamError event, never raised)."""

    code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(EngineError, ValueError):
    """Bad request content: the stream's state is left unchanged."""

    code = "INVALID_ARG"


class CapacityError(EngineError):
    """No room for a new stream (stream slots or KV memory); running streams are unaffected."""

    code = "UNAVAILABLE"


class UnknownStream(EngineError, KeyError):
    """The stream id is not open (never started, already ended, cancelled or idle-expired)."""

    code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message
