"""The engine: many live audio streams in, translation events out, one model instance.

Threading: the public methods (``open_stream``, ``add_audio``, ``cancel_stream``) run on the caller's thread.
They validate, reserve, and post a command to the inbox; they never touch stream state. All stream state,
the model and the caches belong to the engine thread (or to whoever calls ``step()`` in tests), which applies
the inbox between steps, so new work joins at the next step.

A step is schedule → execute → update: the :class:`~.scheduler.Scheduler` picks the streams (a pure function of
their state), the :class:`~.step.Executor` runs them on the model and steps their decoders, the
:class:`~.step.Updater` applies the results and emits the events. The engine itself keeps the public API, the inbox
and each stream's lifecycle (open, finish, expiry); :mod:`.admission` reserves each stream's worst-case memory.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from infinisst_backend.config import (
    MAX_LATENCY_MULTIPLIER,
    SAMPLE_RATE,
    DecodingConfig,
    EngineConfig,
    ModelConfig,
    torch_dtype,
)
from infinisst_backend.engine.admission import Admission, worst_case_pages
from infinisst_backend.engine.events import Event, StreamError, StreamFinished
from infinisst_backend.engine.scheduler import ScheduledStep, Scheduler, StepRecord
from infinisst_backend.engine.step import Executor, Updater
from infinisst_backend.engine.stream import Stream
from infinisst_backend.errors import InvalidArgument, UnknownStream
from infinisst_backend.model.infinisst import InfiniSSTModel
from infinisst_backend.runtime.model_runner import ModelRunner
from infinisst_backend.text.detokenizer import IncrementalDetokenizer
from infinisst_backend.text.prompt import PromptBuilder

logger = logging.getLogger(__name__)

# Languages written without spaces between words: turns are joined with "" instead of " ".
UNSPACED_LANGUAGES = {"Chinese", "Japanese"}
EXPIRY_CHECK_S = 1.0


@dataclass(slots=True)
class _StreamMeta:
    """What the caller-side API knows of an open stream (guarded by the engine lock)."""

    last_activity: float
    closed: bool = False  # END received or cancelled: no more audio accepted


class Engine:
    """Streams in, events out; see the module docstring for threads. ``on_event(event)`` receives every event (a
    public attribute: benchmarks may set it); without one, events collect in ``events``. ``clock`` is anything with
    ``monotonic()`` and ``sleep(seconds)`` (the ``time`` module by default; benchmarks pass a virtual clock), the
    only source of time the engine reads. ``scheduler``: the step policy (default :class:`Scheduler`)."""

    def __init__(
        self,
        model: InfiniSSTModel,
        tokenizer,
        model_cfg: ModelConfig,
        cfg: EngineConfig,
        on_event: Callable[[Event], None] | None = None,
        *,
        clock=time,
        scheduler: Scheduler | None = None,
    ):
        cfg.validate()
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.tokenizer = tokenizer
        self.clock = clock
        self.on_event = on_event
        self.prompts = PromptBuilder(tokenizer, model_cfg.prompt)
        self.default_language = self.prompts.language_name(cfg.default_language)
        # The engine's GPU work (CUDA-graph capture and replay, FlashInfer, streams) runs with its device current,
        # whatever the calling thread's current device is (a Triton instance on GPU 1 starts with GPU 0 current).
        self._cuda = torch.device(cfg.device) if cfg.device.startswith("cuda") else None
        with self._device_current():
            num_pages = cfg.num_pages or _pages_from_free_memory(model, cfg)
            self.runner = ModelRunner(model, cfg, num_pages)
        self.scheduler = scheduler or Scheduler(cfg)
        self.admission = Admission(cfg, num_pages)
        self._system_len_hint = self.prompts.first_turn(self.default_language, 1).system_len
        self.events: deque[Event] = deque()  # used when no callback is given
        self.step_records: deque[StepRecord] = deque(maxlen=100_000)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: deque[tuple] = deque()
        self._meta: dict[Hashable, _StreamMeta] = {}
        self._streams: dict[Hashable, Stream] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_expiry_check = clock.monotonic()
        self.counters = {
            "generated_tokens": 0,
            "turns": 0,
            "prefill_steps": 0,
            "decode_steps": 0,
            "shared_system_prompts": 0,
        }
        self._executor = Executor(self.runner, self.prompts, cfg, self._streams, self.counters)
        self._updater = Updater(self.runner, cfg, self._streams, self.counters, self._emit, self._finish, clock)

    @property
    def fault_hook(self) -> Callable[[Hashable], None] | None:
        """Test hook for fault injection: called as fault_hook(stream_id) inside each stream's own update; whatever
        it raises fails that stream only (the reliability tests use it through the server)."""
        return self._updater.fault_hook

    @fault_hook.setter
    def fault_hook(self, hook: Callable[[Hashable], None] | None) -> None:
        self._updater.fault_hook = hook

    @property
    def turn_length_hook(self) -> Callable[[int, int], int] | None:
        """Benchmark hook (dummy weights never emit EOT): turn_length_hook(m, max_new_tokens) caps each new turn's
        length (forced_turns.TurnLengths.draw). None in every real deployment."""
        return self._executor.turn_length_hook

    @turn_length_hook.setter
    def turn_length_hook(self, hook: Callable[[int, int], int] | None) -> None:
        self._executor.turn_length_hook = hook

    @property
    def logits_hook(self):
        """Observer hook (evaluation, parity): ``logits_hook(phase, streams, logits, offsets)`` sees each step's raw
        logits before the decoders step; stream i's rows are ``logits[offsets[i] : offsets[i + 1]]``."""
        return self._executor.logits_hook

    @logits_hook.setter
    def logits_hook(self, hook) -> None:
        self._executor.logits_hook = hook

    @classmethod
    def from_checkpoint(cls, path, cfg: EngineConfig, on_event: Callable[[Event], None] | None = None) -> Engine:
        from infinisst_backend.model.checkpoint import load_checkpoint

        model, tokenizer, model_cfg = load_checkpoint(path, device=cfg.device, dtype=torch_dtype(cfg.dtype))
        return cls(model, tokenizer, model_cfg, cfg, on_event)

    # ------------------------------------------------------------------ public API (any thread)

    def open_stream(
        self,
        stream_id: Hashable,
        language: str | None = None,
        latency_multiplier: int | None = None,
        decoding: DecodingConfig | None = None,
    ) -> None:
        """Open a stream. Raises InvalidArgument (bad options, id already open) or CapacityError."""
        language = self.prompts.language_name(language) if language else self.default_language
        m = self.cfg.default_latency_multiplier if latency_multiplier is None else latency_multiplier
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 1 <= m <= MAX_LATENCY_MULTIPLIER:
            raise InvalidArgument(f"latency multiplier must be an integer in 1..{MAX_LATENCY_MULTIPLIER}, got {m!r}")
        m = int(m)
        decoding = decoding or self.cfg.decoding
        try:
            decoding.validate()
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        first = self.prompts.first_turn(language, m)
        prompt_tokens = (first.num_tokens, self.prompts.next_turn(m).num_tokens)
        pages = worst_case_pages(self.cfg, m, decoding.beam_size, first.system_len, prompt_tokens)
        with self._lock:
            if stream_id in self._meta:
                raise InvalidArgument(f"stream {stream_id!r} is already open; end it or use a new sequence id")
            self.admission.admit(pages)
            self._meta[stream_id] = _StreamMeta(self.clock.monotonic())
            self._inbox.append(("open", stream_id, language, m, decoding, pages))
            self._wake.notify()

    def add_audio(self, stream_id: Hashable, samples, tag: Any = None, end: bool = False) -> None:
        """Queue audio (16 kHz mono float in [-1, 1], any length >= 0) for a stream; ``end`` closes it.

        Raises InvalidArgument (bad samples) or UnknownStream; a rejected call changes nothing. Every
        accepted call later gets exactly one RequestDone(tag), or a StreamError(tag) if the stream fails.
        """
        samples = _as_samples(samples)
        now = self.clock.monotonic()
        with self._lock:
            meta = self._lookup(stream_id)
            if samples.size > self.cfg.max_request_seconds * SAMPLE_RATE:
                raise InvalidArgument(
                    f"request holds {samples.size / SAMPLE_RATE:.2f} s of audio; the maximum per request is "
                    f"{self.cfg.max_request_seconds:g} s (max_request_seconds)"
                )
            meta.last_activity = now
            meta.closed = end
            self._inbox.append(("audio", stream_id, samples, tag, end, now))
            self._wake.notify()

    def cancel_stream(self, stream_id: Hashable) -> None:
        """Stop the stream's pending work and free it; its open requests get StreamError(CANCELLED)."""
        with self._lock:
            if stream_id not in self._meta:
                raise UnknownStream(f"stream {stream_id!r} is not open")
            self._meta[stream_id].closed = True
            self._inbox.append(("cancel", stream_id))
            self._wake.notify()

    def is_open(self, stream_id: Hashable) -> bool:
        with self._lock:
            meta = self._meta.get(stream_id)
            return meta is not None and not meta.closed

    def stats(self) -> dict:
        streams = list(self._streams.values())
        with self._lock:
            open_streams = len(self._meta)
            reserved = self.admission.reserved_pages
        pool = self.runner.pool
        return {
            "active_streams": open_streams,
            "pending_chunks": sum(len(s.chunks) + (s.turn is not None) for s in streams),
            "decoding_streams": sum(s.turn is not None for s in streams),
            "kv_pages_total": pool.num_pages,
            "kv_pages_free": pool.num_free,
            "kv_pages_used": pool.num_pages - pool.num_free,
            "kv_pages_reserved": reserved,
            **self.counters,
        }

    # ------------------------------------------------------------------ thread control

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="infinisst-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the step thread; every open request gets StreamError(UNAVAILABLE); all memory is freed."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("engine thread did not stop within %s s", timeout)
                return
            self._thread = None
        self._apply_inbox()
        for stream in list(self._streams.values()):
            self._finish(stream, "shutdown", "UNAVAILABLE", "the server is shutting down")

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
            try:
                did_work = self.step()
            except Exception:  # a bug, not a stream's fault: keep serving
                logger.exception("engine step failed")
                did_work = False
            if not did_work:
                with self._wake:
                    if not self._inbox and not self._stopping:
                        hint = self.scheduler.wait_hint(list(self._streams.values()), self.clock.monotonic())
                        self._wake.wait(EXPIRY_CHECK_S if hint is None else max(hint, 1e-4))

    # ------------------------------------------------------------------ the step

    def step(self) -> bool:
        """Apply new commands, then run one prefill or decode step. Returns False when nothing ran."""
        with self._device_current():
            return self._step()

    def _device_current(self):
        return contextlib.nullcontext() if self._cuda is None else torch.cuda.device(self._cuda)

    def _step(self) -> bool:
        """schedule → execute → update."""
        self._apply_inbox()
        now = self.clock.monotonic()
        if now - self._last_expiry_check >= EXPIRY_CHECK_S:
            self._expire_idle(now)
        plan = self.scheduler.schedule(list(self._streams.values()), self._system_len_hint, now)
        if plan is None:
            return False
        self.step_records.append(
            StepRecord(plan.phase, [s.id for s in plan.streams], plan.num_rows, plan.num_tokens, now)
        )
        self._run(plan, now)
        return True

    def _run(self, plan: ScheduledStep, now: float) -> None:
        """Execute a scheduled step, then update its streams from the result."""
        try:
            output = self._executor.execute(plan, now)
        except Exception as e:  # the batch failed as a whole: fail its streams, keep the others
            logger.exception("%s step failed", plan.phase)
            for stream in plan.streams:
                if stream.id in self._streams:
                    self._finish(stream, "error", "INTERNAL", f"{plan.phase} failed: {e}")
            return
        self._updater.update(output)

    def has_work(self) -> bool:
        with self._lock:
            if self._inbox:
                return True
        return any(s.turn is not None or s.chunks for s in self._streams.values())

    def run_until_idle(self, max_steps: int = 10_000_000) -> None:
        """Step on the caller's thread until every queued chunk is translated (tests, benchmarks)."""
        for _ in range(max_steps):
            if not self.step():
                if not self.has_work():
                    return
                hint = self.scheduler.wait_hint(list(self._streams.values()), self.clock.monotonic())
                self.clock.sleep(hint or 0.0)
        raise RuntimeError("run_until_idle: too many steps")

    # ------------------------------------------------------------------ inbox, lifecycle

    def _apply_inbox(self) -> None:
        while True:
            with self._lock:
                if not self._inbox:
                    return
                command = self._inbox.popleft()
            kind, stream_id = command[0], command[1]
            if kind == "open":
                self._open(*command[1:])
                continue
            stream = self._streams.get(stream_id)
            if stream is None:  # already failed or finished while the command waited
                if kind == "audio":
                    self._emit(StreamError(stream_id, command[3], "NOT_FOUND", f"stream {stream_id!r} is not open"))
                continue
            if kind == "audio":
                _, _, samples, tag, end, arrival = command
                stream.add_audio(samples, tag, end, arrival)
                self._updater.flush_requests(stream)
            elif kind == "cancel":
                self._finish(stream, "cancelled", "CANCELLED", f"stream {stream_id!r} was cancelled")

    def _open(self, stream_id, language: str, m: int, decoding: DecodingConfig, pages: int) -> None:
        separator = "" if language in UNSPACED_LANGUAGES else " "
        self._streams[stream_id] = Stream(
            id=stream_id,
            language=language,
            m=m,
            decoding=decoding,
            separator=separator,
            speech_cache=self.runner.model.speech.new_cache(m, self.runner.speech_pool),
            kv=self.runner.new_sequence(),
            detok=IncrementalDetokenizer(self.tokenizer, separator),
            reserved_pages=pages,
        )

    def _finish(self, stream: Stream, reason: str, code: str | None = None, message: str = "") -> None:
        """Free every page and cache of the stream; open requests get StreamError(code)."""
        if stream.turn is not None:
            stream.turn.release()
            stream.turn = None
        if stream.kv is not None:
            stream.kv.release()
            stream.kv = None
        stream.speech_cache.release()
        stream.speech_cache = None
        for request in stream.requests:
            self._emit(StreamError(stream.id, request.tag, code or "INTERNAL", message or f"stream {reason}"))
        stream.requests.clear()
        stream.chunks.clear()
        del self._streams[stream.id]
        with self._lock:
            self._meta.pop(stream.id, None)
            self.admission.release(stream.reserved_pages)
        self._emit(StreamFinished(stream.id, reason))

    def _expire_idle(self, now: float) -> None:
        self._last_expiry_check = now
        timeout = self.cfg.stream_idle_timeout_s
        with self._lock:
            stale = [sid for sid, meta in self._meta.items() if now - meta.last_activity > timeout]
        for sid in stale:
            stream = self._streams.get(sid)
            if stream is not None and stream.idle:
                logger.info("stream %r idle for more than %g s: freed", sid, timeout)
                self._finish(stream, "expired")

    def _lookup(self, stream_id: Hashable) -> _StreamMeta:
        meta = self._meta.get(stream_id)
        if meta is None:
            raise UnknownStream(
                f"stream {stream_id!r} is not open (never started, ended, or expired); start a new sequence"
            )
        if meta.closed:
            raise UnknownStream(f"stream {stream_id!r} has already ended; start a new sequence")
        return meta

    def _emit(self, event: Event) -> None:
        if self.on_event is None:
            self.events.append(event)
            return
        try:
            self.on_event(event)
        except Exception:
            logger.exception("event callback failed for %r", event)


