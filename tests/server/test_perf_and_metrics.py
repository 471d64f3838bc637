"""perf_analyzer against the server (streaming, sequences of real audio), and the custom metrics it leaves."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from client import perf_data, perf_report
from client.api import StreamingClient
from client.audio import sample_file
from server_tools.metrics import metric_values

from .conftest import MAIN, SPEECH, speech
from .harness import PERF_ANALYZER

pytestmark = pytest.mark.server


def test_perf_analyzer_streams_sequences_without_errors(server, tmp_path):
    steps = tmp_path / "steps.json"
    data = perf_data.build([sample_file(SPEECH[0]), sample_file(SPEECH[1])], piece_seconds=0.96)
    steps.write_text(json.dumps(data))
    sequence_length = min(len(s) for s in data["data"])
    assert sequence_length >= 3
    profile = tmp_path / "profile.json"
    command = [
        str(PERF_ANALYZER),
        "-m", "infinisst",
        "-u", server.grpc_url,
        "-i", "grpc",
        "--streaming",
        "--input-data", str(steps),
        "--sequence-length", str(sequence_length),
        "--sequence-length-variation", "0",
        "--concurrency-range", "4",
        "--request-count", str(3 * 4 * sequence_length),  # three sequences per concurrent slot, no stability search
        "--profile-export-file", str(profile),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=240)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "error" not in output.lower(), output
    assert "Request concurrency: 4" in output

    summary = perf_report.summarize(json.loads(profile.read_text()))
    assert summary and summary[0]["concurrency"] == 4
    row = summary[0]
    assert row["requests"] >= 3 * 4 * sequence_length and row["requests_without_response"] == 0
    assert 0 < row["first_response"]["p50"] <= row["last_response"]["p50"]


def test_custom_metrics_are_plausible(server):
    with StreamingClient(server.grpc_url) as client:
        stream = client.open_stream()
        samples = speech(SPEECH[1])
        for start in range(0, len(samples), 4000):
            stream.send(samples[start : start + 4000])
        stream.end()
        result = stream.result(timeout=60)
    assert result.errors == [] and result.text

    labels = '{instance="infinisst_0_0",model="infinisst"}'
    deadline = time.monotonic() + 10
    while True:  # gauges settle once the metrics thread has seen the idle engine
        text = server.metrics()
        active = metric_values(text, "infinisst_active_streams")
        if active.get(labels) == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert active[labels] == 0
    assert metric_values(text, "infinisst_pending_chunks")[labels] == 0
    used = metric_values(text, "infinisst_kv_pages_used")[labels]
    free = metric_values(text, "infinisst_kv_pages_free")[labels]
    assert used == 0 and free == int(MAIN["num_pages"])
    assert metric_values(text, "infinisst_generated_tokens_total")[labels] >= len(result.chunk_latencies())
    latency = metric_values(text, "infinisst_chunk_latency_seconds_count")
    assert latency[labels] >= len(result.chunk_latencies())
    assert 0 < metric_values(text, "infinisst_chunk_latency_seconds_sum")[labels] < 60 * latency[labels]
    batches = metric_values(text, "infinisst_batch_size_count")
    for phase in ("prefill", "decode"):
        key = f'{{instance="infinisst_0_0",model="infinisst",phase="{phase}"}}'
        assert batches[key] > 0
    # the capacity model is its own instance with its own series
    assert '{instance="infinisst_one_0_0",model="infinisst_one"}' in metric_values(text, "infinisst_kv_pages_free")
