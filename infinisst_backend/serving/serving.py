"""The Triton layer's pure-Python parts: config parameters, request parsing, error codes, response bookkeeping.

``model_repository/infinisst/1/model.py`` wires these to Triton's Python backend and to the engine. Nothing
here imports ``triton_python_backend_utils``: functions that build Triton objects take the module as an
argument (``pb``), so every piece runs and is tested with a fake.

Threads (see model.py): Triton's thread calls ``execute()``, which parses requests, resolves the stream and
calls the engine; the engine thread reports events through a queue; one response thread feeds the queue's
items to a :class:`ResponseBook` and sends what it releases, in order.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from infinisst_backend.config import DecodingConfig, EngineConfig
from infinisst_backend.engine.events import RequestDone, StreamError, StreamFinished, TextDelta
from infinisst_backend.errors import InvalidArgument, UnknownStream

# Triton request flags (TRITONSERVER_REQUEST_FLAG_SEQUENCE_START / _END).
FLAG_SEQUENCE_START = 1
FLAG_SEQUENCE_END = 2

# ---------------------------------------------------------------------------------------------- configuration

# config.pbtxt parameter -> EngineConfig field, where the names differ (Triton has its own max_batch_size).
_RENAMED = {"engine_max_batch_size": "max_batch_size"}
# EngineConfig fields that are not parameters: the device follows the instance_group (KIND_CPU / KIND_GPU).
_NOT_PARAMETERS = {"device", "decoding"}


class ConfigError(ValueError):
    """A config.pbtxt parameter is missing, unknown or invalid; the message names it."""


@dataclass(slots=True)
class ServingConfig:
    """Everything the Triton layer reads from config.pbtxt parameters."""

    engine: EngineConfig
    checkpoint: Path  # resolved, absolute
    metrics_interval_s: float = 1.0  # how often the metrics thread reads engine.stats()
    cancel_poll_interval_s: float = 0.1  # how often the response thread asks whether requests were cancelled
    shutdown_timeout_s: float = 20.0  # engine.shutdown() budget in finalize (keep below Triton's exit timeout)
    # TEST ONLY (docs/reliability.md): "ID" or "ID@N", comma-separated; the stream of sequence ID raises an
    # injected error in its N-th decoding step (default 1). Empty in every real deployment.
    test_fault_sequence_ids: str = ""
    # BENCHMARK ONLY (dummy weights never emit EOT): a seed; every turn's length is drawn from the benchmark's
    # seeded distribution (forced_turns.TurnLengths). Empty in every real deployment.
    benchmark_forced_turn_seed: str = ""


_LAYER_FIELDS = {f.name for f in dataclasses.fields(ServingConfig)} - {"engine", "checkpoint"}


def _parameter_fields() -> dict[str, tuple[object, str]]:
    """Parameter name -> (config object default, field name) for every settable field."""
    engine, decoding, layer = EngineConfig(), DecodingConfig(), ServingConfig(EngineConfig(), Path())
    fields: dict[str, tuple[object, str]] = {}
    for f in dataclasses.fields(EngineConfig):
        if f.name not in _NOT_PARAMETERS:
            param = next((p for p, name in _RENAMED.items() if name == f.name), f.name)
            fields[param] = (engine, f.name)
    for f in dataclasses.fields(DecodingConfig):
        fields[f.name] = (decoding, f.name)
    for name in _LAYER_FIELDS:
        fields[name] = (layer, name)
    return fields


PARAMETERS = _parameter_fields()


def parameters_from_model_config(model_config: dict) -> dict[str, str]:
    """``{key: string_value}`` of the ``parameters`` section of Triton's model config (as JSON-decoded)."""
    params = {}
    for key, value in (model_config.get("parameters") or {}).items():
        params[key] = value.get("string_value", "") if isinstance(value, dict) else str(value)
    return params


def _convert(param: str, text: str, default: object) -> object:
    text = text.strip()
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}[type(default)]
        raise ConfigError(f"config.pbtxt parameter {param!r}: invalid value {text!r}, expected {kind}") from None
    return text


def resolve_checkpoint(value: str, project_root: Path) -> Path:
    """A checkpoint path: absolute, or relative to the project root (the folder holding infinisst_backend/)."""
    if not value.strip():
        raise ConfigError("config.pbtxt parameter 'checkpoint' is empty: give a checkpoint directory")
    path = Path(value.strip()).expanduser()
    if not path.is_absolute():
        path = project_root / path
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"config.pbtxt parameter 'checkpoint': no checkpoint at {path} (no config.json there); "
            "`make setup` builds the demo checkpoint, or give an absolute path"
        )
    return path


