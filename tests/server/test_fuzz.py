"""Property-based fuzz of the wire interface (hypothesis) against the real server, beside a healthy stream.

Each example is a short script of raw gRPC requests on one fresh sequence id: any flags (START / END or
neither), AUDIO of any datatype, shape, byte count, NaN/Inf, huge or empty, TARGET_LANGUAGE as any text or
bytes that are not UTF-8, LATENCY_MULTIPLIER of any value, type or shape, inputs missing. A model of the
contract (``Oracle``) predicts every answer: accepted, refused by Triton's own checks (types, shapes, START),
or refused by the model with INVALID_ARG; each request gets exactly one FINAL; and a stream that ends has
exactly the text of the audio that was accepted, as if the refused requests never came.
"""

from __future__ import annotations

import itertools
import queue
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from client.api import StreamingClient

from .conftest import MAIN, SPEECH, Bystander, long_audio, speech
from .harness import DEMO_CHECKPOINT, wait_gauge

pytestmark = pytest.mark.server

MAX_SAMPLES = int(float(MAIN["max_request_seconds"]) * 16_000)
SOURCE = np.concatenate([speech(SPEECH[0]), speech(SPEECH[1])])  # valid audio is cut from real speech


def known_languages() -> set[str]:
    import json

    languages = json.loads((DEMO_CHECKPOINT / "config.json").read_text())["prompt"]["languages"]
    return {k.lower() for k in languages} | {v.lower() for v in languages.values()}


KNOWN = known_languages()

# ---------------------------------------------------------------------------------------------- raw client


@dataclass(slots=True)
class Answer:
    """Everything the server sent for one request."""

    texts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    finals: int = 0


class RawClient:
    """One gRPC stream that sends hand-built ModelInferRequests and collects each request's answer."""

    def __init__(self, url: str, model: str = "infinisst"):
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        self.pb, self.model = service_pb2, model
        options = [("grpc.max_send_message_length", 2**30), ("grpc.max_receive_message_length", 2**30)]
        self.channel = grpc.insecure_channel(url, options=options)
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.answers: dict[str, Answer] = {}
        self.cv = threading.Condition()
        self.ids = itertools.count(1)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.responses = stub.ModelStreamInfer(iter(self.outbox.get, None))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        from tritonclient.grpc import InferResult

        try:
            for response in self.responses:
                infer = response.infer_response
                final = infer.parameters.get("triton_final_response")
                with self.cv:
                    answer = self.answers.setdefault(infer.id, Answer())
                    if response.error_message:
                        answer.errors.append(response.error_message)
                    elif infer.outputs:
                        answer.texts.append(InferResult(infer).as_numpy("TEXT").reshape(-1)[0].decode())
                    if final.bool_param if final is not None else bool(response.error_message):
                        answer.finals += 1
                    self.cv.notify_all()
        except Exception:  # cancelled by close()
            pass

    def request(self, sequence_id: int, start: bool, end: bool, inputs: list[tuple], timeout: float = 60) -> Answer:
        """Send one request (inputs: (name, datatype, shape, raw bytes)) and wait for its FINAL."""
        rid = str(next(self.ids))
        request = self.pb.ModelInferRequest(model_name=self.model, id=rid)
        request.parameters["sequence_id"].int64_param = sequence_id
        request.parameters["sequence_start"].bool_param = start
        request.parameters["sequence_end"].bool_param = end
        request.parameters["triton_enable_empty_final_response"].bool_param = True
        for name, datatype, shape, raw in inputs:
            tensor = request.inputs.add()
            tensor.name, tensor.datatype = name, datatype
            tensor.shape.extend(shape)
            request.raw_input_contents.append(raw)
        self.outbox.put(request)
        with self.cv:
            assert self.cv.wait_for(lambda: rid in self.answers and self.answers[rid].finals, timeout), rid
            return self.answers[rid]

    def close(self) -> None:
        self.outbox.put(None)
        self.responses.cancel()
        self.channel.close()


def string_element(raw: bytes) -> bytes:
    """One BYTES element on the wire: a 4-byte little-endian length, then the bytes."""
    return struct.pack("<I", len(raw)) + raw


