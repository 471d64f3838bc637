"""Faults against a real tritonserver, each with a healthy stream beside it that must keep its exact text.

One server for the module, in explicit model-control mode (so models can be unloaded, reloaded and loaded with
bad configs), with short idle limits (the model frees a silent stream after 1 s, Triton's reaper after 4 s)
and a test-only fault parameter. Its last test stops it with SIGTERM while streams are in flight.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from client.api import StreamingClient

from .conftest import MAIN, SPEECH, Bystander, long_audio, speech
from .harness import (
    MODEL_DIR,
    ROOT,
    TritonServer,
    model_gauge,
    process_status,
    rewrite_config,
    stub_pids,
    wait_gauge,
    write_repository,
)

pytestmark = pytest.mark.server

MODEL_IDLE_S = 1.0  # the model's stream_idle_timeout_s (freed 1-2 s after the last request: checked every second)
REAPER_S = 4.0  # Triton's max_sequence_idle_microseconds: well after the model
EXIT_TIMEOUT_S = 10
FAULTY = 666  # sequence id whose stream raises in its processing (test_fault_sequence_ids)
FAULT_STEP = 8
# Settings that do not change a stream's text keep the conftest `reference` valid for every model here.
FAULTS = {**MAIN, "stream_idle_timeout_s": str(MODEL_IDLE_S), "test_fault_sequence_ids": f"{FAULTY}@{FAULT_STEP}"}
PAGES_M1, PAGES_M4 = 25, 29  # worst-case KV pages of one stream at m=1 / m=4 (window 300, page 16, S=19)
CAPACITY = {**MAIN, "max_streams": "3", "num_pages": str(3 * PAGES_M1)}


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton_faults")
    models = {"infinisst": FAULTS, "infinisst_cap": CAPACITY, "infinisst_reload": MAIN, "infinisst_spare": MAIN}
    repository = write_repository(root / "models", models, triton_idle_s=REAPER_S)
    args = ("--model-control-mode=explicit", "--load-model=infinisst", "--load-model=infinisst_cap",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}")  # fmt: skip
    server = TritonServer(repository, root / "tritonserver.log", args)
    server.start()
    try:
        server.wait_ready(["infinisst", "infinisst_cap"])
        yield server
    finally:
        server.stop()  # already stopped by the SIGTERM test when the whole module runs


def idle_engine(server: TritonServer, model: str = "infinisst") -> None:
    assert wait_gauge(server, "infinisst_active_streams", lambda v: v == 0, model) == 0
    assert wait_gauge(server, "infinisst_pending_chunks", lambda v: v == 0, model) == 0
    assert wait_gauge(server, "infinisst_kv_pages_used", lambda v: v == 0, model) == 0


def send_pieces(stream, audio: np.ndarray, size: int, end: bool = False) -> None:
    starts = range(0, len(audio), size)
    for start in starts:
        stream.send(audio[start : start + size], end=end and start == starts[-1])


# A client process that queues 20 s of audio on one stream, says so, and waits to be killed.
KILLED_CLIENT = """
import sys, time
from client.api import StreamingClient
from tests.server.conftest import long_audio
audio = long_audio(20.0)
stream = StreamingClient(sys.argv[1]).open_stream()
for start in range(0, len(audio), 16_000):
    stream.send(audio[start : start + 16_000])
