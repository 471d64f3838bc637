"""Every error case of the wire contract, while a healthy stream runs beside them and keeps its exact text."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from client.api import ServerError, StreamingClient

from .conftest import SPEECH, speech

pytestmark = pytest.mark.server

MAX_REQUEST_SECONDS = 5  # conftest.MAIN
IDLE_TIMEOUT_S = 4  # conftest.MAIN stream_idle_timeout_s


def one_request(client: StreamingClient, samples, *, end: bool = True, **options) -> list[ServerError]:
    """One request on a new (or, with resume=True, an existing) sequence; its errors, once its FINAL came."""
    stream = client.open_stream(**options)
    stream.send(np.asarray(samples, np.float32), end=end)
    record = stream.wait_request(0, timeout=30)
    assert record.finals == 1
    return [record.error] if record.error else []


def only_error(errors: list[ServerError]) -> ServerError:
    assert len(errors) == 1, errors
    return errors[0]


def test_errors_beside_a_healthy_stream(server, reference):
    samples = np.concatenate([speech(SPEECH[0]), speech(SPEECH[1])])
    rng = np.random.default_rng(7)
    bad_pieces = {
        3: np.array([0.1, np.nan, 0.2], np.float32),
        6: np.full(100, np.inf, np.float32),
        9: np.zeros(int((MAX_REQUEST_SECONDS + 0.5) * 16_000), np.float32),
        12: np.array([-np.inf], np.float32),
    }
    with StreamingClient(server.grpc_url) as client:
        healthy = client.open_stream(language="de")

        def run_healthy():
            start, i = 0, 0
            while start < len(samples):
                if i in bad_pieces:
                    healthy.send(bad_pieces[i])
                else:
                    size = int(rng.integers(2000, 9000))
                    healthy.send(samples[start : start + size])
                    start += size
                    time.sleep(0.03)
                i += 1
            healthy.end()

        thread = threading.Thread(target=run_healthy)
        thread.start()

        # Content errors on START: the sequence is not opened.
        e = only_error(one_request(client, np.zeros(100), language="Klingon"))
        assert e.code == "INVALID_ARG" and "Klingon" in e.message
        for m in (0, 5):
            e = only_error(one_request(client, np.zeros(100), latency_multiplier=m))
            assert e.code == "INVALID_ARG" and "1..4" in e.message

        # A sequence whose START failed is unknown to the model: resuming it asks for a new sequence.
        failed = client.open_stream(language="xx")
        failed.send(np.zeros(10, np.float32))  # START without END: Triton keeps the sequence
        assert failed.wait_request(0, timeout=30).error.code == "INVALID_ARG"
        e = only_error(one_request(client, np.zeros(10), resume=True, sequence_id=failed.sequence_id))
        assert e.code == "INVALID_ARG" and "start a new sequence" in e.message

        # Without START, and after END: Triton's sequence batcher answers (its message, no code prefix).
        e = only_error(one_request(client, np.zeros(10), resume=True, sequence_id=987_654_321))
        assert "START" in e.message
        done = client.open_stream()
        done.send(speech(SPEECH[2]), end=True)
        assert done.result(timeout=30).errors == []
        e = only_error(one_request(client, np.zeros(10), resume=True, sequence_id=done.sequence_id))
        assert "START" in e.message

        thread.join()
        result = healthy.result(timeout=60)

    errors = {i: r.error for i, r in enumerate(result.requests) if r.error is not None}
    assert sorted(errors) == sorted(bad_pieces)  # exactly the bad requests failed, each with one FINAL
    assert [r.finals for r in result.requests] == [1] * len(result.requests)
    for i, error in errors.items():
        assert error.code == "INVALID_ARG"
        assert ("maximum per request" in error.message) if i == 9 else ("NaN/Inf" in error.message)
    # the stream went on as if the bad requests never came
    assert result.text == reference(samples, "de", None)


def test_idle_expired_stream_asks_for_a_new_sequence(server):
    with StreamingClient(server.grpc_url) as client:
        stream = client.open_stream()
        stream.send(speech(SPEECH[2])[:8000])
        assert stream.wait_request(0, timeout=30).error is None
        time.sleep(IDLE_TIMEOUT_S + 2.0)  # the model's own idle cleanup (engine expiry check runs every second)
        e = only_error(one_request(client, np.zeros(10), resume=True, sequence_id=stream.sequence_id))
        assert e.code == "INVALID_ARG" and "start a new sequence" in e.message
        # the id can start again
        again = client.open_stream(sequence_id=stream.sequence_id)
        again.send(speech(SPEECH[2]), end=True)
        assert again.result(timeout=30).errors == []


def test_capacity_is_unavailable_and_leaves_the_running_stream_alone(server):
    with StreamingClient(server.grpc_url, model="infinisst_one") as client:
        first = client.open_stream()
        first.send(speech(SPEECH[2])[:16000])
        first.wait_request(0, timeout=30)
        e = only_error(one_request(client, np.zeros(10)))
        assert e.code == "UNAVAILABLE"
        first.send(speech(SPEECH[2])[16000:], end=True)
        assert first.result(timeout=30).errors == []
        assert first.result().text
        assert one_request(client, np.zeros(10)) == []  # room again once the stream ended


def test_bad_parameter_fails_the_load_with_its_name(server):
    index = {m["name"]: m for m in server.model_index()}
    bad = index["infinisst_badparam"]
    assert bad["state"] == "UNAVAILABLE"
    assert "'beam_size'" in bad["reason"] and "'lots'" in bad["reason"]
    assert "Traceback" not in bad["reason"]