# ---------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class Step:
    """One request of a script; ``None`` inputs are left out."""

    start: bool
    end: bool
    audio: tuple  # ("speech", offset, n) | ("values", tuple of floats) | ("long", n) | ("dtype", dt) | ...
    language: tuple | None = None  # ("text", str) | ("bytes", raw) | ("dtype",) | ("shape",)
    multiplier: tuple | None = None  # ("int32", v) | ("dtype", dt) | ("shape",)

    def audio_samples(self) -> np.ndarray | None:
        """The samples an accepted request carries (None when the request is malformed)."""
        kind = self.audio[0]
        if kind == "speech":
            _, offset, n = self.audio
            return SOURCE[offset : offset + n]
        if kind == "values":
            return np.asarray(self.audio[1], np.float32)
        if kind == "long":
            return np.zeros(self.audio[1], np.float32)
        return None

    def inputs(self) -> list[tuple]:
        inputs = []
        samples = self.audio_samples()
        kind = self.audio[0]
        if samples is not None:
            inputs.append(("AUDIO", "FP32", [1, samples.size], samples.tobytes()))
        elif kind == "dtype":  # same values, another datatype
            dt = {"FP64": np.float64, "FP16": np.float16, "INT16": np.int16, "INT32": np.int32}[self.audio[1]]
            inputs.append(("AUDIO", self.audio[1], [1, 3], np.zeros(3, dt).tobytes()))
        elif kind == "shape":
            shape = list(self.audio[1])
            inputs.append(("AUDIO", "FP32", shape, np.zeros(int(np.prod(shape)), np.float32).tobytes()))
        elif kind == "short_bytes":  # the shape promises more bytes than sent
            inputs.append(("AUDIO", "FP32", [1, 4], np.zeros(3, np.float32).tobytes()))
        elif kind == "strings":
            inputs.append(("AUDIO", "BYTES", [1, 1], string_element(b"0.5")))
        # kind "missing": no AUDIO at all
        if self.language is not None:
            kind, *rest = self.language
            if kind == "text":
                inputs.append(("TARGET_LANGUAGE", "BYTES", [1, 1], string_element(rest[0].encode("utf-8"))))
            elif kind == "bytes":
                inputs.append(("TARGET_LANGUAGE", "BYTES", [1, 1], string_element(rest[0])))
            elif kind == "dtype":
                inputs.append(("TARGET_LANGUAGE", "INT32", [1, 1], np.int32([1]).tobytes()))
            else:
                inputs.append(("TARGET_LANGUAGE", "BYTES", [1, 2], string_element(b"de") * 2))
        if self.multiplier is not None:
            kind, *rest = self.multiplier
            if kind == "int32":
                inputs.append(("LATENCY_MULTIPLIER", "INT32", [1, 1], np.int32([rest[0]]).tobytes()))
            elif kind == "dtype":
                inputs.append(("LATENCY_MULTIPLIER", "INT64", [1, 1], np.int64([2]).tobytes()))
            else:
                inputs.append(("LATENCY_MULTIPLIER", "INT32", [1, 2], np.int32([1, 1]).tobytes()))
        return inputs

    def well_formed(self) -> bool:
        """Passes Triton's own checks of datatypes, shapes and byte counts (Triton 2.51 lets a request without
        AUDIO through when it has another input: the model refuses it)."""
        has_other = self.language is not None or self.multiplier is not None
        return (
            (self.audio_samples() is not None or (self.audio[0] == "missing" and has_other))
            and (self.language is None or self.language[0] in ("text", "bytes"))
            and (self.multiplier is None or self.multiplier[0] == "int32")
        )

    def content_error(self, start: bool) -> str | None:
        """What the model refuses in this well-formed request (a fragment of its message), or None; in the
        model's order: parsing, then the stream's options (START only), then the audio."""
        if self.audio[0] == "missing":
            return "input AUDIO is missing"
        if self.language is not None and self.language[0] == "bytes":
            return "not valid UTF-8"
        if start:
            name = self.language_name()
            if name is not None and name.lower() not in KNOWN:
                return "unsupported language"
            if self.multiplier is not None and not 1 <= self.multiplier[1] <= 4:
                return "latency multiplier must be an integer in 1..4"
        return self.audio_error()

    def audio_error(self) -> str | None:
        samples = self.audio_samples()
        if not np.isfinite(samples).all():
            return "NaN/Inf"
        if samples.size > MAX_SAMPLES:
            return "maximum per request"
        return None

    def language_name(self) -> str | None:
        """The language the model reads on START (None: its default)."""
        if self.language is None or self.language[0] != "text":
            return None
        return self.language[1].strip() or None


# ---------------------------------------------------------------------------------------------- the oracle