print("sent", flush=True)
time.sleep(600)
"""


def test_killed_client_frees_its_stream(fault_server, reference):
    """A client process dies mid-stream (its TCP connection drops, no gRPC cancel): the server notices, cancels
    the stream and frees it."""
    with Bystander(fault_server.grpc_url) as healthy:
        client = subprocess.Popen(
            [sys.executable, "-c", KILLED_CLIENT, fault_server.grpc_url], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        try:
            assert client.stdout.readline().strip() == "sent"
            assert wait_gauge(fault_server, "infinisst_pending_chunks", lambda v: v >= 4) >= 4
        finally:
            client.kill()
            client.wait()
        # only the healthy stream is left, while it is still sending
        assert wait_gauge(fault_server, "infinisst_active_streams", lambda v: v == 1) == 1
        assert healthy._thread.is_alive()
        healthy.expect(reference)
    idle_engine(fault_server)


def test_cancelled_requests_free_the_stream(fault_server, reference):
    """tritonclient's own cancellation (stop_stream(cancel_requests=True)) with requests queued: the stream is
    freed, and its sequence id starts again as a new stream."""
    audio = long_audio(12.0)
    sequence_id = 4_242
    with Bystander(fault_server.grpc_url) as healthy:
        client = triton_grpc.InferenceServerClient(fault_server.grpc_url)
        client.start_stream(callback=lambda result, error: None)
        for i, start in enumerate(range(0, len(audio), 16_000)):
            piece = triton_grpc.InferInput("AUDIO", [1, 16_000], "FP32")
            piece.set_data_from_numpy(audio[None, start : start + 16_000])
            client.async_stream_infer(
                "infinisst", [piece], sequence_id=sequence_id, sequence_start=i == 0, enable_empty_final_response=True
            )
        assert wait_gauge(fault_server, "infinisst_pending_chunks", lambda v: v >= 4) >= 4
        client.stop_stream(cancel_requests=True)
        client.close()
        assert wait_gauge(fault_server, "infinisst_active_streams", lambda v: v == 1) == 1
        with StreamingClient(fault_server.grpc_url) as again:
            stream = again.open_stream(sequence_id=sequence_id)
            send_pieces(stream, speech(SPEECH[0]), 8_000, end=True)
            result = stream.result(timeout=60)
        assert result.errors == [] and result.text == reference(speech(SPEECH[0]), None, None)
        healthy.expect(reference)
    idle_engine(fault_server)


def test_idle_past_the_model_timeout_then_past_tritons_reaper(fault_server, reference):
    """Silent past the model's timeout: freed by the model, the next request is told to start a new sequence.
    Silent past Triton's reaper too: Triton itself asks for START. The id then starts a new stream."""
    with Bystander(fault_server.grpc_url) as healthy, StreamingClient(fault_server.grpc_url) as client:
        stream = client.open_stream()
        stream.send(speech(SPEECH[2])[:8_000])
        assert stream.wait_request(0, timeout=30).error is None
        # freed by the model (its expiry check runs every second), pages included, while Triton keeps the sequence;
        # wait out the timeout first, so that a gauge not yet refreshed since the stream opened cannot pass early
        time.sleep(2 * MODEL_IDLE_S + 0.2)
        assert wait_gauge(fault_server, "infinisst_active_streams", lambda v: v == 1) == 1
        late = client.open_stream(sequence_id=stream.sequence_id, resume=True)
        late.send(np.zeros(100, np.float32))
        error = late.wait_request(0, timeout=30).error
        assert error.code == "INVALID_ARG" and "start a new sequence" in error.message

        time.sleep(REAPER_S + 1.0)  # Triton's reaper drops the sequence (the late request renewed it)
        later = client.open_stream(sequence_id=stream.sequence_id, resume=True)
        later.send(np.zeros(100, np.float32))
        assert "START" in later.wait_request(0, timeout=30).error.message

        again = client.open_stream(sequence_id=stream.sequence_id)
        send_pieces(again, speech(SPEECH[2]), 8_000, end=True)
        result = again.result(timeout=60)
        assert result.errors == [] and result.text == reference(speech(SPEECH[2]), None, None)
        healthy.expect(reference)
    idle_engine(fault_server)