def _as_samples(samples) -> np.ndarray:
    """Validate audio: a 1-D (or [1, n]) array of finite floats; returns a float32 copy."""
    try:
        array = np.asarray(samples)
    except Exception as e:
        raise InvalidArgument(f"audio is not an array of numbers: {e}") from None
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1:
        raise InvalidArgument(f"audio must be a 1-D array of samples, got shape {tuple(array.shape)}")
    if array.dtype.kind not in "fiu":
        raise InvalidArgument(f"audio must be real numbers, got dtype {array.dtype}")
    array = array.astype(np.float32, copy=True)
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InvalidArgument(f"audio holds {bad} NaN/Inf sample(s); samples must be finite floats in [-1, 1]")
    return array


def _pages_from_free_memory(model: InfiniSSTModel, cfg: EngineConfig) -> int:
    """Size the KV pool from measured free device memory and the configured fraction.

    The speech caches of ``max_streams`` streams (per layer K and V of ``max_cache_frames`` frames) are set
    aside first: they live outside the page pool, in the pool the runner allocates next.
    """
    if not cfg.device.startswith("cuda"):
        raise ValueError("num_pages=0 (size from free memory) needs a CUDA device; set num_pages on CPU")
    free, _ = torch.cuda.mem_get_info(torch.device(cfg.device))
    speech = model.speech.cfg
    page_bytes = model.llm.kv_bytes_per_token(torch_dtype(cfg.kv_dtype)) * cfg.page_size
    itemsize = torch_dtype(cfg.dtype).itemsize
    speech_bytes = 2 * speech.num_layers * speech.max_cache_frames * speech.embed_dim * itemsize * cfg.max_streams
    usable = int(free * cfg.kv_memory_fraction) - speech_bytes
    if usable < page_bytes:
        raise ValueError(
            f"not enough free device memory for the KV cache: {free / 2**30:.1f} GiB free, the speech caches of "
            f"max_streams={cfg.max_streams} streams need {speech_bytes / 2**30:.1f} GiB; lower max_streams"
        )
    return usable // page_bytes
