"""The Triton layer without Triton: serving.py and model.py against a fake pb_utils (and a fake engine)."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
import types
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from infinisst_backend.config import SAMPLE_RATE, EngineConfig
from infinisst_backend.engine.events import RequestDone, StreamError, StreamFinished, TextDelta, TurnEnded
from infinisst_backend.errors import CapacityError, InvalidArgument, UnknownStream
from infinisst_backend.serving import metrics, parameters, requests, responses

ROOT = Path(__file__).resolve().parents[1]
MODEL_PY = ROOT / "model_repository" / "infinisst" / "1" / "model.py"
CONFIG_PBTXT = ROOT / "model_repository" / "infinisst" / "config.pbtxt"

# ---------------------------------------------------------------------------------------------- fake pb_utils


class FakeTritonError(Exception):
    INVALID_ARG, UNAVAILABLE, NOT_FOUND, CANCELLED, INTERNAL = range(5)

    def __init__(self, message: str, code: int = 4):
        super().__init__(message)
        self.message_text, self.code = message, code

    def message(self) -> str:
        return self.message_text


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray):
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class FakeResponse:
    def __init__(self, output_tensors=None, error=None):
        self.outputs = {t.name: t.array for t in output_tensors or []}
        self.error = error


class FakeSender:
    """Records what was sent; flags == 1 is FINAL."""

    def __init__(self):
        self.sent: list[tuple[FakeResponse | None, int]] = []
        self.cancelled = False
        self.lock = threading.Lock()

    def send(self, response=None, flags=0):
        with self.lock:
            if self.sent and self.sent[-1][1] == 1:
                raise AssertionError("response after FINAL")
            self.sent.append((response, flags))

    def is_cancelled(self):
        return self.cancelled

    # helpers for assertions
    def finals(self) -> int:
        return sum(flags == 1 for _, flags in self.sent)

    def texts(self) -> list[tuple[str, int]]:
        return [
            (r.outputs["TEXT"][0, 0].decode(), int(r.outputs["RESPONSE_INDEX"][0, 0]))
            for r, _ in self.sent
            if r is not None and r.error is None
        ]

    def errors(self) -> list[FakeTritonError]:
        return [r.error for r, _ in self.sent if r is not None and r.error is not None]


class FakeRequest:
    def __init__(self, corrid, flags=0, audio=None, language=None, multiplier=None, inputs=None):
        self.corrid, self.flag_bits = corrid, flags
        self.inputs = {} if inputs is None else dict(inputs)
        if audio is not None:
            self.inputs["AUDIO"] = np.asarray(audio, np.float32).reshape(1, -1)
        if language is not None:
            self.inputs["TARGET_LANGUAGE"] = np.array([[language.encode()]], dtype=np.object_)
        if multiplier is not None:
            self.inputs["LATENCY_MULTIPLIER"] = np.array([[multiplier]], dtype=np.int32)
        self.sender = FakeSender()

    def correlation_id(self):
        return self.corrid

    def flags(self):
        return self.flag_bits

    def get_response_sender(self):
        return self.sender


class FakeMetric:
    def __init__(self, labels, buckets=None):
        self.labels, self.buckets = labels, buckets
        self.values: list[tuple[str, float]] = []

    def set(self, v):
        self.values.append(("set", v))

    def increment(self, v):
        self.values.append(("inc", v))

    def observe(self, v):
        self.values.append(("obs", v))


class FakeMetricFamily:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

    def __init__(self, name, description, kind):
        self.name, self.kind = name, kind
        self.metrics: list[FakeMetric] = []
        FAMILIES[name] = self

    def Metric(self, labels, buckets=None):  # noqa: N802 (Triton's name)
        if (self.kind == self.HISTOGRAM) != (buckets is not None):
            raise ValueError("histograms need buckets, other kinds take none")
        metric = FakeMetric(labels, buckets)
        self.metrics.append(metric)
        return metric


FAMILIES: dict[str, FakeMetricFamily] = {}


class FakeLogger:
    lines: list[tuple[str, str]] = []

    @classmethod
    def _log(cls, level, message):
        cls.lines.append((level, message))

    log_info = classmethod(lambda cls, m: cls._log("info", m))
    log_warn = classmethod(lambda cls, m: cls._log("warn", m))
    log_error = classmethod(lambda cls, m: cls._log("error", m))
    log_verbose = classmethod(lambda cls, m: cls._log("verbose", m))


class FakeModelException(Exception):
    pass


def fake_pb_utils() -> types.ModuleType:
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TritonError = FakeTritonError
    pb.Tensor = FakeTensor
    pb.InferenceResponse = FakeResponse
    pb.MetricFamily = FakeMetricFamily
    pb.Logger = FakeLogger
    pb.TritonModelException = FakeModelException
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    def get_input_tensor_by_name(request, name):
        return FakeTensor(name, request.inputs[name]) if name in request.inputs else None

    pb.get_input_tensor_by_name = get_input_tensor_by_name
    return pb


PB = fake_pb_utils()

# ---------------------------------------------------------------------------------------------- configuration


def test_config_pbtxt_parameters_are_all_known_and_valid(tmp_path):
    """Every parameter of the shipped config.pbtxt maps to a field, and the defaults validate."""
    text = CONFIG_PBTXT.read_text()
    keys = dict(
        (m.group(1), m.group(2))
        for m in __import__("re").finditer(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', text)
    )
    assert "checkpoint" in keys and len(keys) >= 20
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    keys["checkpoint"] = "ckpt"
    cfg = parameters.serving_config_from_parameters(keys, "cpu", tmp_path)
    assert cfg.checkpoint == tmp_path / "ckpt"
    assert cfg.engine.max_batch_size == int(keys["engine_max_batch_size"])
    assert cfg.engine.decoding.beam_size == int(keys["beam_size"])
    assert cfg.engine.stream_idle_timeout_s == float(keys["stream_idle_timeout_s"])
    assert cfg.metrics_interval_s == float(keys["metrics_interval_s"])
    # no EngineConfig / DecodingConfig field is missing from the shipped file
    assert set(parameters.PARAMETERS) <= set(keys)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text("{}")
    return tmp_path / "c"


def test_config_values_are_converted_and_defaults_kept(ckpt):
    params = {
        "checkpoint": str(ckpt),
        "engine_max_batch_size": "8",
        "repetition_penalty": "1.5",
        "default_language": "Chinese",
        "dtype": "float64",
        "beam_size": "",  # empty: default
        "EXECUTION_ENV_PATH": "/somewhere",  # Triton's own keys are ignored
    }
    cfg = parameters.serving_config_from_parameters(params, "cuda:1", Path("/nonexistent"))
    assert cfg.checkpoint == ckpt
    assert cfg.engine.device == "cuda:1"
    assert cfg.engine.max_batch_size == 8
    assert cfg.engine.decoding.repetition_penalty == 1.5
    assert cfg.engine.default_language == "Chinese"
    assert cfg.engine.dtype == "float64"
    assert cfg.engine.decoding.beam_size == 1
    assert cfg.engine.num_pages == EngineConfig().num_pages


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("beam_size", "four", "'beam_size'"),
        ("beam_size", "9", "'beam_size'"),
        ("engine_max_batch_size", "0", "'engine_max_batch_size'"),
        ("engine_max_batch_size", "1.5", "'engine_max_batch_size'"),
        ("kv_memory_fraction", "2", "'kv_memory_fraction'"),
        ("dtype", "float8", "'dtype'"),
        ("attention_backend", "cudnn", "'attention_backend'"),
        ("default_latency_multiplier", "5", "'default_latency_multiplier'"),
        ("metrics_interval_s", "0", "'metrics_interval_s'"),
        ("beam_sise", "2", "beam_sise"),
        ("test_fault_sequence_ids", "7@0", "'test_fault_sequence_ids'"),
        ("test_fault_sequence_ids", "@3", "'test_fault_sequence_ids'"),
        ("test_fault_sequence_ids", "7@x", "'test_fault_sequence_ids'"),
        ("benchmark_forced_turn_seed", "-1", "'benchmark_forced_turn_seed'"),
        ("benchmark_forced_turn_seed", "seed", "'benchmark_forced_turn_seed'"),
        ("cuda_graphs", "maybe", "'cuda_graphs'"),
    ],
)
def test_config_errors_name_the_parameter(ckpt, key, value, named):
    with pytest.raises(parameters.ConfigError) as info:
        parameters.serving_config_from_parameters({"checkpoint": str(ckpt), key: value}, "cpu", ckpt)
    assert named in str(info.value)


def test_forced_turn_seed_parameter(ckpt):
    """Benchmark-only forced turn lengths: empty is off, else a seed; the same seed draws the same lengths."""
    from infinisst_backend.engine.forced_turns import TurnLengths

    assert parameters.parse_forced_turn_seed("") is None and parameters.parse_forced_turn_seed(" 7 ") == 7
    cfg = parameters.serving_config_from_parameters(
        {"checkpoint": str(ckpt), "benchmark_forced_turn_seed": "3"}, "cpu", ckpt
    )
    assert parameters.parse_forced_turn_seed(cfg.benchmark_forced_turn_seed) == 3
    a, b = TurnLengths(3), TurnLengths(3)
    draws = [a.draw(1, 10) for _ in range(200)]
    assert draws == [b.draw(1, 10) for _ in range(200)]
    assert 1 <= min(draws) and max(draws) <= 10 and 4.0 < a.mean < 6.0
    assert max(TurnLengths(0).draw(2, 3) for _ in range(50)) <= 3  # never beyond the stream's own cap


def test_fault_injection_parameter_and_hook(ckpt):
    """Test-only fault injection: "ID" or "ID@N"; the hook raises in the N-th step of each stream of those ids."""
    assert parameters.parse_fault_ids("") == {} and parameters.parse_fault_ids(" 7 , 9@3,") == {"7": 1, "9": 3}
    cfg = parameters.serving_config_from_parameters(
        {"checkpoint": str(ckpt), "test_fault_sequence_ids": "5@2"}, "cpu", ckpt
    )
    assert cfg.test_fault_sequence_ids == "5@2"
    hook = parameters.FaultInjector(parameters.parse_fault_ids("5@2"))
    first, second, other = requests.StreamKey(5, 1), requests.StreamKey(5, 2), requests.StreamKey(6, 3)
    for _ in range(5):
        hook(other)  # other ids never fail
    hook(first)
    with pytest.raises(parameters.InjectedFault, match="decoding step 2 of sequence 5"):
        hook(first)
    hook(second)  # a new stream under the same id counts from 1 again
    with pytest.raises(parameters.InjectedFault):
        hook(second)
    assert hook._steps == {}  # nothing kept for failed streams


def test_checkpoint_path_relative_absolute_and_missing(ckpt):
    root = ckpt.parent
    assert parameters.resolve_checkpoint("c", root) == ckpt
    assert parameters.resolve_checkpoint(str(ckpt), Path("/elsewhere")) == ckpt
    for bad in ("missing", ""):
        with pytest.raises(parameters.ConfigError, match="'checkpoint'"):
            parameters.serving_config_from_parameters({"checkpoint": bad}, "cpu", root)


def test_parameters_from_model_config_and_device():
    model_config = {"parameters": {"a": {"string_value": "1"}, "b": {"string_value": ""}}}
    assert parameters.parameters_from_model_config(model_config) == {"a": "1", "b": ""}
    assert parameters.parameters_from_model_config({}) == {}
    assert parameters.device_for_instance({"model_instance_kind": "GPU", "model_instance_device_id": "3"}) == "cuda:3"
    assert parameters.device_for_instance({"model_instance_kind": "CPU", "model_instance_device_id": "0"}) == "cpu"


# ---------------------------------------------------------------------------------------------- requests


def test_parse_request_reads_flags_and_optional_inputs():
    audio = np.linspace(-1, 1, 7, dtype=np.float32)
    r = requests.parse_request(FakeRequest(5, flags=3, audio=audio, language=" de ", multiplier=2), PB)
    assert (r.end, r.language, r.latency_multiplier) == (True, "de", 2)
    np.testing.assert_array_equal(r.audio, audio)
    r = requests.parse_request(FakeRequest(6, flags=0, audio=np.zeros(0)), PB)
    assert (r.end, r.language, r.latency_multiplier, r.audio.shape) == (False, None, None, (0,))


@pytest.mark.parametrize(
    "request_, message",
    [
        (FakeRequest(0, audio=[0.0]), "non-zero sequence_id"),
        (FakeRequest(1), "AUDIO is missing"),
        (FakeRequest(1, inputs={"AUDIO": np.zeros((2, 3), np.float32)}), "batch size 1"),
        (FakeRequest(1, inputs={"AUDIO": np.zeros((1, 3), np.float64)}), "FP32"),
        (FakeRequest(1, audio=[0.0], inputs={"TARGET_LANGUAGE": np.array([[b"\xff"]], np.object_)}), "UTF-8"),
        (FakeRequest(1, audio=[0.0], inputs={"LATENCY_MULTIPLIER": np.array([[1.5]], np.float32)}), "integer"),
    ],
)
def test_parse_request_rejects_bad_inputs(request_, message):
    with pytest.raises(InvalidArgument, match=message):
        requests.parse_request(request_, PB)


def test_registry_keys_restart_and_forget():
    registry = requests.StreamRegistry()
    with pytest.raises(UnknownStream, match="start a new sequence"):
        registry.lookup(7)
    first, previous = registry.start(7)
    assert previous is None and registry.lookup(7) == first and repr(first) == "7"
    second, previous = registry.start(7)
    assert previous == first and second != first
    registry.forget(first)  # stale: a newer START owns the id
    assert registry.lookup(7) == second
    registry.forget(second)
    assert len(registry) == 0


def test_error_codes_and_messages():
    assert responses.triton_code("NOT_FOUND") == "INVALID_ARG"
    assert responses.triton_code("UNAVAILABLE") == "UNAVAILABLE"
    assert responses.triton_code("whatever") == "INTERNAL"
    err = responses.triton_error(PB, "NOT_FOUND", "stream 3 is not open")
    assert err.code == FakeTritonError.INVALID_ARG and err.message() == "INVALID_ARG: stream 3 is not open"


# ---------------------------------------------------------------------------------------------- response book


def handle(key, sender=None):
    return responses.RequestHandle(key, sender or FakeSender())


def send_all(book):
    for out in book.collect():
        responses.send(out, PB)


def test_book_orders_merges_and_numbers_responses():
    book, key = responses.ResponseBook(), requests.StreamKey(1, 1)
    a, b, c = handle(key), handle(key), handle(key)
    for h in (a, b, c):
        book.submit(h)
    book.apply(responses.Rejected(c, "INVALID_ARG", "bad audio"))  # rejected at once, but behind a and b
    book.apply(TextDelta(key, a, "Hal", 0.96))
    book.apply(TextDelta(key, a, "lo", 0.96))
    send_all(book)
    assert a.sender.texts() == [("Hallo", 0)] and a.sender.finals() == 0
    assert c.sender.sent == []  # must wait for a's and b's FINAL
    book.apply(RequestDone(key, a))
    book.apply(TextDelta(key, b, " Welt", 1.92))
    book.apply(RequestDone(key, b))
    send_all(book)
    assert a.sender.finals() == 1 and b.sender.texts() == [(" Welt", 1)] and b.sender.finals() == 1
    assert [e.message() for e in c.sender.errors()] == ["INVALID_ARG: bad audio"] and c.sender.finals() == 1
    assert len(book) == 0 and book.collect() == []
    # SOURCE_SECONDS travels with the text
    assert b.sender.sent[0][0].outputs["SOURCE_SECONDS"][0, 0] == pytest.approx(1.92)


def test_book_streams_are_independent_and_errors_final_once():
    book = responses.ResponseBook()
    k1, k2 = requests.StreamKey(1, 1), requests.StreamKey(2, 2)
    h1, h2, h3 = handle(k1), handle(k2), handle(k1)
    for h in (h1, h2, h3):
        book.submit(h)
    book.apply(TextDelta(k2, h2, "x", 0.5))
    book.apply(StreamError(k1, h1, "CANCELLED", "cancelled"))
    book.apply(StreamError(k1, h3, "CANCELLED", "cancelled"))
    book.apply(RequestDone(k1, h1))  # a late duplicate must not produce a second FINAL
    send_all(book)
    assert h2.sender.texts() == [("x", 0)] and h2.sender.finals() == 0
    assert h1.sender.finals() == 1 and h3.sender.finals() == 1
    assert h1.sender.errors()[0].code == FakeTritonError.CANCELLED
    assert [h.key for h in book.heads()] == [k2]
    book.fail_all("UNAVAILABLE", "shutting down")
    send_all(book)
    assert h2.sender.finals() == 1 and h2.sender.errors()[0].message() == "UNAVAILABLE: shutting down"
    assert len(book) == 0


def test_book_index_is_gap_free_across_requests_with_random_events():
    """Random interleavings of text, done and rejection: per stream, indices 0..n-1 in send order, text intact."""
    rng = np.random.default_rng(0)
    book, key = responses.ResponseBook(), requests.StreamKey(9, 1)
    handles = [handle(key) for _ in range(30)]
    expected = []
    for i, h in enumerate(handles):
        book.submit(h)
        if rng.random() < 0.2:
            book.apply(responses.Rejected(h, "INVALID_ARG", f"bad {i}"))
            continue
        for _ in range(int(rng.integers(0, 3))):
            t = f"<{i}.{rng.integers(100)}>"
            expected.append(t)
            book.apply(TextDelta(key, h, t, float(i)))
            if rng.random() < 0.5:
                send_all(book)
        book.apply(RequestDone(key, h))
        if rng.random() < 0.5:
            send_all(book)
    send_all(book)
    texts = [t for h in handles for t in h.sender.texts()]
    assert [i for _, i in texts] == list(range(len(texts)))
    assert "".join(t for t, _ in texts) == "".join(expected)
    assert all(h.sender.finals() == 1 for h in handles)
    assert book._next_index  # the stream is still open: its numbering goes on
    book.apply(StreamFinished(key, "end"))
    send_all(book)
    assert not book._next_index and not book._ended  # nothing is kept for a finished stream


# ---------------------------------------------------------------------------------------------- metrics


def test_metrics_update():
    FAMILIES.clear()
    recorder = metrics.Metrics(PB, {"model": "m", "instance": "i"})
    stats = {"active_streams": 3, "pending_chunks": 2, "kv_pages_used": 10, "kv_pages_free": 90, "generated_tokens": 7}
    recorder.update(stats, [("prefill", 2), ("decode", 5), ("decode", 1)], [0.25, 0.5])
    recorder.update({**stats, "generated_tokens": 12}, [], [])
    assert FAMILIES["infinisst_active_streams"].metrics[0].values[-1] == ("set", 3.0)
    assert FAMILIES["infinisst_kv_pages_free"].metrics[0].values[-1] == ("set", 90.0)
    assert FAMILIES["infinisst_generated_tokens_total"].metrics[0].values == [("inc", 7.0), ("inc", 5.0)]
    batch = {m.labels["phase"]: m.values for m in FAMILIES["infinisst_batch_size"].metrics}
    assert batch == {"prefill": [("obs", 2.0)], "decode": [("obs", 5.0), ("obs", 1.0)]}
    assert FAMILIES["infinisst_chunk_latency_seconds"].metrics[0].values == [("obs", 0.25), ("obs", 0.5)]
    assert FAMILIES["infinisst_active_streams"].metrics[0].labels == {"model": "m", "instance": "i"}


# ---------------------------------------------------------------------------------------------- model.py


class FakeEngine:
    """Engine stand-in: text "<n>" per request of n samples, emitted by its own thread when released.

    ``hold`` keeps requests pending until ``release()``; validation mimics the real engine's contract.
    """

    instances: list[FakeEngine] = []

    def __init__(self, cfg, on_event):
        self.cfg, self.on_event = cfg, on_event
        self.open: dict = {}  # key -> closed flag
        self.pending: deque = deque()
        self.lock = threading.Condition()
        self.hold = False
        self.cancelled: list = []
        self.step_records: deque = deque()
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        FakeEngine.instances.append(self)

    @classmethod
    def from_checkpoint(cls, path, cfg, on_event=None):
        return cls(cfg, on_event)

    def start(self):
        self.thread.start()

    def open_stream(self, key, language=None, latency_multiplier=None, decoding=None):
        if language not in (None, "de", "German"):
            raise InvalidArgument(f"unknown target language {language!r}")
        if latency_multiplier is not None and not 1 <= latency_multiplier <= 4:
            raise InvalidArgument(f"latency multiplier must be an integer in 1..4, got {latency_multiplier}")
        with self.lock:
            if len(self.open) >= self.cfg.max_streams:
                raise CapacityError("no room for another stream")
            self.open[key] = False

    def add_audio(self, key, samples, tag=None, end=False):
        samples = np.asarray(samples)
        if not np.isfinite(samples).all():
            raise InvalidArgument("audio holds NaN/Inf samples")
        with self.lock:
            if key not in self.open or self.open[key]:
                raise UnknownStream(f"stream {key!r} is not open; start a new sequence")
            self.open[key] = end
            self.pending.append((key, samples.size, tag, end))
            self.lock.notify()

    def is_open(self, key):
        with self.lock:
            return key in self.open and not self.open[key]

    def cancel_stream(self, key):
        with self.lock:
            if key not in self.open:
                raise UnknownStream(f"stream {key!r} is not open")
            self.cancelled.append(key)
            for item in [p for p in self.pending if p[0] == key]:
                self.pending.remove(item)
                self.on_event(StreamError(key, item[2], "CANCELLED", f"stream {key!r} was cancelled"))
            del self.open[key]
        self.on_event(StreamFinished(key, "cancelled"))

    def release(self):
        with self.lock:
            self.hold = False
            self.lock.notify()

    def _loop(self):
        while True:
            with self.lock:
                while not self.stopped and (self.hold or not self.pending):
                    self.lock.wait(0.05)
                if self.stopped:
                    return
                key, n, tag, end = self.pending.popleft()
            self.on_event(TextDelta(key, tag, f"<{n}>", n / SAMPLE_RATE))
            self.on_event(TurnEnded(key, tag, (1, 2), 0.01))
            self.on_event(RequestDone(key, tag))
            self.step_records.append(types.SimpleNamespace(phase="decode", num_rows=1))
            if end:
                with self.lock:
                    self.open.pop(key, None)
                self.on_event(StreamFinished(key, "end"))

    def shutdown(self, timeout=None):
        with self.lock:
            self.stopped = True
            self.lock.notify()
        self.thread.join(timeout)
        with self.lock:
            for key, _, tag, _ in self.pending:
                self.on_event(StreamError(key, tag, "UNAVAILABLE", "the server is shutting down"))
            self.pending.clear()

    def stats(self):
        return {"active_streams": len(self.open), "pending_chunks": len(self.pending), "generated_tokens": 0}


@pytest.fixture
def model_module(monkeypatch):
    """model.py imported with the fake pb_utils and the fake engine."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", PB)
    spec = importlib.util.spec_from_file_location("infinisst_triton_model_under_test", MODEL_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "Engine", FakeEngine)
    FakeEngine.instances.clear()
    return module