@dataclass(slots=True)
class Oracle:
    """What the contract says about a script of requests on one sequence id, request by request."""

    reference: object  # conftest `reference`
    triton_open: bool = False  # Triton's sequence batcher has the sequence (START seen, no END yet)
    model_open: bool = False  # the model has a stream for it
    accepted: list[np.ndarray] = field(default_factory=list)  # audio of the model's stream so far
    texts: list[str] = field(default_factory=list)  # text the stream has sent so far
    language: str | None = None
    multiplier: int | None = None

    def check(self, step: Step, answer: Answer) -> str:
        """Assert the answer to ``step`` and advance; returns what kind of answer it was."""
        assert answer.finals == 1, answer
        assert len(answer.errors) <= 1, answer
        error = answer.errors[0] if answer.errors else None
        assert error is None or (error.strip() and "Traceback" not in error), error
        if not step.well_formed():
            # refused by Triton before the model sees it (Triton's own message, no code prefix); nothing changes
            assert error is not None and not error.startswith(("INVALID_ARG", "UNAVAILABLE", "INTERNAL")), error
            assert answer.texts == []
            return "Triton refused"
        if not step.start and not self.triton_open:
            assert error is not None and "must specify the START flag" in error, error
            return "Triton refused"
        self.triton_open = not step.end
        if step.start:
            problem = step.content_error(True)
            self._start(step, problem)
            if not self.model_open:  # bad options: the stream is not opened
                assert error is not None and error.startswith("INVALID_ARG: ") and problem in error, (problem, error)
                return "model refused"
        elif not self.model_open:
            assert error is not None and error.startswith("INVALID_ARG") and "start a new sequence" in error, error
            assert answer.texts == []
            return "model refused"
        else:
            problem = step.content_error(False)
        if problem is None:
            assert error is None, error
            self.accepted.append(step.audio_samples())
        else:
            assert error is not None and error.startswith("INVALID_ARG: ") and problem in error, (problem, error)
        self.texts += answer.texts
        if step.end:  # the stream ends (after an error too: Triton has closed the sequence)
            self._ended()
            return "stream ended"
        if answer.texts:
            assert self.expected().startswith("".join(self.texts))
        return "accepted" if problem is None else "model refused"

    def _start(self, step: Step, problem: str | None) -> None:
        """A START replaces whatever stream the id had; bad options leave it unopened (bad audio does not)."""
        self.model_open = problem is None or problem in ("NaN/Inf", "maximum per request")
        self.accepted, self.texts = [], []
        self.language = step.language_name()
        self.multiplier = None if step.multiplier is None else step.multiplier[1]

    def expected(self) -> str:
        samples = np.concatenate(self.accepted) if self.accepted else np.zeros(0, np.float32)
        return self.reference(samples, self.language, self.multiplier)

    def _ended(self) -> None:
        assert "".join(self.texts) == self.expected()
        self.model_open, self.accepted, self.texts = False, [], []


# ---------------------------------------------------------------------------------------------- strategies

speech_audio = st.builds(
    lambda offset, n: ("speech", offset, n), st.integers(0, len(SOURCE) - 1), st.integers(0, 12_000)
)
float32s = st.floats(width=32, allow_nan=True, allow_infinity=True)
bad_values = st.lists(float32s, min_size=1, max_size=40).map(lambda v: ("values", tuple(v)))
audio = st.one_of(
    *[speech_audio] * 5,
    bad_values,
    st.just(("long", MAX_SAMPLES + 1)),
    st.sampled_from(["FP64", "FP16", "INT16", "INT32"]).map(lambda dt: ("dtype", dt)),
    st.sampled_from([(3,), (1, 3, 1), (2, 3), (0, 3)]).map(lambda shape: ("shape", shape)),
    st.just(("short_bytes",)),
    st.just(("strings",)),
    st.just(("missing",)),
)
languages = st.one_of(
    *[st.none()] * 3,
    st.sampled_from(["de", "German", " zh ", "CHINESE", "es", "ja", "", "xx", "Klingon"]).map(lambda s: ("text", s)),
    st.text(max_size=12).map(lambda s: ("text", s)),
    st.sampled_from([b"\xff", b"de\x80", b"\xc3"]).map(lambda b: ("bytes", b)),
    st.just(("dtype",)),
    st.just(("shape",)),
)
multipliers = st.one_of(
    *[st.none()] * 3,
    st.integers(1, 4).map(lambda v: ("int32", v)),
    st.integers(-(2**31), 2**31 - 1).map(lambda v: ("int32", v)),
    st.just(("dtype",)),
    st.just(("shape",)),
)
rarely = st.sampled_from([False, False, False, True])
any_step = st.builds(Step, rarely, rarely, audio, languages, multipliers)
plain_step = st.builds(Step, rarely, rarely, speech_audio)
steps = st.one_of(plain_step, any_step, any_step)
# most scripts begin with a valid START, so that later requests reach an open stream
scripts = st.tuples(st.sampled_from([True, True, True, False]), st.lists(steps, min_size=1, max_size=6)).map(
    lambda t: [Step(True, False, ("speech", 0, 2_000)), *t[1]] if t[0] else t[1]
)


def ok(n: int = 4_000, **kw) -> Step:
    return Step(kw.pop("start", False), kw.pop("end", False), ("speech", 1_000, n), **kw)


@pytest.fixture(scope="module")
def fuzz_client(server):
    client = RawClient(server.grpc_url)
    yield client
    client.close()


