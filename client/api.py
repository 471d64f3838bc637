"""Streaming client of the ``infinisst`` model (wire contract: docs/interface.md).

One :class:`StreamingClient` holds one gRPC bidirectional stream (Triton's ``ModelStreamInfer``) and carries
any number of audio streams over it; each :class:`AudioStream` is one Triton sequence. Text arrives while
audio is still being sent and is handed out in ``RESPONSE_INDEX`` order.

It speaks the gRPC protocol directly (``tritonclient.grpc`` messages) rather than through
``InferenceServerClient.start_stream``, because only the raw response tells which request an error belongs
to (its id) and whether it was the request's last response.

Example::

    with StreamingClient("localhost:8001") as client:
        stream = client.open_stream(language="de")
        for piece in pieces:
            stream.send(piece)
        stream.end()
        result = stream.result(timeout=60)
        print(result.text)
"""

from __future__ import annotations

import itertools
import logging
import queue
import random
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
SAMPLES_PER_UNIT = 15_360  # one latency unit: 0.96 s; a chunk is m units


class ServerError(RuntimeError):
    """An error response. ``code`` is the Triton code the model put in front of its message (or "")."""

    def __init__(self, message: str, request_index: int | None = None):
        super().__init__(message)
        self.message = message
        self.request_index = request_index
        head, sep, _ = message.partition(": ")
        self.code = head if sep and head.isupper() and " " not in head else ""


@dataclass(frozen=True, slots=True)
class TextPiece:
    """One TEXT response."""

    text: str
    index: int  # RESPONSE_INDEX
    source_seconds: float  # audio the model had read when it committed the text
    received: float  # time.monotonic() on arrival
    request_index: int  # the request (0, 1, ... within the stream) whose response carried it


@dataclass(slots=True)
class RequestRecord:
    """One request of a stream: what it carried and when its FINAL came back."""

    samples: int
    end_sample: int  # cumulative samples of the stream after this request
    end: bool
    sent: float
    done: float | None = None  # arrival of its FINAL
    error: ServerError | None = None
    finals: int = 0  # FINAL responses received (the contract says exactly one)


@dataclass(slots=True)
class StreamResult:
    """A finished stream: its translation, responses and timings."""

    sequence_id: int
    text: str
    pieces: list[TextPiece]
    requests: list[RequestRecord]
    errors: list[ServerError]
    started: float | None  # time.monotonic() of the first send
    chunk_samples: int

    @property
    def first_response_s(self) -> float | None:
        """From the first request sent to the first non-empty text."""
        first = next((p for p in self.pieces if p.text), None)
        return None if first is None or self.started is None else first.received - self.started

    def chunk_latencies(self) -> list[float]:
        """Per-chunk latency as the client sees it: for each request whose audio completed a chunk (or ended the
        stream with a partial one), from sending it to its FINAL, which follows the chunk's translation turn."""
        out, previous = [], 0
        for r in self.requests:
            crossed = r.end_sample // self.chunk_samples > previous // self.chunk_samples
            tail = r.end and r.end_sample % self.chunk_samples != 0
            if (crossed or tail) and r.done is not None and r.error is None:
                out.append(r.done - r.sent)
            previous = r.end_sample
        return out

    def text_delays(self) -> list[float]:
        """Computation-aware delay of each text piece: arrival minus the moment its source audio had been
        spoken, assuming real-time sending (the first request left when its last sample was spoken)."""
        if self.started is None or not self.requests:
            return []
        speech_start = self.started - self.requests[0].samples / SAMPLE_RATE
        return [p.received - (speech_start + p.source_seconds) for p in self.pieces if p.text]