def make_model(module, ckpt, **params):
    import json

    values = {"checkpoint": str(ckpt), "cancel_poll_interval_s": "0.02", "metrics_interval_s": "0.05", **params}
    config = {"parameters": {k: {"string_value": v} for k, v in values.items()}}
    model = module.TritonPythonModel()
    model.initialize(
        {
            "model_name": "infinisst",
            "model_config": json.dumps(config),
            "model_instance_kind": "CPU",
            "model_instance_device_id": "0",
            "model_instance_name": "infinisst_0_0",
        }
    )
    return model, FakeEngine.instances[-1]


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def test_model_streams_and_rejects_in_order(model_module, ckpt):
    model, engine = make_model(model_module, ckpt)
    try:
        engine.hold = True
        r1 = FakeRequest(5, flags=1, audio=np.zeros(100), language="de")
        r2 = FakeRequest(5, audio=[np.nan])  # rejected at once, but answered after r1's FINAL
        r3 = FakeRequest(5, flags=2, audio=np.zeros(30))
        model.execute([r1, r2])
        model.execute([r3])
        time.sleep(0.1)
        assert r1.sender.sent == [] and r2.sender.sent == []
        engine.release()
        assert wait_for(lambda: r3.sender.finals() == 1)
        assert r1.sender.texts() == [("<100>", 0)] and r1.sender.finals() == 1
        assert [e.message() for e in r2.sender.errors()] == ["INVALID_ARG: audio holds NaN/Inf samples"]
        assert r2.sender.finals() == 1
        assert r3.sender.texts() == [("<30>", 1)]
        # the stream ended: a later request for the id is unknown to the model
        r4 = FakeRequest(5, audio=np.zeros(3))
        model.execute([r4])
        assert wait_for(lambda: r4.sender.finals() == 1)
        assert r4.sender.errors()[0].code == FakeTritonError.INVALID_ARG
        assert "start a new sequence" in r4.sender.errors()[0].message()
    finally:
        model.finalize()


