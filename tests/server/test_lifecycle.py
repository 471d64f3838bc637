"""A client that disconnects mid-stream, and a server shut down with streams in flight."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from client.api import StreamingClient
from server_tools.metrics import metric_values

from .conftest import MAIN, SPEECH, speech
from .harness import TritonServer, write_repository

pytestmark = pytest.mark.server

LABELS = '{instance="infinisst_0_0",model="infinisst"}'


def wait_metric(server: TritonServer, name: str, predicate, timeout: float = 15.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        value = metric_values(server.metrics(), name).get(LABELS)
        if (value is not None and predicate(value)) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def long_audio(seconds: float) -> np.ndarray:
    samples = np.concatenate([speech(name) for name in SPEECH])
    return np.resize(samples, int(seconds * 16_000))


def test_disconnect_cancels_the_stream_and_frees_it(server, reference):
    audio = long_audio(20.0)
    with StreamingClient(server.grpc_url) as bystander_client:
        bystander = bystander_client.open_stream()
        client = StreamingClient(server.grpc_url)
        stream = client.open_stream()
        for start in range(0, len(audio), 16_000):  # 20 one-second requests queue up on the server
            stream.send(audio[start : start + 16_000])
        assert wait_metric(server, "infinisst_pending_chunks", lambda v: v >= 5) >= 5
        client.close()  # the gRPC stream goes away with requests in flight

        short = speech(SPEECH[2])
        bystander.send(short, end=True)
        result = bystander.result(timeout=60)
    assert result.errors == [] and result.text == reference(short, None, None)
    assert wait_metric(server, "infinisst_active_streams", lambda v: v == 0) == 0
    assert wait_metric(server, "infinisst_kv_pages_used", lambda v: v == 0) == 0


def test_shutdown_drains_streams_in_flight(tmp_path):
    """SIGTERM while streams are in flight: Triton keeps serving the requests it has accepted until their sequences
    end (or until its exit timeout), so each of them gets its text and exactly one FINAL; requests arriving after
    the signal are refused by Triton itself; then the server exits in time."""
    exit_timeout = 8
    repository = write_repository(tmp_path / "models", {"infinisst": {**MAIN, "dtype": "float32"}})
    server = TritonServer(repository, tmp_path / "tritonserver.log", (f"--exit-timeout-secs={exit_timeout}",))
    server.start()
    try:
        server.wait_ready(["infinisst"])
        audio = long_audio(4.0)
        client = StreamingClient(server.grpc_url)
        streams = [client.open_stream() for _ in range(4)]
        for i, stream in enumerate(streams):
            for start in range(0, len(audio), 8_000):
                # streams 0-2 end; stream 3 is abandoned without END (its sequence stays open in Triton)
                stream.send(audio[start : start + 8_000], end=i < 3 and start + 8_000 >= len(audio))
        time.sleep(0.3)  # let the requests reach the server: Triton refuses new ones once it is stopping
        os.killpg(server.process.pid, signal.SIGTERM)
        stopped = time.monotonic()
        results = [s.result(timeout=60) for s in streams[:3]]
        open_records = [streams[3].wait_request(i, timeout=60) for i in range(len(streams[3]._requests))]
        client.close()  # a connected gRPC stream would keep Triton's frontend from stopping
        code = server.process.wait(timeout=exit_timeout + 30)
        took = time.monotonic() - stopped
    finally:
        server.stop()
    refused = "stopped accepting new inference requests"
    for result in results:
        assert [r.finals for r in result.requests] == [1] * len(result.requests)
        assert all(refused in e.message for e in result.errors), result.errors
        assert result.requests[0].error is None and result.text
    assert all(r.finals == 1 and (r.error is None or refused in r.error.message) for r in open_records)
    assert code is not None and took < exit_timeout + 30, server.log()