def serving_config_from_parameters(params: dict[str, str], device: str, project_root: Path) -> ServingConfig:
    """Build and validate the configuration; every problem raises ConfigError naming the parameter.

    Empty values mean "use the default". Upper-case keys (Triton's own, e.g. EXECUTION_ENV_PATH) are ignored;
    any other unknown key is an error, so a typo cannot silently fall back to a default.
    """
    unknown = sorted(k for k in params if k not in PARAMETERS and k != "checkpoint" and not k.isupper())
    if unknown:
        raise ConfigError(f"unknown config.pbtxt parameter(s) {unknown}; known: {sorted([*PARAMETERS, 'checkpoint'])}")
    engine, decoding = EngineConfig(device=device), DecodingConfig()
    layer: dict[str, Any] = {}
    for param, text in params.items():
        if param not in PARAMETERS or not text.strip():
            continue
        default_obj, name = PARAMETERS[param]
        value = _convert(param, text, getattr(default_obj, name))
        if isinstance(default_obj, EngineConfig):
            setattr(engine, name, value)
        elif isinstance(default_obj, DecodingConfig):
            setattr(decoding, name, value)
        else:
            layer[name] = value
    engine.decoding = decoding
    try:
        engine.validate()
    except ValueError as e:
        raise ConfigError(f"config.pbtxt parameter {_parameter_named_in(str(e))!r}: {e}") from None
    for name, value in layer.items():
        if isinstance(value, (int, float)) and value <= 0:
            raise ConfigError(f"config.pbtxt parameter {name!r}: invalid value {value!r}, expected > 0")
    parse_fault_ids(layer.get("test_fault_sequence_ids", ""))
    parse_forced_turn_seed(layer.get("benchmark_forced_turn_seed", ""))
    checkpoint = resolve_checkpoint(params.get("checkpoint", ""), project_root)
    return ServingConfig(engine=engine, checkpoint=checkpoint, **layer)


def _parameter_named_in(message: str) -> str:
    """The parameter behind a ``validate()`` message ("invalid <field>=<value>: ...")."""
    match = re.match(r"invalid (\w+)=", message)
    field_name = match.group(1) if match else "?"
    return next((p for p, name in _RENAMED.items() if name == field_name), field_name)


def parse_fault_ids(text: str) -> dict[str, int]:
    """``"7, 9@3"`` -> ``{"7": 1, "9": 3}``: sequence id -> the decoding step (from 1) at which its stream fails."""
    faults = {}
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        ident, at, step = (part.strip() for part in token.partition("@"))
        if not ident or (at and not (step.isdigit() and int(step) >= 1)):
            raise ConfigError(
                f"config.pbtxt parameter 'test_fault_sequence_ids': invalid entry {token!r}, expected ID or ID@STEP "
                "(STEP >= 1), comma-separated"
            )
        faults[ident] = int(step) if at else 1
    return faults


def parse_forced_turn_seed(text: str) -> int | None:
    """The ``benchmark_forced_turn_seed`` parameter: None when empty, else a non-negative integer seed."""
    text = text.strip()
    if not text:
        return None
    if not text.isdigit():
        raise ConfigError(
            f"config.pbtxt parameter 'benchmark_forced_turn_seed': invalid value {text!r}, expected a non-negative "
            "integer seed, or empty (off)"
        )
    return int(text)


class InjectedFault(RuntimeError):
    """The error the test-only fault hook raises inside one stream's processing."""


class FaultInjector:
    """``Engine.fault_hook`` for the test-only ``test_fault_sequence_ids`` parameter.

    Called as ``hook(stream_id)`` on the engine thread in each decoding step of each stream; raises
    :class:`InjectedFault` in the configured step of the streams of the listed sequence ids (every stream that
    uses such an id, counted per stream), so that only that stream fails.
    """

    def __init__(self, faults: dict[str, int]):
        self.faults = faults
        self._steps: dict[object, int] = {}  # stream key -> decoding steps seen (listed ids only)

    def __call__(self, stream_id: object) -> None:
        corrid = str(getattr(stream_id, "corrid", stream_id))
        fail_at = self.faults.get(corrid)
        if fail_at is None:
            return
        step = self._steps.get(stream_id, 0) + 1
        self._steps[stream_id] = step
        if step >= fail_at:
            del self._steps[stream_id]  # the stream fails now and is freed
            raise InjectedFault(
                f"fault injected at decoding step {step} of sequence {corrid} (test_fault_sequence_ids)"
            )


ALLOW_NUMPY2_ENV = "INFINISST_ALLOW_NUMPY2"