def test_model_start_errors_and_capacity(model_module, ckpt):
    model, engine = make_model(model_module, ckpt, max_streams="1")
    try:
        bad_language = FakeRequest(1, flags=1, audio=np.zeros(10), language="xx")
        bad_m = FakeRequest(2, flags=1, audio=np.zeros(10), multiplier=7)
        ok = FakeRequest(3, flags=1, audio=np.zeros(10))
        full = FakeRequest(4, flags=1, audio=np.zeros(10))
        after_bad_start = FakeRequest(1, audio=np.zeros(10))
        model.execute([bad_language, bad_m, ok, full, after_bad_start])
        everyone = [bad_language, bad_m, ok, full, after_bad_start]
        assert wait_for(lambda: all(r.sender.finals() == 1 for r in everyone))
        messages = {r.corrid if r is not after_bad_start else -1: r.sender.errors() for r in everyone}
        assert messages[1][0].message() == "INVALID_ARG: unknown target language 'xx'"
        assert messages[2][0].code == FakeTritonError.INVALID_ARG and "1..4" in messages[2][0].message()
        assert messages[3] == [] and ok.sender.texts() == [("<10>", 0)]
        assert messages[4][0].code == FakeTritonError.UNAVAILABLE
        assert "start a new sequence" in messages[-1][0].message()
    finally:
        model.finalize()


