"""Triton Python-backend model ``infinisst``: a thin layer over ``infinisst_backend.engine.engine.Engine``.

Threads:
- Triton's thread calls ``execute()``: it parses each request, opens the stream on START, hands the audio to
  the engine with the request's handle as ``tag``, and returns. Rejected requests become ``Rejected`` items.
- The engine's step thread reports events through ``on_event`` into one queue (no Triton calls there).
- The response thread reads that queue, orders responses per stream (``responses.ResponseBook``), sends them,
  and polls ``is_cancelled()`` of each stream's oldest request (a cancelled stream is cancelled in the engine).
- The metrics thread copies ``engine.stats()`` and step records into Triton's custom metrics.
Every request gets exactly one FINAL, also on errors, cancellation and shutdown.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

import infinisst_backend
from infinisst_backend.engine.engine import Engine
from infinisst_backend.engine.events import StreamFinished, TurnEnded
from infinisst_backend.engine.forced_turns import TurnLengths
from infinisst_backend.errors import CapacityError, EngineError, InvalidArgument, UnknownStream
from infinisst_backend.serving import metrics, parameters, requests, responses

PROJECT_ROOT = Path(infinisst_backend.__file__).resolve().parents[1]
_STOP = object()  # queue sentinel: finalize() has shut the engine down


class _TritonLogHandler(logging.Handler):
    """Forwards the package's ``logging`` records to Triton's log."""

    def emit(self, record: logging.LogRecord) -> None:
        log = pb_utils.Logger
        message = self.format(record)
        if record.levelno >= logging.ERROR:
            log.log_error(message)
        elif record.levelno >= logging.WARNING:
            log.log_warn(message)
        else:
            log.log_info(message)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.log = pb_utils.Logger
        name = args["model_name"]
        params = parameters.parameters_from_model_config(json.loads(args["model_config"]))
        try:
            parameters.check_stub_numpy(np.__version__, os.environ)
            self.cfg = parameters.serving_config_from_parameters(
                params, parameters.device_for_instance(args), PROJECT_ROOT
            )
        except parameters.ConfigError as e:
            raise pb_utils.TritonModelException(f"model {name!r}: {e}") from None

        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.registry = requests.StreamRegistry()
        self.latencies: deque[float] = deque()
        self.cancelled: set[requests.StreamKey] = set()  # response thread only
        self.stopping = threading.Event()
        self.log_handler = _TritonLogHandler()
        package_logger = logging.getLogger("infinisst_backend")
        package_logger.addHandler(self.log_handler)
        package_logger.setLevel(logging.INFO)
        try:
            self.engine = Engine.from_checkpoint(self.cfg.checkpoint, self.cfg.engine, on_event=self.events.put)
        except Exception as e:  # the message matters to the operator, the traceback does not
            package_logger.removeHandler(self.log_handler)
            raise pb_utils.TritonModelException(
                f"model {name!r}: cannot build the engine (parameter 'checkpoint' = {self.cfg.checkpoint}, "
                f"device {self.cfg.engine.device}): {type(e).__name__}: {e}"
            ) from None
        faults = parameters.parse_fault_ids(self.cfg.test_fault_sequence_ids)
        if faults:
            self.engine.fault_hook = parameters.FaultInjector(faults)
            self.log.log_warn(f"model {name!r}: TEST-ONLY fault injection for sequence ids {sorted(faults)}")
        seed = parameters.parse_forced_turn_seed(self.cfg.benchmark_forced_turn_seed)
        if seed is not None:
            self.engine.turn_length_hook = TurnLengths(seed).draw
            self.log.log_warn(f"model {name!r}: BENCHMARK-ONLY forced turn lengths (seed {seed})")
        labels = {"model": name, "instance": args["model_instance_name"]}
        self.metrics = metrics.Metrics(pb_utils, labels)

        self.engine.start()
        self.response_thread = threading.Thread(target=self._respond_loop, name="infinisst-responses", daemon=True)
        self.metrics_thread = threading.Thread(target=self._metrics_loop, name="infinisst-metrics", daemon=True)
        self.response_thread.start()
        self.metrics_thread.start()
        self.log.log_info(
            f"model {name!r} ready: checkpoint {self.cfg.checkpoint}, device {self.cfg.engine.device}, "
            f"dtype {self.cfg.engine.dtype}, attention {self.cfg.engine.attention_backend}, "
            f"max_streams {self.cfg.engine.max_streams}, beam {self.cfg.engine.decoding.beam_size}, "
            f"KV pool {self.engine.stats().get('kv_pages_total', '?')} pages of {self.cfg.engine.page_size} tokens"
        )

    # ------------------------------------------------------------------------------------------- requests

    def execute(self, batch: list) -> None:
        """Hand every request to the engine and return; responses come from the response thread."""
        for request in batch:
            self._submit(request)
        return None

    def _submit(self, request) -> None:
        sender = request.get_response_sender()
        corrid = request.correlation_id()
        start = bool(request.flags() & requests.FLAG_SEQUENCE_START)
        end = bool(request.flags() & requests.FLAG_SEQUENCE_END)
        try:
            key = self._stream_key(corrid, start)
        except UnknownStream as e:
            self._reject(responses.RequestHandle(self.registry.orphan(corrid), sender), e)
            return
        handle = responses.RequestHandle(key, sender)
        self.events.put(handle)  # registered before any event of its audio can arrive
        opened = False
        try:
            if self.stopping.is_set():
                raise CapacityError("the server is shutting down")
            parsed = requests.parse_request(request, pb_utils)
            if start:
                self.engine.open_stream(key, parsed.language, parsed.latency_multiplier)
                opened = True
            self.engine.add_audio(key, parsed.audio, tag=handle, end=parsed.end)
        except EngineError as e:
            if start and not opened:
                self.registry.forget(key)
            if not (end and isinstance(e, InvalidArgument) and self._end_anyway(handle, e)):
                self.events.put(responses.Rejected(handle, e.code, e.message))

    def _end_anyway(self, handle: responses.RequestHandle, error: EngineError) -> bool:
        """An END request with bad content still ends its open stream: Triton has closed the sequence, so no later
        request could, and the stream would hold its memory until the idle timeout. The buffered audio is
        translated as for an empty END; the request gets that text, then its error, then FINAL."""
        if not self.engine.is_open(handle.key):
            return False
        handle.error = (error.code, error.message)  # sent once the engine has finished the request
        try:
            self.engine.add_audio(handle.key, np.zeros(0, np.float32), tag=handle, end=True)
        except EngineError:
            handle.error = None
            return False
        return True

    def _stream_key(self, corrid, start: bool) -> requests.StreamKey:
        if not start:
            return self.registry.lookup(corrid)
        key, previous = self.registry.start(corrid)
        if previous is not None and self.engine.is_open(previous):
            # START again on a live id: the client abandoned the old stream (or Triton's reaper dropped it).
            self.log.log_warn(f"stream {corrid}: START while the previous stream is open; cancelling it")
            reason = f"stream {corrid} was cancelled: a new START request arrived for its sequence id"
            self.events.put(responses.Restarted(previous, reason))  # ahead of the cancellation's errors
            try:
                self.engine.cancel_stream(previous)
            except UnknownStream:
                pass
        return key

    def _reject(self, handle: responses.RequestHandle, error: EngineError) -> None:
        self.events.put(handle)
        self.events.put(responses.Rejected(handle, error.code, error.message))

    # ------------------------------------------------------------------------------------------- responses

    def _respond_loop(self) -> None:
        book = responses.ResponseBook()
        next_poll = time.monotonic() + self.cfg.cancel_poll_interval_s
        stopping = False
        while True:
            items = self._next_items(max(0.0, next_poll - time.monotonic()))
            for item in items:
                if item is _STOP:
                    stopping = True
                elif isinstance(item, responses.RequestHandle):
                    book.submit(item)
                elif isinstance(item, TurnEnded):
                    self.latencies.append(item.chunk_latency_s)
                elif isinstance(item, StreamFinished):
                    self.registry.forget(item.stream_id)
                    self.cancelled.discard(item.stream_id)
                    book.apply(item)
                else:
                    book.apply(item)
            if stopping and not items:  # the queue is empty after the engine stopped: fail what is left
                book.fail_all("UNAVAILABLE", "the server is shutting down")
            for out in book.collect():
                self._send(out)
            if stopping and not items:
                return
            if time.monotonic() >= next_poll:
                self._poll_cancelled(book)
                next_poll = time.monotonic() + self.cfg.cancel_poll_interval_s

    def _next_items(self, timeout: float) -> list:
        """Wait up to ``timeout`` for one item, then take whatever else is queued (bounded)."""
        try:
            items = [self.events.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(items) < 4096:
            try:
                items.append(self.events.get_nowait())
            except queue.Empty:
                break
        return items

    def _send(self, out: responses.Outgoing) -> None:
        try:
            responses.send(out, pb_utils)
        except Exception as e:  # the client went away or cancelled: nothing more to tell it
            self.log.log_verbose(f"could not send a {out.kind} response: {e}")

    def _poll_cancelled(self, book: responses.ResponseBook) -> None:
        for handle in book.heads():
            if handle.key in self.cancelled:
                continue
            try:
                cancelled = handle.sender.is_cancelled()
            except Exception:
                continue
            if cancelled:
                self.cancelled.add(handle.key)
                self.log.log_info(f"stream {handle.key}: request cancelled by the client; cancelling the stream")
                try:
                    self.engine.cancel_stream(handle.key)
                except UnknownStream:
                    pass

    # ------------------------------------------------------------------------------------------- metrics

    def _metrics_loop(self) -> None:
        while not self.stopping.wait(self.cfg.metrics_interval_s):
            try:
                steps = [(r.phase, r.num_rows) for r in metrics.drain(self.engine.step_records)]
                self.metrics.update(self.engine.stats(), steps, metrics.drain(self.latencies))
            except Exception as e:  # metrics must never take the model down
                self.log.log_warn(f"metrics update failed: {type(e).__name__}: {e}")

    # ------------------------------------------------------------------------------------------- shutdown

    def finalize(self) -> None:
        """Stop the engine (open requests get errors), send every remaining FINAL, join the threads."""
        self.stopping.set()
        self.engine.shutdown(self.cfg.shutdown_timeout_s)
        self.events.put(_STOP)
        self.response_thread.join(self.cfg.shutdown_timeout_s)
        self.metrics_thread.join(self.cfg.metrics_interval_s + 1.0)
        try:  # Triton keeps a model's metric series after unloading it: leave them at the freed state
            self.metrics.update(self.engine.stats(), [], [])
        except Exception as e:
            self.log.log_warn(f"final metrics update failed: {type(e).__name__}: {e}")
        if self.response_thread.is_alive():
            self.log.log_error("the response thread did not finish; some requests may lack their FINAL")
        logging.getLogger("infinisst_backend").removeHandler(self.log_handler)
