"""The engine: many live audio streams in, translation events out, one model instance.

Threading: the public methods (``open_stream``, ``add_audio``, ``cancel_stream``) run on the caller's thread.
They validate, reserve, and post a command to the inbox; they never touch stream state. All stream state,
the model and the caches belong to the engine thread (or to whoever calls ``step()`` in tests), which applies
the inbox between steps, so new work joins at the next step.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from infinisst_backend.config import MAX_LATENCY_MULTIPLIER, SAMPLE_RATE, DecodingConfig, EngineConfig, ModelConfig
from infinisst_backend.engine.events import Event, RequestDone, StreamError, StreamFinished, TextDelta, TurnEnded
from infinisst_backend.engine.scheduler import PREFILL, Admission, Scheduler, StepRecord, worst_case_pages
from infinisst_backend.engine.stream import Stream, Turn, eviction_cut
from infinisst_backend.errors import CapacityError, EngineError, InvalidArgument, UnknownStream
from infinisst_backend.model.infinisst import InfiniSSTModel
from infinisst_backend.runtime.model_runner import ModelRunner
from infinisst_backend.text.decoding import GreedyTurn, PartialStepError, beam_step, greedy_step, make_turn_decoder
from infinisst_backend.text.detokenizer import IncrementalDetokenizer
from infinisst_backend.text.prompt import PromptBuilder

logger = logging.getLogger(__name__)

# Languages written without spaces between words: turns are joined with "" instead of " ".
UNSPACED_LANGUAGES = {"Chinese", "Japanese"}
EXPIRY_CHECK_S = 1.0


@dataclass(slots=True)
class _StreamMeta:
    """What the caller-side API knows of an open stream (guarded by the engine lock)."""

    reserved_pages: int
    max_samples: int
    last_activity: float
    closed: bool = False  # END received or cancelled: no more audio accepted


class Engine:
    def __init__(
        self,
        model: InfiniSSTModel,
        tokenizer,
        model_cfg: ModelConfig,
        cfg: EngineConfig,
        on_event: Callable[[Event], None] | None = None,
    ):
        cfg.validate()
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.tokenizer = tokenizer
        self.prompts = PromptBuilder(tokenizer, model_cfg.prompt)
        self.default_language = self.prompts.language_name(cfg.default_language)
        # The engine's GPU work (CUDA-graph capture and replay, FlashInfer, streams) runs with its device current,
        # whatever the calling thread's current device is (a Triton instance on GPU 1 starts with GPU 0 current).
        self._cuda = torch.device(cfg.device) if cfg.device.startswith("cuda") else None
        with self._device_current():
            num_pages = cfg.num_pages or _pages_from_free_memory(model, cfg)
            self.runner = ModelRunner(model, cfg, num_pages)
        self.scheduler = Scheduler(cfg)
        self.admission = Admission(cfg, num_pages)
        self._system_len_hint = self.prompts.first_turn(self.default_language, 1).system_len
        self._on_event = on_event
        # Test hook for fault injection: called as fault_hook(stream_id) inside each stream's own processing
        # step; whatever it raises fails that stream only (the reliability tests use it through the server).
        self.fault_hook: Callable[[Hashable], None] | None = None
        # Benchmark hook (dummy weights never emit EOT): turn_length_hook(m, max_new_tokens) caps each new turn's
        # length (forced_turns.TurnLengths.draw). None in every real deployment.
        self.turn_length_hook: Callable[[int, int], int] | None = None
        self.events: deque[Event] = deque()  # used when no callback is given
        self.step_records: deque[StepRecord] = deque(maxlen=100_000)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: deque[tuple] = deque()
        self._meta: dict[Hashable, _StreamMeta] = {}
        self._streams: dict[Hashable, Stream] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_expiry_check = time.monotonic()
        self.counters = {
            "generated_tokens": 0,
            "turns": 0,
            "prefill_steps": 0,
            "decode_steps": 0,
            "shared_system_prompts": 0,
        }
        # Per system prompt (its token ids), the last stream that started with it: new streams share its pages.
        self._system_prompts: dict[tuple[int, ...], Stream] = {}
        # Evictions decided by turns that ended in this step: (stream, its cache, keep, cut), run together at the
        # end of the step (_flush_compactions).
        self._pending_compactions: list[tuple[Stream, Any, int, int]] = []

    @classmethod
    def from_checkpoint(cls, path, cfg: EngineConfig, on_event: Callable[[Event], None] | None = None) -> Engine:
        from infinisst_backend.config import DTYPES
        from infinisst_backend.model.checkpoint import load_checkpoint

        model, tokenizer, model_cfg = load_checkpoint(path, device=cfg.device, dtype=DTYPES[cfg.dtype])
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
            max_samples = int(self.cfg.max_request_seconds * SAMPLE_RATE)
            self._meta[stream_id] = _StreamMeta(pages, max_samples, time.monotonic())
            self._inbox.append(("open", stream_id, language, m, decoding, pages))
            self._wake.notify()

    def add_audio(self, stream_id: Hashable, samples, tag: Any = None, end: bool = False) -> None:
        """Queue audio (16 kHz mono float in [-1, 1], any length >= 0) for a stream; ``end`` closes it.

        Raises InvalidArgument (bad samples) or UnknownStream; a rejected call changes nothing. Every
        accepted call later gets exactly one RequestDone(tag), or a StreamError(tag) if the stream fails.
        """
        samples = _as_samples(samples)
        now = time.monotonic()
        with self._lock:
            meta = self._lookup(stream_id)
            if samples.size > meta.max_samples:
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
                        hint = self.scheduler.wait_hint(list(self._streams.values()), time.monotonic())
                        self._wake.wait(EXPIRY_CHECK_S if hint is None else max(hint, 1e-4))

    # ------------------------------------------------------------------ the step

    def step(self) -> bool:
        """Apply new commands, then run one prefill or decode step. Returns False when nothing ran."""
        with self._device_current():
            return self._step()

    def _device_current(self):
        return contextlib.nullcontext() if self._cuda is None else torch.cuda.device(self._cuda)

    def _step(self) -> bool:
        self._apply_inbox()
        now = time.monotonic()
        if now - self._last_expiry_check >= EXPIRY_CHECK_S:
            self._expire_idle(now)
        step = self.scheduler.schedule(list(self._streams.values()), self._system_len_hint, now)
        if step is None:
            return False
        self.step_records.append(StepRecord(step.phase, [s.id for s in step.streams], step.num_rows, step.num_tokens))
        try:
            if step.phase == PREFILL:
                self.counters["prefill_steps"] += 1
                self._run_prefill(step.streams)
            else:
                self.counters["decode_steps"] += 1
                self._run_decode(step.streams)
        except Exception as e:  # the batch failed as a whole: fail its streams, keep the others
            logger.exception("%s step failed", step.phase)
            for stream in step.streams:
                if stream.id in self._streams:
                    self._finish(stream, "error", "INTERNAL", f"{step.phase} failed: {e}")
        return True

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
                hint = self.scheduler.wait_hint(list(self._streams.values()), time.monotonic())
                time.sleep(hint or 0.0)
        raise RuntimeError("run_until_idle: too many steps")

    def _run_prefill(self, streams: list[Stream]) -> None:
        chunks = [s.chunks.popleft() for s in streams]
        speech = self.runner.encode_speech([s.speech_cache for s in streams], [c.samples for c in chunks])
        prompts = [
            self.prompts.first_turn(s.language, s.m) if s.turns_done == 0 else self.prompts.next_turn(s.m)
            for s in streams
        ]
        parts = []
        shared_keys = {}
        for stream, prompt, emb in zip(streams, prompts, speech):
            prefix = prompt.prefix_ids
            if stream.turns_done == 0 and self.cfg.share_system_prompt:
                key = tuple(prefix[: prompt.system_len])
                shared_keys[stream.id] = key
                donor = self._system_prompt_cache(key)
                if donor is not None and stream.kv.num_tokens == 0:
                    shared = self._shared_prefix_len(prompt, stream.m)
                    stream.kv.release()
                    stream.kv = donor.share_prefix(shared)
                    prefix = prefix[shared:]
                    self.counters["shared_system_prompts"] += 1
            parts.append((prefix, emb, prompt.suffix_ids))
        logits = self.runner.prefill([s.kv for s in streams], parts)
        for stream in streams:  # their system prompts' keys and values are computed (queued on the device) now
            if stream.id in shared_keys:
                self._system_prompts[shared_keys[stream.id]] = stream
        for stream, prompt, chunk in zip(streams, prompts, chunks):
            if stream.turns_done == 0:
                stream.system_len = prompt.system_len
            max_new = stream.max_new_tokens
            if self.turn_length_hook is not None:
                max_new = self.turn_length_hook(stream.m, max_new)
            decoder = make_turn_decoder(
                stream.decoding, prompt.input_ids(), list(stream.history), max_new, self.prompts.eos_ids
            )
            stream.turn = Turn(chunk, decoder, rows=[stream.kv], tokens=[])
            stream.kv = None  # the turn's rows own the cache until the turn ends
        self._step_turns(streams, logits, list(range(len(streams) + 1)))  # one row per stream after a prefill
        self._flush_compactions()

    def _shared_prefix_len(self, prompt, m: int) -> int:
        """How many system-prompt tokens a first turn takes from a live stream: all of them, less as many as make the
        rest of the first turn exactly as long as a later turn's prompt, a prefill shape with CUDA graphs (with the
        shipped templates, the system prompt less its last token). Recomputing those tokens costs nothing measurable;
        an eager prefill of streams starting together costs every stream in the step."""
        excess = prompt.num_tokens - self.prompts.next_turn(m).num_tokens
        return excess if 0 < excess <= prompt.system_len else prompt.system_len

    def _system_prompt_cache(self, key: tuple[int, ...]):
        """A live cache whose first ``len(key)`` tokens are the system prompt ``key`` (the last stream that started
        with it, while it lives), or None."""
        stream = self._system_prompts.get(key)
        if stream is None:
            return None
        if self._streams.get(stream.id) is not stream:
            del self._system_prompts[key]
            return None
        seq = stream.kv if stream.kv is not None else (stream.turn.rows[0] if stream.turn is not None else None)
        return seq if seq is not None and seq.num_tokens >= len(key) else None

    def _run_decode(self, streams: list[Stream]) -> None:
        rows = [row for s in streams for row in s.turn.rows]
        tokens = [tok for s in streams for tok in s.turn.tokens]
        logits = self.runner.decode(rows, tokens)
        self._step_turns(streams, logits, list(itertools.accumulate((len(s.turn.rows) for s in streams), initial=0)))
        self._flush_compactions()

    def _step_turns(self, streams: list[Stream], logits: torch.Tensor, offsets: list[int]) -> None:
        """One decoding step of each stream's turn from its rows ``logits[offsets[i] : offsets[i + 1]]``: the greedy
        streams (one row each) in one batched step, the beam streams in another, each with one device-to-host
        transfer for the whole batch."""
        greedy = [i for i, s in enumerate(streams) if isinstance(s.turn.decoder, GreedyTurn)]
        beams = [i for i, s in enumerate(streams) if not isinstance(s.turn.decoder, GreedyTurn)]
        steps = {}
        for index, step_fn in ((greedy, greedy_step), (beams, beam_step)):
            steps.update(zip(index, self._batched_steps(step_fn, streams, logits, offsets, index)))
        for i, stream in enumerate(streams):
            self._guarded(stream, self._apply, stream, steps[i])

    def _flush_compactions(self) -> None:
        """Run the evictions of the turns that ended in this step as one batched compaction.

        A stream finished since its turn ended has released its cache: it is skipped. Errors raised before
        the pool changed (out of pages, bad arguments) are pinned on their streams by compacting one by one;
        any other error leaves the batch's caches undefined, so all its streams fail.
        """
        pending, self._pending_compactions = self._pending_compactions, []
        pending = [p for p in pending if self._streams.get(p[0].id) is p[0] and p[0].kv is p[1] and p[1].pages]
        if not pending:
            return
        try:
            self.runner.compact_many([(seq, keep, cut) for _, seq, keep, cut in pending])
        except (CapacityError, ValueError):
            logger.exception("batched KV eviction failed; evicting stream by stream")
            for stream, seq, keep, cut in pending:
                self._guarded(stream, self.runner.compact_many, [(seq, keep, cut)])
        except Exception as e:
            logger.exception("batched KV eviction failed")
            code = e.code if isinstance(e, EngineError) else "INTERNAL"
            for stream, *_ in pending:
                self._finish(stream, "error", code, f"KV cache eviction of stream {stream.id!r} failed: {e}")

    def _batched_steps(self, step_fn, streams: list[Stream], logits: torch.Tensor, offsets: list[int], index):
        """``step_fn`` (greedy_step or beam_step) over the streams ``index``, whose rows are gathered from ``logits``
        unless they are all of it."""
        if not index:
            return []
        rows = [r for i in index for r in range(offsets[i], offsets[i + 1])]
        if rows != list(range(logits.shape[0])):
            logits = logits[torch.tensor(rows, device=logits.device)]
        try:
            return step_fn([streams[i].turn.decoder for i in index], logits)
        except PartialStepError as e:  # the turns that stepped keep their steps; each failed one fails its stream
            return [step if step is not None else _FailedStep(e.failures[j]) for j, step in enumerate(e.steps)]
        except Exception:  # nothing stepped: step each stream alone to find the culprit, so only it fails
            logger.exception("batched decoding step failed; stepping streams one by one")
            starts = itertools.accumulate((offsets[i + 1] - offsets[i] for i in index), initial=0)
            return [_LazyStep(streams[i], logits[o : o + offsets[i + 1] - offsets[i]]) for i, o in zip(index, starts)]

    def _guarded(self, stream: Stream, fn, *args) -> None:
        """Run per-stream work; a failure fails only this stream."""
        try:
            fn(*args)
        except Exception as e:
            logger.exception("stream %r failed", stream.id)
            code = e.code if isinstance(e, EngineError) else "INTERNAL"
            self._finish(stream, "error", code, f"processing of stream {stream.id!r} failed: {e}")

    def _apply(self, stream: Stream, step) -> None:
        """Apply a decoding step to the stream: snapshots, streamed text, turn end or the next rows."""
        if self.fault_hook is not None:
            self.fault_hook(stream.id)
        if isinstance(step, _LazyStep | _FailedStep):
            step = step.resolve()
        turn = stream.turn
        for row in step.snapshots:
            turn.snapshots.append(turn.rows[row].fork())
        if step.committed:
            self._emit_text(stream, stream.detok.add(step.committed))
            turn.committed += len(step.committed)
        if step.done:
            self._end_turn(stream, turn.decoder.result())
            return
        if step.parents != list(range(len(turn.rows))):
            new_rows = [turn.rows[p].fork() for p in step.parents]
            for row in turn.rows:
                row.release()
            turn.rows = new_rows
        turn.tokens = list(step.tokens)

    def _end_turn(self, stream: Stream, result) -> None:
        turn = stream.turn
        source = turn.rows[result.cache_row] if result.cache_row is not None else turn.snapshots[result.cache_snapshot]
        stream.kv = source.fork()
        self._emit_text(stream, stream.detok.add(result.emitted_ids[turn.committed :]) + stream.detok.end_turn())
        _release_turn(turn)
        stream.turn = None
        stream.remember_target(result.emitted_ids, stream.decoding.ngram_lookback)
        stream.turns_done += 1
        self.counters["turns"] += 1
        self.counters["generated_tokens"] += len(result.emitted_ids) + 1
        length = stream.kv.num_tokens
        stream.checkpoints.append(length)
        cut = eviction_cut(stream.checkpoints, length, self.cfg.max_llm_cache_tokens, stream.system_len)
        if cut is not None:  # evicted at the end of the step, batched with the other streams' evictions
            self._pending_compactions.append((stream, stream.kv, stream.system_len, cut))
        latency = time.monotonic() - turn.chunk.arrival
        self._emit(TurnEnded(stream.id, turn.chunk.request.tag, tuple(result.emitted_ids), latency))
        stream.close_chunk(turn.chunk)
        self._flush_requests(stream)

    def _emit_text(self, stream: Stream, text: str) -> None:
        """Text of the running turn goes to the request whose audio completed the turn's chunk."""
        if text:
            chunk = stream.turn.chunk
            self._emit(TextDelta(stream.id, chunk.request.tag, text, chunk.source_seconds))

    def _flush_requests(self, stream: Stream) -> None:
        for tag in stream.pop_done_requests():
            self._emit(RequestDone(stream.id, tag))
        if stream.finished:
            self._finish(stream, "end")

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
                self._flush_requests(stream)
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
            _release_turn(stream.turn)
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
        if self._on_event is None:
            self.events.append(event)
            return
        try:
            self._on_event(event)
        except Exception:
            logger.exception("event callback failed for %r", event)