def test_model_restart_cancellation_and_shutdown(model_module, ckpt):
    model, engine = make_model(model_module, ckpt)
    engine.hold = True
    first = FakeRequest(8, flags=1, audio=np.zeros(5))
    model.execute([first])
    restart = FakeRequest(8, flags=1, audio=np.zeros(6))  # START again on a live id: the old stream is cancelled
    model.execute([restart])
    assert wait_for(lambda: first.sender.finals() == 1)
    assert first.sender.errors()[0].code == FakeTritonError.CANCELLED
    assert len(engine.cancelled) == 1

    victim = FakeRequest(9, flags=1, audio=np.zeros(7))
    model.execute([victim])
    victim.sender.cancelled = True  # the client went away: the response thread notices and cancels the stream
    assert wait_for(lambda: victim.sender.finals() == 1)
    assert len(engine.cancelled) == 2 and restart.sender.sent == []

    pending = FakeRequest(10, flags=1, audio=np.zeros(3))
    model.execute([pending])
    model.finalize()  # every open request still gets exactly one FINAL
    for r in (restart, pending):
        assert r.sender.finals() == 1 and r.sender.errors()[0].code == FakeTritonError.UNAVAILABLE


def test_book_restarted_stream_errors_say_why():
    book = responses.ResponseBook()
    key = requests.StreamKey(3, 1)
    handle = responses.RequestHandle(key, FakeSender())
    book.submit(handle)
    book.apply(responses.Restarted(key, "stream 3 was cancelled: a new START request arrived for its sequence id"))
    book.apply(StreamError(key, handle, "CANCELLED", "stream 3 was cancelled"))
    book.apply(StreamFinished(key, "cancelled"))
    out = book.collect()
    assert [o.kind for o in out] == ["error", "final"]
    assert out[0].message.endswith("a new START request arrived for its sequence id")
    assert book._cancel_reasons == {}  # forgotten with the stream
    book.apply(responses.Restarted(key, "too late"))  # the stream is gone already: nothing is kept
    assert book._cancel_reasons == {}


