"""Session fixtures of the server tests: one tritonserver with test copies of the model, and reference texts.

Every test module here is marked ``server``. The server serves three copies of model_repository/infinisst:
- ``infinisst``: the demo checkpoint in float64 (so texts compare exactly with the in-process engine), a short
  idle timeout and a small maximum request length, so that those error paths are quick to reach;
- ``infinisst_one``: room for one stream only (capacity errors);
- ``infinisst_badparam``: an invalid parameter, which must fail to load with a message naming it.
"""

from __future__ import annotations

import functools
import os
import threading
import time

import numpy as np
import pytest

from client.api import StreamingClient, StreamResult
from client.audio import load_audio, sample_file
from server_tools.model_config import config_parameters

from .harness import DEMO_CHECKPOINT, MODEL_DIR, TritonServer, write_repository

MAIN = {
    "dtype": "float64",
    "engine_max_batch_size": "16",
    "max_streams": "32",
    "num_pages": "1024",
    "max_llm_cache_tokens": "300",
    "max_request_seconds": "5",
    "stream_idle_timeout_s": "4",
    "metrics_interval_s": "0.2",
    "cancel_poll_interval_s": "0.05",
    "shutdown_timeout_s": "10",
}
# Triton's reaper (longer than the model's stream_idle_timeout_s, so the model's own expiry is reachable).
TRITON_IDLE_S = 8
ONE_STREAM = {"max_streams": "1", "num_pages": "128", "max_llm_cache_tokens": "300"}
BAD_PARAMETER = {"beam_size": "lots"}

# Files of the pytest-audioeval package used as speech (the demo model treats any audio as its source).
SPEECH = [
    "en/quick_brown_fox.wav",
    "en/counting.wav",
    "en/hello_world.wav",
    "es/conteo.wav",
    "fr/bonjour_monde.wav",
    "it/conteggio.wav",
    "pt/ola_mundo.wav",
    "pl/liczenie.wav",
    "zh/jishu.wav",
]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    if not (DEMO_CHECKPOINT / "config.json").exists():
        pytest.fail(f"no demo checkpoint at {DEMO_CHECKPOINT}: run `make setup` first")
    root = tmp_path_factory.mktemp("triton")
    models = {"infinisst": MAIN, "infinisst_one": ONE_STREAM, "infinisst_badparam": BAD_PARAMETER}
    repository = write_repository(root / "models", models, triton_idle_s=TRITON_IDLE_S)
    triton = TritonServer(repository, root / "tritonserver.log")
    triton.start()
    try:
        triton.wait_ready(["infinisst", "infinisst_one"], failing=["infinisst_badparam"])
        yield triton
    finally:
        code = triton.stop()
        if os.environ.get("INFINISST_SHOW_SERVER_LOG"):
            print(triton.log(20_000))
        assert code is not None, "tritonserver did not exit on SIGTERM in time"


@functools.cache
def speech(name: str) -> np.ndarray:
    return load_audio(sample_file(name))


def long_audio(seconds: float) -> np.ndarray:
    """Real speech of any length: the SPEECH files joined, repeated as needed."""
    samples = np.concatenate([speech(name) for name in SPEECH])
    return np.resize(samples, int(seconds * 16_000))


class Bystander:
    """A healthy stream beside a fault: real speech in pieces from its own thread, until ``finish()``.

    It sends ``piece`` samples every ``pause`` seconds (about 1.7x real time by default, never silent long
    enough to be idle-expired), stops at ``finish()`` (or when its audio runs out), sends END and waits for the
    translation. ``expect(reference)`` then asserts the contract for it: no error, one FINAL per request, and
    exactly the text the engine produces for the audio it sent, alone.
    """

    def __init__(self, url: str, model: str = "infinisst", language: str | None = "de", multiplier: int | None = None,
                 seconds: float = 60.0, piece: int = 4_000, pause: float = 0.15, min_pieces: int = 8):  # fmt: skip
        self.audio = long_audio(seconds)
        self.language, self.multiplier = language, multiplier
        self.piece, self.pause, self.min_pieces = piece, pause, min_pieces
        self.client = StreamingClient(url, model)
        self.stream = self.client.open_stream(language=language, latency_multiplier=multiplier)
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send, name="bystander", daemon=True)

    def __enter__(self) -> Bystander:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()

    def _send(self) -> None:
        pieces = 0
        while self.sent < len(self.audio) and (pieces < self.min_pieces or not self._stop.is_set()):
            self.stream.send(self.audio[self.sent : self.sent + self.piece])
            self.sent = min(len(self.audio), self.sent + self.piece)
            pieces += 1
            time.sleep(self.pause)
        self.stream.end()

    def finish(self, timeout: float = 120.0) -> StreamResult:
        self._stop.set()
        self._thread.join()
        return self.stream.result(timeout=timeout)

    def expect(self, reference, timeout: float = 120.0) -> StreamResult:
        result = self.finish(timeout)
        assert result.errors == [], result.errors
        assert [r.finals for r in result.requests] == [1] * len(result.requests)
        assert result.text and result.text == reference(self.audio[: self.sent], self.language, self.multiplier)
        return result


@pytest.fixture(scope="session")
def reference():
    """``reference(samples, language, m)``: the text the engine produces for this audio alone, in-process, on
    the same checkpoint with the same engine configuration as the server's ``infinisst`` model."""
    from infinisst_backend.engine.engine import Engine
    from infinisst_backend.engine.events import TextDelta
    from infinisst_backend.serving import parameters

    params = {**config_parameters((MODEL_DIR / "config.pbtxt").read_text()), **MAIN}
    cfg = parameters.serving_config_from_parameters(params, "cpu", DEMO_CHECKPOINT.parents[1])
    engine = Engine.from_checkpoint(cfg.checkpoint, cfg.engine)
    cache: dict = {}
    piece = 16_000  # requests are limited to max_request_seconds; cutting does not change the text

    def translate(samples: np.ndarray, language: str | None = None, m: int | None = None) -> str:
        key = (samples.tobytes(), language, m)
        if key not in cache:
            stream_id = len(cache)
            engine.open_stream(stream_id, language, m)
            for start in range(0, len(samples), piece):
                engine.add_audio(stream_id, samples[start : start + piece], end=start + piece >= len(samples))
            engine.run_until_idle()
            events = list(engine.events)
            engine.events.clear()
            cache[key] = "".join(e.text for e in events if isinstance(e, TextDelta))
        return cache[key]

    return translate