def test_fuzzed_requests_get_clear_errors_and_leave_the_streams_alone(server, reference, fuzz_client):
    sequence_ids = itertools.count(7_000_000)
    outcomes: Counter[str] = Counter()

    @settings(
        max_examples=200, deadline=None, derandomize=True, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )  # fmt: skip
    @given(scripts)
    @example([ok(start=True), Step(False, False, ("values", (0.1, float("nan"), 0.2))), ok(end=True)])  # NaN
    @example([ok(start=True), Step(False, False, ("values", (float("-inf"),))), ok(end=True)])  # Inf
    @example([ok(start=True), Step(False, False, ("long", 16_000 * 600)), ok(end=True)])  # a 38 MB piece
    @example([ok(start=True), ok(0), ok(end=True)])  # empty piece
    @example([ok()])  # missing START
    @example([ok(start=True), ok(start=True), ok(end=True)])  # START twice on a live id
    @example([ok(start=True, end=True), ok(end=True)])  # END twice
    @example([ok(start=True, language=("text", "Klingon")), ok(end=True)])  # unknown language
    @example([ok(start=True, multiplier=("int32", 0)), ok(start=True, multiplier=("int32", 5)), ok(end=True)])
    @example([ok(start=True, language=("bytes", b"\xffde")), ok(end=True)])  # not UTF-8
    @example([ok(start=True), ok(language=("bytes", b"\xc3")), ok(end=True)])  # not UTF-8, later request
    @example([ok(20_000, start=True), Step(False, True, ("values", (float("nan"),)))])  # END with bad audio ends it
    @example([Step(True, False, ("dtype", "FP64")), ok(start=True, multiplier=("dtype",)), ok()])  # dtypes
    @example([ok(start=True), Step(False, False, ("shape", (2, 3))), Step(False, False, ("missing",)), ok(end=True)])
    @example([ok(start=True, multiplier=("int32", 3)), ok(24_000), ok(end=True)])  # m=3
    def run(script: list[Step]) -> None:
        sequence_id = next(sequence_ids)
        oracle = Oracle(reference)
        for step in script:
            outcomes[oracle.check(step, fuzz_client.request(sequence_id, step.start, step.end, step.inputs()))] += 1
        if oracle.triton_open:  # close the sequence in Triton (and the model's stream, if any)
            outcomes[oracle.check(ok(0, end=True), fuzz_client.request(sequence_id, False, True, ok(0).inputs()))] += 1

    with Bystander(server.grpc_url, pause=0.3) as healthy:
        run()
        healthy.expect(reference)
    # the examples reached every kind of answer, many times (the counts are deterministic: derandomize=True)
    assert min(outcomes[k] for k in ("accepted", "model refused", "Triton refused", "stream ended")) >= 20, outcomes
    assert wait_gauge(server, "infinisst_active_streams", lambda v: v == 0) == 0  # nothing left open
    assert wait_gauge(server, "infinisst_kv_pages_used", lambda v: v == 0) == 0


def test_start_again_on_a_live_id_cancels_the_old_stream_clearly(server, reference):
    """START on a sequence id whose stream still has requests queued: each of them gets FINAL and an error that
    says why; the new stream translates exactly as if alone."""
    queued = long_audio(8.0)
    new = speech(SPEECH[2])
    with StreamingClient(server.grpc_url) as client:
        old = client.open_stream(sequence_id=31_337)
        for start in range(0, len(queued), 16_000):
            old.send(queued[start : start + 16_000])
        again = client.open_stream(sequence_id=31_337)
        again.send(new, end=True)
        result = again.result(timeout=60)
        records = [old.wait_request(i, timeout=60) for i in range(8)]
    assert result.errors == [] and result.text == reference(new, None, None)
    assert all(r.finals == 1 for r in records)
    cancelled = [r.error for r in records if r.error is not None]
    assert cancelled, "the old stream's queued requests were not cancelled"
    for error in cancelled:
        assert error.code == "CANCELLED" and "a new START request arrived for its sequence id" in error.message


def test_end_with_bad_content_still_ends_the_stream(server, reference):
    """Triton closes a sequence at its END request whatever the model answers, so an END with bad content must
    still end the model's stream (translating what was buffered) instead of holding it until the idle timeout."""
    samples = speech(SPEECH[1])
    with StreamingClient(server.grpc_url) as client:
        stream = client.open_stream()
        stream.send(samples)
        stream.send(np.array([0.0, np.inf], np.float32), end=True)
        result = stream.result(timeout=60)
    assert [r.finals for r in result.requests] == [1, 1]
    assert result.requests[0].error is None and result.requests[1].error.code == "INVALID_ARG"
    assert result.text == reference(samples, None, None)  # the buffered tail was translated and sent
    # freed at once, well before the model's idle timeout (MAIN: 4 s) could have done it
    assert wait_gauge(server, "infinisst_active_streams", lambda v: v == 0, timeout=2.0) == 0