def test_model_restart_reason_and_end_with_bad_content(model_module, ckpt):
    model, engine = make_model(model_module, ckpt, test_fault_sequence_ids="42@3")
    try:
        assert isinstance(engine.fault_hook, parameters.FaultInjector) and engine.fault_hook.faults == {"42": 3}
        engine.hold = True
        old = FakeRequest(8, flags=1, audio=np.zeros(5))
        model.execute([old])
        model.execute([FakeRequest(8, flags=1, audio=np.zeros(6))])
        assert wait_for(lambda: old.sender.finals() == 1)
        assert old.sender.errors()[0].message() == (
            "CANCELLED: stream 8 was cancelled: a new START request arrived for its sequence id"
        )
        engine.release()
        # END with bad audio: the stream still ends (its buffered text is sent), then the error, then FINAL
        opened = FakeRequest(9, flags=1, audio=np.zeros(7))
        bad_end = FakeRequest(9, flags=2, audio=[0.0, np.inf])
        model.execute([opened, bad_end])
        assert wait_for(lambda: bad_end.sender.finals() == 1)
        assert bad_end.sender.texts() == [("<0>", 1)]
        assert bad_end.sender.errors()[0].message() == "INVALID_ARG: audio holds NaN/Inf samples"
        assert [flags for _, flags in bad_end.sender.sent] == [0, 0, 1]  # text, error, FINAL
        assert wait_for(lambda: 9 not in {k.corrid for k in engine.open})
        # a bad request without END leaves the stream open
        model.execute([FakeRequest(10, flags=1, audio=np.zeros(3)), FakeRequest(10, audio=[np.nan])])
        assert wait_for(lambda: engine.is_open(model.registry.lookup(10)))
    finally:
        model.finalize()


