"""Responses: engine error codes as Triton errors, and the per-stream ordering of every request's responses with
exactly one FINAL each (:class:`ResponseBook`)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infinisst_backend.engine.events import RequestDone, StreamError, StreamFinished, TextDelta
from infinisst_backend.serving.requests import StreamKey

# Engine error code -> Triton error code (interface.md: an unknown stream is an INVALID_ARG for the client).
TRITON_CODES = {
    "INVALID_ARG": "INVALID_ARG",
    "UNAVAILABLE": "UNAVAILABLE",
    "NOT_FOUND": "INVALID_ARG",
    "CANCELLED": "CANCELLED",
    "INTERNAL": "INTERNAL",
}


def triton_code(engine_code: str) -> str:
    return TRITON_CODES.get(engine_code, "INTERNAL")


def error_message(engine_code: str, message: str) -> str:
    """The client-visible message. gRPC streaming carries only the message, so it starts with the code."""
    return f"{triton_code(engine_code)}: {message}"


def triton_error(pb: Any, engine_code: str, message: str) -> Any:
    code = triton_code(engine_code)
    return pb.TritonError(error_message(engine_code, message), getattr(pb.TritonError, code))


@dataclass(slots=True, eq=False)
class RequestHandle:
    """One Triton request from submission to its FINAL; the engine's ``tag`` for its audio."""

    key: StreamKey
    sender: Any  # pb_utils.InferenceResponseSender
    submitted: float = field(default_factory=time.monotonic)
    texts: list[str] = field(default_factory=list)  # committed text not sent yet
    source_seconds: float = 0.0
    error: tuple[str, str] | None = None  # (engine code, message)
    finished: bool = False


@dataclass(frozen=True, slots=True)
class Rejected:
    """execute() refused the request (engine raised): it gets an error, then FINAL, in its stream's order."""

    handle: RequestHandle
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Restarted:
    """A START arrived for a sequence id whose stream is still open: that stream is cancelled for this reason.

    Queued before the cancellation, so the stream's CANCELLED errors carry ``message`` instead of a bare
    "was cancelled".
    """

    key: StreamKey
    message: str


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One response to send. kind: "text" (TEXT/RESPONSE_INDEX/SOURCE_SECONDS), "error" or "final"."""

    sender: Any
    kind: str
    text: str = ""
    index: int = -1
    source_seconds: float = 0.0
    code: str = ""
    message: str = ""


class ResponseBook:
    """Orders responses per stream and numbers them; guarantees exactly one FINAL per request.

    Requests of a stream are released strictly in submission order: a request's responses go out only after
    the previous request's FINAL, even when a later request was rejected at once. Text that arrives for the
    head request is sent at the next ``collect()``; consecutive pieces are merged into one response.
    Used by the response thread only.
    """

    def __init__(self) -> None:
        self._queues: dict[StreamKey, deque[RequestHandle]] = {}
        self._next_index: dict[StreamKey, int] = {}  # per stream, for its whole life
        self._ended: set[StreamKey] = set()  # StreamFinished seen: forget the stream once its queue is empty
        self._dirty: dict[StreamKey, None] = {}  # insertion-ordered set
        self._cancel_reasons: dict[StreamKey, str] = {}  # Restarted streams, until they finish

    def submit(self, handle: RequestHandle) -> None:
        self._queues.setdefault(handle.key, deque()).append(handle)
        self._dirty[handle.key] = None

    def apply(self, item: object) -> None:
        """Apply a Rejected or Restarted item or an engine event (TurnEnded is ignored here)."""
        if isinstance(item, Restarted):
            if item.key in self._queues and item.key not in self._ended:  # else nothing of it is left to answer
                self._cancel_reasons[item.key] = item.message
            return
        if isinstance(item, StreamFinished):
            self._ended.add(item.stream_id)
            self._cancel_reasons.pop(item.stream_id, None)
            self._dirty[item.stream_id] = None
            return
        if isinstance(item, Rejected):
            handle = item.handle
            self._fail(handle, item.code, item.message)
        elif isinstance(item, (TextDelta, RequestDone, StreamError)):
            handle = item.tag
            if isinstance(item, TextDelta):
                handle.texts.append(item.text)
                handle.source_seconds = item.source_seconds
            elif isinstance(item, RequestDone):
                handle.finished = True
            elif item.code == "CANCELLED" and item.stream_id in self._cancel_reasons:
                self._fail(handle, item.code, self._cancel_reasons[item.stream_id])
            else:
                self._fail(handle, item.code, item.message)
        else:
            return
        self._dirty[handle.key] = None

    def _fail(self, handle: RequestHandle, code: str, message: str) -> None:
        if not handle.finished:
            handle.error = (code, message)
            handle.finished = True

    def collect(self) -> list[Outgoing]:
        """Responses that may go out now, in order."""
        out: list[Outgoing] = []
        for key in self._dirty:
            queue = self._queues.get(key)
            while queue:
                handle = queue[0]
                if handle.texts:
                    index = self._next_index.get(key, 0)
                    self._next_index[key] = index + 1
                    text = "".join(handle.texts)
                    handle.texts.clear()
                    out.append(Outgoing(handle.sender, "text", text, index, handle.source_seconds))
                if not handle.finished:
                    break
                if handle.error is not None:
                    out.append(Outgoing(handle.sender, "error", code=handle.error[0], message=handle.error[1]))
                out.append(Outgoing(handle.sender, "final"))
                queue.popleft()
            if queue is not None and not queue:
                del self._queues[key]
            if key in self._ended and key not in self._queues:
                self._ended.discard(key)
                self._next_index.pop(key, None)
        self._dirty.clear()
        return out

    def heads(self) -> list[RequestHandle]:
        """The oldest unfinished request of every stream (the ones worth asking about cancellation)."""
        return [queue[0] for queue in self._queues.values() if queue]

    def fail_all(self, code: str, message: str) -> None:
        """Finish every open request with an error (shutdown): ``collect()`` then yields their FINALs."""
        for key, queue in self._queues.items():
            for handle in queue:
                self._fail(handle, code, message)
            self._dirty[key] = None

    def __len__(self) -> int:
        """Open requests."""
        return sum(len(q) for q in self._queues.values())


def build_response(out: Outgoing, pb: Any) -> Any:
    """The pb_utils.InferenceResponse of a "text" or "error" item."""
    if out.kind == "error":
        return pb.InferenceResponse(error=triton_error(pb, out.code, out.message))
    return pb.InferenceResponse(
        output_tensors=[
            pb.Tensor("TEXT", np.array([[out.text.encode("utf-8")]], dtype=np.object_)),
            pb.Tensor("RESPONSE_INDEX", np.array([[out.index]], dtype=np.int32)),
            pb.Tensor("SOURCE_SECONDS", np.array([[out.source_seconds]], dtype=np.float32)),
        ]
    )


def send(out: Outgoing, pb: Any) -> None:
    """Send one item; raises what the sender raises (e.g. the request was cancelled)."""
    if out.kind == "final":
        out.sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    else:
        out.sender.send(build_response(out, pb))
