"""Concurrent streams through a real tritonserver: text, ordering and FINALs as the wire contract says."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from client.api import AudioStream, StreamingClient, StreamResult
from client.audio import random_pieces

from .conftest import SPEECH, speech

pytestmark = pytest.mark.server

# (file, language, m) per stream: several languages (Chinese joins turns without spaces) and multipliers.
STREAMS = [
    (SPEECH[0], "de", 1),
    (SPEECH[1], "German", 2),
    (SPEECH[2], None, None),
    (SPEECH[3], "es", 1),
    (SPEECH[4], "zh", 1),
    (SPEECH[5], "fr", 2),
    (SPEECH[6], "de", 1),
    (SPEECH[7], "it", 1),
    (SPEECH[8], "ja", 1),
]


def check_contract(stream: AudioStream, result: StreamResult) -> None:
    """Exactly one FINAL per request, RESPONSE_INDEX 0..n-1 once each, responses between the previous request's
    FINAL and their own request's FINAL."""
    assert [r.finals for r in result.requests] == [1] * len(result.requests)
    indices = sorted(p.index for p in stream.arrivals)
    assert indices == list(range(len(indices)))
    for piece in stream.arrivals:
        own = result.requests[piece.request_index]
        assert piece.received <= own.done
        if piece.request_index > 0:
            assert piece.received >= result.requests[piece.request_index - 1].done


def send_pieces(stream: AudioStream, pieces: list[np.ndarray], rng: np.random.Generator) -> None:
    for i, piece in enumerate(pieces):
        stream.send(piece, end=i == len(pieces) - 1)
        time.sleep(float(rng.uniform(0.0, 0.05)))  # interleave the streams' requests


def test_concurrent_streams_equal_each_stream_alone(server, reference):
    rng = np.random.default_rng(1234)
    with StreamingClient(server.grpc_url) as client:
        streams, threads = [], []
        for name, language, m in STREAMS:
            pieces = random_pieces(speech(name), rng, 800, 24_000)  # 0.05 s .. 1.5 s
            stream = client.open_stream(language=language, latency_multiplier=m)
            seed = int(rng.integers(1 << 30))
            thread = threading.Thread(target=send_pieces, args=(stream, pieces, np.random.default_rng(seed)))
            streams.append(stream)
            threads.append(thread)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = [s.result(timeout=120) for s in streams]

    for (name, language, m), stream, result in zip(STREAMS, streams, results):
        assert result.errors == []
        check_contract(stream, result)
        assert result.text == reference(speech(name), language, m), name
        assert result.text  # the demo model says something for every file
        seconds = [p.source_seconds for p in result.pieces]
        assert seconds == sorted(seconds) and 0 < seconds[-1] <= len(speech(name)) / 16_000 + 1e-3


def test_one_stream_many_tiny_pieces_and_empty_requests(server, reference):
    """Piece size does not change the text: 1,000-sample pieces with empty requests mixed in."""
    samples = speech(SPEECH[0])
    pieces = []
    for i, start in enumerate(range(0, len(samples), 1000)):
        pieces.append(samples[start : start + 1000])
        if i % 7 == 0:
            pieces.append(samples[:0])
    with StreamingClient(server.grpc_url) as client:
        stream = client.open_stream(language="de")
        for piece in pieces:
            stream.send(piece)
        stream.end()
        result = stream.result(timeout=60)
    assert result.errors == []
    check_contract(stream, result)
    assert result.text == reference(samples, "de", None)
    assert len(result.chunk_latencies()) == int(np.ceil(len(samples) / 15_360))


def test_stream_command_prints_translations_and_latencies(server, reference):
    """`python -m client.stream` on two files at once (the demo's client)."""
    import subprocess
    import sys

    from client.audio import sample_file

    files = [str(sample_file(SPEECH[0])), str(sample_file(SPEECH[2]))]
    command = [sys.executable, "-m", "client.stream", *files, "--url", server.grpc_url, "--fast"]
    run = subprocess.run(command + ["--piece-seconds", "0.5"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    for name in (SPEECH[0], SPEECH[2]):
        label = name.split("/")[-1]
        assert f"[{label}] {reference(speech(name), None, None)}\n" in run.stdout
        assert f"[{label} @" in run.stdout  # streamed pieces, labelled
    assert "chunk latency" in run.stdout and "first response" in run.stdout