class _LazyStep:
    """A decoding step computed when applied, so that a failure is attributed to its own stream."""

    def __init__(self, stream: Stream, logits: torch.Tensor):
        self.stream, self.logits = stream, logits

    def resolve(self):
        return self.stream.turn.decoder.step(self.logits)


class _FailedStep:
    """The step of a turn that failed inside a batched step: applying it raises the turn's own error."""

    def __init__(self, error: Exception):
        self.error = error

    def resolve(self):
        raise self.error


def _release_turn(turn: Turn) -> None:
    for seq in turn.rows + turn.snapshots:
        seq.release()
    turn.rows, turn.snapshots = [], []


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
    page_bytes = model.llm.kv_bytes_per_token(getattr(torch, cfg.kv_dtype)) * cfg.page_size
    itemsize = getattr(torch, cfg.dtype).itemsize
    speech_bytes = 2 * speech.num_layers * speech.max_cache_frames * speech.embed_dim * itemsize * cfg.max_streams
    usable = int(free * cfg.kv_memory_fraction) - speech_bytes
    if usable < page_bytes:
        raise ValueError(
            f"not enough free device memory for the KV cache: {free / 2**30:.1f} GiB free, the speech caches of "
            f"max_streams={cfg.max_streams} streams need {speech_bytes / 2**30:.1f} GiB; lower max_streams"
        )
    return usable // page_bytes