def test_capacity_refuses_new_streams_and_running_ones_keep_their_text(fault_server, reference):
    """infinisst_cap admits 3 streams and 75 KV pages: a 4th stream is refused for the stream limit; with two
    m=4 streams running (58 pages) an m=1 stream (25 pages) is refused for KV memory. The running streams
    are unaffected."""
    url = fault_server.grpc_url
    for m, running, limit in ((1, 3, "max_streams=3"), (4, 2, "KV memory full")):
        bystanders = [Bystander(url, "infinisst_cap", None, m, seconds=8.0) for _ in range(running)]
        for b in bystanders:
            b.__enter__()
        try:
            all_in = wait_gauge(fault_server, "infinisst_active_streams", lambda v, n=running: v == n, "infinisst_cap")
            assert all_in == running
            with StreamingClient(url, "infinisst_cap") as client:
                refused = client.open_stream()
                refused.send(speech(SPEECH[2]))
                error = refused.wait_request(0, timeout=30).error
            assert error.code == "UNAVAILABLE" and limit in error.message, error
            results = [b.finish() for b in bystanders]
        finally:
            for b in bystanders:
                b.__exit__(None, None, None)
        for b, result in zip(bystanders, results):
            assert result.errors == [] and [r.finals for r in result.requests] == [1] * len(result.requests)
            assert result.text and result.text == reference(b.audio[: b.sent], None, m)
        idle_engine(fault_server, "infinisst_cap")
    with StreamingClient(url, "infinisst_cap") as client:  # room again
        stream = client.open_stream()
        stream.send(speech(SPEECH[2]), end=True)
        assert stream.result(timeout=60).errors == []


def test_injected_fault_fails_only_its_stream(fault_server, reference):
    """An exception inside one stream's processing (the engine's fault hook, set by test_fault_sequence_ids):
    that stream's open requests fail with INTERNAL, later ones are told to start a new sequence, its memory is
    freed; the stream beside it keeps its exact text."""
    audio = np.concatenate([speech(SPEECH[1]), speech(SPEECH[0])])
    with Bystander(fault_server.grpc_url) as healthy, StreamingClient(fault_server.grpc_url) as client:
        faulty = client.open_stream(sequence_id=FAULTY)
        for start in range(0, len(audio), 4_000):
            faulty.send(audio[start : start + 4_000], end=start + 4_000 >= len(audio))
            time.sleep(0.05)
        result = faulty.result(timeout=60)
        healthy.expect(reference)
    assert [r.finals for r in result.requests] == [1] * len(result.requests)
    failed = [i for i, r in enumerate(result.requests) if r.error is not None]
    assert failed and failed == list(range(failed[0], len(result.requests)))  # every request from the fault on
    first = result.requests[failed[0]].error
    assert first.code == "INTERNAL" and "fault injected at decoding step" in first.message, first
    assert all(result.requests[i].error.code in ("INTERNAL", "INVALID_ARG") for i in failed)
    assert reference(audio, None, None).startswith(result.text)  # what it said before the fault was right
    idle_engine(fault_server)