def test_model_metrics_thread(model_module, ckpt):
    FAMILIES.clear()
    model, engine = make_model(model_module, ckpt)
    try:
        r = FakeRequest(4, flags=3, audio=np.zeros(16))
        model.execute([r])
        assert wait_for(lambda: r.sender.finals() == 1)
        assert wait_for(lambda: ("obs", 0.01) in FAMILIES["infinisst_chunk_latency_seconds"].metrics[0].values)
        decode = next(m for m in FAMILIES["infinisst_batch_size"].metrics if m.labels["phase"] == "decode")
        assert wait_for(lambda: ("obs", 1.0) in decode.values)
    finally:
        model.finalize()


def test_model_bad_parameter_fails_to_load_with_its_name(model_module, ckpt):
    with pytest.raises(FakeModelException, match="'beam_size'") as info:
        make_model(model_module, ckpt, beam_size="lots")
    assert "Traceback" not in str(info.value)
    with pytest.raises(FakeModelException, match="'checkpoint'"):
        make_model(model_module, ckpt.parent / "nothing")


def test_model_engine_failure_fails_the_load_with_the_reason(model_module, ckpt, monkeypatch):
    def broken(path, cfg, on_event=None):
        raise ValueError("invalid num_pages=0: needs a CUDA device")

    monkeypatch.setattr(FakeEngine, "from_checkpoint", staticmethod(broken))
    with pytest.raises(FakeModelException, match="num_pages=0") as info:
        make_model(model_module, ckpt)
    assert str(ckpt) in str(info.value) and "Traceback" not in str(info.value)