def check_stub_numpy(version: str, environ: Mapping[str, str]) -> None:
    """ConfigError for NumPy 2 unless ``INFINISST_ALLOW_NUMPY2=1``.

    Triton 2.51's Python stub (release 24.10, the one nvidia-pytriton 0.7.0 carries) sizes the output tensors that
    a model builds from NumPy arrays with the NumPy 1 layout. Under NumPy 2 every output reached the client as an
    empty buffer (seen on the H100 machine): each TEXT, RESPONSE_INDEX and SOURCE_SECONDS was 0 bytes. A newer
    Triton whose stub supports NumPy 2 can set the variable.
    """
    major = int(version.split(".")[0])
    if major >= 2 and environ.get(ALLOW_NUMPY2_ENV) != "1":
        raise ConfigError(
            f"numpy {version} is loaded in the Python stub, and Triton 2.51's stub sends outputs built from NumPy 2 "
            f"arrays as empty tensors: install numpy<2 where the stub imports from (requirements-gpu.txt pins "
            f"1.26.4), or set {ALLOW_NUMPY2_ENV}=1 for a Triton whose stub supports NumPy 2"
        )


def device_for_instance(args: dict) -> str:
    """torch device of a Triton model instance: ``cuda:<id>`` for KIND_GPU, ``cpu`` otherwise."""
    if str(args.get("model_instance_kind", "CPU")).upper() == "GPU":
        return f"cuda:{int(args.get('model_instance_device_id', 0))}"
    return "cpu"


# ---------------------------------------------------------------------------------------------- requests


@dataclass(slots=True)
class AudioRequest:
    """One Triton request of the wire contract (docs: interface.md), parsed and checked for shape and type."""

    corrid: int | str
    start: bool
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
        corrid=corrid,
        start=bool(flags & FLAG_SEQUENCE_START),
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


# ---------------------------------------------------------------------------------------------- streams


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


# ---------------------------------------------------------------------------------------------- errors

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


# ---------------------------------------------------------------------------------------------- responses


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


# ---------------------------------------------------------------------------------------------- metrics

LATENCY_BUCKETS = [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


class Metrics:
    """Custom metrics on Triton's metrics port (Prometheus), labelled by model and instance.

    Gauges come from ``engine.stats()``; the generated-token counter from the difference of its running total;
    the batch-size histogram from the engine's step records; chunk latency from TurnEnded events.
    """

    def __init__(self, pb: Any, labels: dict[str, str]):
        family = pb.MetricFamily

        def metric(name: str, description: str, kind: Any, extra: dict | None = None, **kw: Any) -> Any:
            fam = family(name=name, description=description, kind=kind)
            self._families.append(fam)
            return fam.Metric(labels={**labels, **(extra or {})}, **kw)

        self._families: list[Any] = []
        self.active_streams = metric("infinisst_active_streams", "Open audio streams", family.GAUGE)
        self.pending_chunks = metric(
            "infinisst_pending_chunks", "Audio chunks waiting for or in their translation turn", family.GAUGE
        )
        self.kv_pages_used = metric("infinisst_kv_pages_used", "LLM KV-cache pages in use", family.GAUGE)
        self.kv_pages_free = metric("infinisst_kv_pages_free", "LLM KV-cache pages free", family.GAUGE)
        self.generated_tokens = metric(
            "infinisst_generated_tokens_total", "Target tokens generated (EOS included)", family.COUNTER
        )
        batch_family = family(
            name="infinisst_batch_size", description="Rows per engine step, by phase", kind=family.HISTOGRAM
        )
        self._families.append(batch_family)
        self.batch_size = {
            phase: batch_family.Metric(labels={**labels, "phase": phase}, buckets=BATCH_BUCKETS)
            for phase in ("prefill", "decode")
        }
        self.chunk_latency = metric(
            "infinisst_chunk_latency_seconds",
            "From a chunk's last sample reaching the engine to the end of its translation turn",
            family.HISTOGRAM,
            buckets=LATENCY_BUCKETS,
        )
        self._tokens_seen = 0

    def update(self, stats: dict, step_phases_rows: Iterable[tuple[str, int]], latencies: Iterable[float]) -> None:
        self.active_streams.set(float(stats.get("active_streams", 0)))
        self.pending_chunks.set(float(stats.get("pending_chunks", 0)))
        self.kv_pages_used.set(float(stats.get("kv_pages_used", 0)))
        self.kv_pages_free.set(float(stats.get("kv_pages_free", 0)))
        tokens = int(stats.get("generated_tokens", 0))
        if tokens > self._tokens_seen:
            self.generated_tokens.increment(float(tokens - self._tokens_seen))
            self._tokens_seen = tokens
        for phase, rows in step_phases_rows:
            if phase in self.batch_size:
                self.batch_size[phase].observe(float(rows))
        for seconds in latencies:
            self.chunk_latency.observe(float(seconds))


def drain(items: deque) -> list:
    """Pop everything from a deque another thread appends to."""
    out = []
    while True:
        try:
            out.append(items.popleft())
        except IndexError:
            return out