class AudioStream:
    """One audio stream (Triton sequence). Create with :meth:`StreamingClient.open_stream`.

    ``send`` may be called from any thread; the first call carries START (and the language and latency
    multiplier), ``end()`` (or ``send(..., end=True)``) carries END. ``on_text`` is called from the client's
    reader thread for each piece, in RESPONSE_INDEX order.
    """

    def __init__(
        self,
        client: StreamingClient,
        sequence_id: int,
        language: str | None,
        latency_multiplier: int | None,
        on_text: Callable[[AudioStream, TextPiece], None] | None,
        resume: bool = False,
    ):
        self.client = client
        self.sequence_id = sequence_id
        self.language = language
        self.latency_multiplier = latency_multiplier
        self.on_text = on_text
        self.resume = resume
        self.key = next(client._keys)  # request ids are "<key>/<request index>": unique on this connection
        self._lock = threading.Lock()
        self._finals = threading.Condition(self._lock)
        self._requests: list[RequestRecord] = []
        self._samples = 0
        self._ended = False
        self._started: float | None = None
        self._pieces: list[TextPiece] = []  # released, in index order
        self.arrivals: list[TextPiece] = []  # every TEXT response in arrival order (duplicates included)
        self._waiting: dict[int, TextPiece] = {}  # arrived ahead of a missing index
        self._errors: list[ServerError] = []
        self._open_requests = 0
        self._done = threading.Event()
        self._released: queue.SimpleQueue[TextPiece | None] = queue.SimpleQueue()

    @property
    def chunk_samples(self) -> int:
        return SAMPLES_PER_UNIT * (self.latency_multiplier or 1)

    def send(self, samples: np.ndarray, end: bool = False) -> None:
        """Send the next piece of audio (16 kHz mono float32 in [-1, 1], any length, may be empty)."""
        samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        with self._lock:
            if self._ended:
                raise RuntimeError(f"stream {self.sequence_id} has already ended")
            if self.client._closed:
                raise RuntimeError("the client is closed")
            start = not self._requests and not self.resume
            self._samples += samples.size
            self._ended = end
            now = time.monotonic()
            self._started = self._started if self._requests else now
            self._requests.append(RequestRecord(samples.size, self._samples, end, now))
            self._open_requests += 1
            # queued under the lock, so concurrent senders cannot put requests on the wire out of order
            self.client._send(self, len(self._requests) - 1, samples, start, end)

    def end(self) -> None:
        """End the stream: the server translates the rest of the buffered audio and frees the stream."""
        self.send(np.zeros(0, np.float32), end=True)

    # ---- called by the client's reader thread

    def _on_text(self, piece: TextPiece) -> None:
        with self._lock:
            self.arrivals.append(piece)
            self._waiting[piece.index] = piece
            released = []
            while len(self._pieces) in self._waiting:
                released.append(self._waiting.pop(len(self._pieces)))
                self._pieces.append(released[-1])
        for p in released:
            self._released.put(p)
            if self.on_text is not None:
                try:
                    self.on_text(self, p)
                except Exception:  # a faulty callback must not stop the reader thread
                    logger.exception("on_text callback failed")

    def _on_final(self, request_index: int, error: ServerError | None) -> None:
        with self._lock:
            record = self._requests[request_index]
            record.finals += 1
            if record.done is not None:
                return
            record.done = time.monotonic()
            record.error = record.error or error
            self._open_requests -= 1
            finished = self._ended and self._open_requests == 0
            self._finals.notify_all()
        if finished:
            self._done.set()
            self._released.put(None)

    def _on_error(self, error: ServerError) -> None:
        with self._lock:
            self._errors.append(error)
            if error.request_index is not None:
                self._requests[error.request_index].error = error

    def _abort(self, error: ServerError) -> None:
        """The connection failed: fail every open request."""
        with self._lock:
            self._errors.append(error)
            pending = [i for i, r in enumerate(self._requests) if r.done is None]
        for i in pending:
            self._on_final(i, error)
        self._done.set()
        self._released.put(None)

    # ---- results

    def pieces(self, timeout: float | None = None) -> Iterator[TextPiece]:
        """Yield text pieces as they arrive, in RESPONSE_INDEX order, until the stream has ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                piece = self._released.get(timeout=remaining)
            except queue.Empty:
                raise TimeoutError(f"stream {self.sequence_id}: no end within {timeout} s") from None
            if piece is None:
                return
            yield piece

    def done(self) -> bool:
        return self._done.is_set()

    def wait_request(self, index: int, timeout: float | None = None) -> RequestRecord:
        """Wait for the FINAL of the stream's ``index``-th request (0 is the first) and return its record."""
        with self._finals:
            if not self._finals.wait_for(lambda: self._requests[index].done is not None, timeout):
                raise TimeoutError(f"stream {self.sequence_id}: request {index} not finished within {timeout} s")
            return self._requests[index]

    def result(self, timeout: float | None = None) -> StreamResult:
        """Wait until every request of the ended stream has its FINAL; then the whole translation."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"stream {self.sequence_id}: not finished within {timeout} s")
        with self._lock:
            return StreamResult(
                sequence_id=self.sequence_id,
                text="".join(p.text for p in self._pieces),
                pieces=list(self._pieces),
                requests=list(self._requests),
                errors=list(self._errors),
                started=self._started,
                chunk_samples=self.chunk_samples,
            )


class StreamingClient:
    """A gRPC connection to Triton carrying many audio streams of one model."""

    def __init__(self, url: str = "localhost:8001", model: str = "infinisst", model_version: str = ""):
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        self.url = url
        self.model = model
        self.model_version = model_version
        self._pb = service_pb2
        self._channel = grpc.insecure_channel(
            url, options=[("grpc.max_send_message_length", 2**30), ("grpc.max_receive_message_length", 2**30)]
        )
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, AudioStream] = {}  # by AudioStream.key
        self._lock = threading.Lock()
        self._ids = itertools.count(random.randrange(1, 2**40) * 1000)
        self._keys = itertools.count(1)
        self._closed = False
        self._responses = self._stub.ModelStreamInfer(self._requests())
        self._reader = threading.Thread(target=self._read, name="infinisst-client-reader", daemon=True)
        self._reader.start()

    def __enter__(self) -> StreamingClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open_stream(
        self,
        sequence_id: int | None = None,
        language: str | None = None,
        latency_multiplier: int | None = None,
        on_text: Callable[[AudioStream, TextPiece], None] | None = None,
        resume: bool = False,
    ) -> AudioStream:
        """A new audio stream; nothing is sent until its first ``send``.

        ``resume=True`` continues a sequence the server already knows (its first request carries no START), e.g.
        after reconnecting; the server answers INVALID_ARG if it no longer knows the sequence.
        """
        sequence_id = next(self._ids) if sequence_id is None else int(sequence_id)
        if not 0 < sequence_id < 2**63:
            raise ValueError(f"sequence_id must be in 1..2**63-1, got {sequence_id}")
        stream = AudioStream(self, sequence_id, language, latency_multiplier, on_text, resume)
        with self._lock:
            self._streams[stream.key] = stream
        return stream

    def close(self) -> None:
        """Close the connection. The server cancels the requests still in flight and frees their streams, so
        wait for ``result()`` of every stream first unless that is what you want."""
        if self._closed:
            return
        self._closed = True
        self._outbox.put(None)
        self._responses.cancel()
        self._reader.join(timeout=5.0)
        self._channel.close()

    # ---- wire

    def _send(self, stream: AudioStream, index: int, samples: np.ndarray, start: bool, end: bool) -> None:
        if self._closed:
            raise RuntimeError("the client is closed")
        pb = self._pb
        request = pb.ModelInferRequest(
            model_name=self.model, model_version=self.model_version, id=f"{stream.key}/{index}"
        )
        request.parameters["sequence_id"].int64_param = stream.sequence_id
        request.parameters["sequence_start"].bool_param = start
        request.parameters["sequence_end"].bool_param = end
        request.parameters["triton_enable_empty_final_response"].bool_param = True
        _add_input(request, "AUDIO", "FP32", [1, samples.size], samples.tobytes())
        if start and stream.language is not None:
            raw = stream.language.encode("utf-8")
            _add_input(request, "TARGET_LANGUAGE", "BYTES", [1, 1], struct.pack("<I", len(raw)) + raw)
        if start and stream.latency_multiplier is not None:
            raw = np.array([stream.latency_multiplier], np.int32).tobytes()
            _add_input(request, "LATENCY_MULTIPLIER", "INT32", [1, 1], raw)
        self._outbox.put(request)

    def _requests(self) -> Iterator:
        while True:
            request = self._outbox.get()
            if request is None:
                return
            yield request

    def _read(self) -> None:
        from tritonclient.grpc import InferResult

        try:
            for response in self._responses:
                try:
                    self._dispatch(response, InferResult)
                except Exception as e:  # a response this client cannot read fails its own stream only
                    self._undecodable(response, e)
        except Exception as e:  # the connection broke, or close() cancelled it with streams open
            reason = "was closed" if self._closed else f"failed: {e}"
            error = ServerError(f"UNAVAILABLE: the gRPC stream to {self.url} {reason}")
            with self._lock:
                streams = [s for s in self._streams.values() if not s.done()]
            for stream in streams:
                stream._abort(error)

    def _stream_of(self, key: str) -> AudioStream | None:
        """The open stream whose request ids start with ``key`` ("<key>/<request index>")."""
        with self._lock:
            return self._streams.get(int(key)) if key.isdigit() else None

    def _undecodable(self, response, e: Exception) -> None:
        stream = self._stream_of(response.infer_response.id.partition("/")[0])
        logger.exception("cannot read a response of stream %s", getattr(stream, "sequence_id", "?"))
        if stream is not None:
            stream._abort(ServerError(f"INTERNAL: the client cannot read a response: {type(e).__name__}: {e}"))

    def _dispatch(self, response, infer_result_type) -> None:
        infer = response.infer_response
        key, _, index = infer.id.partition("/")
        stream = self._stream_of(key)
        if stream is None or not index.isdigit():
            return
        request_index = int(index)
        final_param = infer.parameters.get("triton_final_response")
        # Triton's own rejections (e.g. "must specify the START flag") carry no final flag: nothing follows.
        final = final_param.bool_param if final_param is not None else bool(response.error_message)
        error = None
        if response.error_message:
            error = ServerError(response.error_message, request_index)
            stream._on_error(error)
        elif infer.outputs:
            result = infer_result_type(infer)
            text = _first_bytes(infer, "TEXT")
            if text is None:
                text = result.as_numpy("TEXT").reshape(-1)[0]
            stream._on_text(
                TextPiece(
                    text=text.decode("utf-8") if isinstance(text, bytes) else str(text),
                    index=int(result.as_numpy("RESPONSE_INDEX").reshape(-1)[0]),
                    source_seconds=float(result.as_numpy("SOURCE_SECONDS").reshape(-1)[0]),
                    received=time.monotonic(),
                    request_index=request_index,
                )
            )
        if final:
            stream._on_final(request_index, error)
            if stream.done():
                with self._lock:
                    self._streams.pop(stream.key, None)


def _first_bytes(infer, name: str) -> bytes | None:
    """The first element of BYTES output ``name`` read from the raw contents (a 4-byte little-endian length, then
    the bytes), or None when the response carries no raw contents. tritonclient's own decoding differs between
    releases for an empty string (2.73 returns no element at all), and TEXT is often empty. tritonserver 2.51
    may also send an empty string as an empty buffer, without its length prefix (seen on the GPU machine)."""
    index = next((i for i, out in enumerate(infer.outputs) if out.name == name), None)
    if index is None or index >= len(infer.raw_output_contents):
        return None
    raw = infer.raw_output_contents[index]
    if len(raw) < 4:
        return b""
    (length,) = struct.unpack_from("<I", raw, 0)
    return bytes(raw[4 : 4 + length])


def _add_input(request, name: str, datatype: str, shape: list[int], raw: bytes) -> None:
    tensor = request.inputs.add()
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend(shape)
    request.raw_input_contents.append(raw)