# ---------------------------------------------------------------------------------------------- client tools


def test_perf_data_and_report(tmp_path):
    import json

    import soundfile as sf

    from client import perf_data, perf_report

    rng = np.random.default_rng(3)
    audio = rng.uniform(-0.5, 0.5, 40_000).astype(np.float32)
    sf.write(tmp_path / "a.wav", audio, SAMPLE_RATE, subtype="FLOAT")
    data = perf_data.build([tmp_path / "a.wav"], piece_seconds=1.0, language="de")
    (steps,) = data["data"]
    assert [s["AUDIO"]["shape"] for s in steps] == [[16_000], [16_000], [8_000]]
    assert steps[0]["TARGET_LANGUAGE"] == {"content": ["de"], "shape": [1]}
    joined = np.concatenate(
        [np.asarray(s["AUDIO"]["content"], np.float32) for s in json.loads(json.dumps(data))["data"][0]]
    )
    np.testing.assert_array_equal(joined, audio)

    ms = 1_000_000
    profile = {
        "experiments": [
            {
                "experiment": {"mode": "concurrency", "value": 2},
                "window_boundaries": [0, 2000 * ms],
                "requests": [
                    {
                        "timestamp": 0,
                        "request_inputs": {"AUDIO": [0.0] * 16_000},
                        "response_timestamps": [100 * ms, 300 * ms, 400 * ms],
                        "response_outputs": [{"TEXT": ""}, {"TEXT": "Hallo"}, {}],
                    },
                    {"timestamp": 0, "request_inputs": {"AUDIO": [0.0] * 8_000}, "response_timestamps": []},
                ],
            }
        ]
    }
    (row,) = perf_report.summarize(profile)
    assert row["concurrency"] == 2 and row["requests"] == 2 and row["requests_without_response"] == 1
    assert row["first_response"]["p50"] == pytest.approx(0.3) and row["last_response"]["p50"] == pytest.approx(0.4)
    assert row["requests_per_s"] == pytest.approx(1.0) and row["audio_seconds_per_s"] == pytest.approx(0.5)
    assert "concurrency" in perf_report.format_table([row])