def test_unload_and_reload_leak_nothing(fault_server, reference):
    """Unload a model with a stream in flight (its client gone), reload it, three times: each unload finishes
    and its stub process exits, Triton's threads and memory stay level, a reloaded model translates exactly;
    a stream on another model runs throughout."""
    control = triton_grpc.InferenceServerClient(fault_server.grpc_url)
    server_pid = fault_server.process.pid
    samples = speech(SPEECH[3])
    figures = []
    with Bystander(fault_server.grpc_url, pause=0.4) as healthy:
        for _ in range(3):
            control.load_model("infinisst_reload")
            (stub,) = stub_pids(fault_server, "infinisst_reload")
            with StreamingClient(fault_server.grpc_url, "infinisst_reload") as client:
                stream = client.open_stream()
                send_pieces(stream, samples, 8_000, end=True)
                result = stream.result(timeout=60)
                assert result.errors == [] and result.text == reference(samples, None, None)
                in_flight = client.open_stream()
                send_pieces(in_flight, long_audio(8.0), 16_000)  # no END; the client leaves with it queued
                assert wait_gauge(fault_server, "infinisst_pending_chunks", lambda v: v >= 2, "infinisst_reload")
            idle_engine(fault_server, "infinisst_reload")
            # Triton finishes an unload once the gRPC streams that used the model are closed (see reliability.md)
            control.unload_model("infinisst_reload")
            deadline = time.monotonic() + 30
            while control.is_model_ready("infinisst_reload") or process_status(stub):
                assert time.monotonic() < deadline, "the unload did not finish, or its stub did not exit"
                time.sleep(0.1)
            # Triton keeps an unloaded model's metric series; finalize() left them at the freed state
            assert model_gauge(fault_server, "infinisst_kv_pages_used", "infinisst_reload") == 0
            assert model_gauge(fault_server, "infinisst_active_streams", "infinisst_reload") == 0
            status = process_status(server_pid)
            figures.append((int(status["VmRSS"].split()[0]) / 1024, int(status["Threads"])))
        healthy.expect(reference)
    rss, threads = zip(*figures)
    assert len(set(threads)) == 1, figures  # no thread left behind by an unload
    assert rss[-1] - rss[0] < 16, figures  # MB; a leaked model would be hundreds
    assert "did not finish" not in fault_server.log(200_000)


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"checkpoint": "/nonexistent/checkpoint"}, ["parameter 'checkpoint'", "no checkpoint at /nonexistent"]),
        ({"checkpoint": "BROKEN"}, ["parameter 'checkpoint'", "cannot build the engine"]),
    ],
)
def test_bad_config_fails_the_load_naming_the_parameter(fault_server, tmp_path, overrides, named):
    """A bad parameter or checkpoint in config.pbtxt: the load fails with a message naming it, no traceback."""
    if overrides.get("checkpoint") == "BROKEN":  # a checkpoint folder whose config.json is not JSON
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "config.json").write_text("{ not json")
        overrides = {"checkpoint": str(tmp_path / "broken")}
    config = rewrite_config((MODEL_DIR / "config.pbtxt").read_text(), "infinisst_spare", {**MAIN, **overrides})
    (fault_server.repository / "infinisst_spare" / "config.pbtxt").write_text(config)
    control = triton_grpc.InferenceServerClient(fault_server.grpc_url)
    with pytest.raises(InferenceServerException) as info:
        control.load_model("infinisst_spare")
    message = str(info.value)
    assert all(text in message for text in named), message
    assert "Traceback" not in message
    index = {m["name"]: m for m in control.get_model_repository_index(as_json=True)["models"]}
    assert index["infinisst_spare"]["state"] == "UNAVAILABLE"
    assert control.is_model_ready("infinisst")  # the server serves on


def test_sigterm_with_streams_in_flight(fault_server, reference):
    """SIGTERM (runs last: it stops the module's server). A stream whose audio is all sent gets its exact text;
    a stream still sending gets FINAL for every request (Triton refuses those sent after the signal); the
    server exits within its exit timeout."""
    audio = long_audio(6.0)
    client = StreamingClient(fault_server.grpc_url)
    complete = client.open_stream(language="de")
    send_pieces(complete, audio, 8_000, end=True)  # queued: translated while the server is stopping
    sending = client.open_stream()
    stop = threading.Event()

    def keep_sending() -> None:
        for start in range(0, len(audio), 4_000):
            if stop.is_set():
                break
            sending.send(audio[start : start + 4_000])
            time.sleep(0.1)
        sending.end()

    thread = threading.Thread(target=keep_sending)
    thread.start()
    time.sleep(0.5)
    os.killpg(fault_server.process.pid, signal.SIGTERM)
    signalled = time.monotonic()
    try:
        result = complete.result(timeout=60)
        time.sleep(0.5)  # a few requests after the signal
        stop.set()
        thread.join()
        open_result = sending.result(timeout=60)
    finally:
        client.close()  # a connected gRPC stream would keep Triton's frontend from stopping
    code = fault_server.process.wait(timeout=EXIT_TIMEOUT_S + 20)
    took = time.monotonic() - signalled
    assert result.errors == [] and result.text == reference(audio, "de", None)
    assert [r.finals for r in open_result.requests] == [1] * len(open_result.requests)
    refused = ("stopped accepting new inference requests", "shutting down")
    assert all(any(text in e.message for text in refused) for e in open_result.errors), open_result.errors
    assert open_result.requests[0].error is None
    assert code is not None and took < EXIT_TIMEOUT_S + 5, (took, fault_server.log())
    assert "lack their FINAL" not in fault_server.log(200_000)