def test_audio_loading_resamples_to_16k_mono(tmp_path):
    import soundfile as sf

    from client.audio import load_audio, random_pieces, split_pieces

    t = np.arange(8_000) / 8_000
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    sf.write(tmp_path / "s.flac", np.stack([tone, tone], axis=1), 8_000)
    audio = load_audio(tmp_path / "s.flac")
    assert audio.dtype == np.float32 and audio.shape == (16_000,)
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(int(np.argmax(spectrum)) - 440) <= 1  # 1 Hz bins over one second
    rng = np.random.default_rng(0)
    pieces = random_pieces(audio, rng, 100, 3000)
    np.testing.assert_array_equal(np.concatenate(pieces), audio)
    assert all(100 <= len(p) <= 3000 for p in pieces[:-1])
    assert [len(p) for p in split_pieces(audio, 6_000)] == [6_000, 6_000, 4_000]
    with pytest.raises(FileNotFoundError):
        load_audio(tmp_path / "missing.wav")


def test_server_error_code_parsing():
    from client.api import ServerError

    assert ServerError("INVALID_ARG: stream 3 is not open").code == "INVALID_ARG"
    assert ServerError("inference request for sequence 5 must specify the START flag").code == ""


def test_numpy_2_is_refused_in_the_stub_unless_allowed():
    """Triton 2.51's stub sent every output as an empty buffer under NumPy 2 (H100 machine): the model refuses to
    load with a message naming the fix, unless the operator says the stub supports NumPy 2."""
    parameters.check_stub_numpy("1.26.4", {})
    with pytest.raises(parameters.ConfigError, match=r"numpy 2\.5\.2 .*numpy<2.*INFINISST_ALLOW_NUMPY2=1"):
        parameters.check_stub_numpy("2.5.2", {})
    with pytest.raises(parameters.ConfigError):
        parameters.check_stub_numpy("2.0.0", {"INFINISST_ALLOW_NUMPY2": "yes"})
    parameters.check_stub_numpy("2.5.2", {"INFINISST_ALLOW_NUMPY2": "1"})
