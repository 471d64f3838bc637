"""The two phases of an engine step after scheduling: execute, then update.

``Engine._step`` reads as schedule → execute → update:
- :class:`Executor` (execute) runs a scheduled step on the model: a prefill encodes each stream's next chunk, appends
  its turn prompt to the LLM cache and opens the turn; a decode feeds every running row one token. Either way it then
  steps every turn's decoder on the step's logits (greedy turns in one batched call, beam turns in another) and
  returns the :class:`StepOutput`. It emits nothing.
- :class:`Updater` (update) applies each stream's decoding step: finished hypotheses' snapshots, streamed text, the
  next rows, or the turn's end (its cache committed, eviction scheduled, requests done). A failure here fails only
  its stream. The evictions of the step run at its end, batched.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from infinisst_backend.config import EngineConfig
from infinisst_backend.engine.events import Event, RequestDone, TextDelta, TurnEnded
from infinisst_backend.engine.scheduler import PREFILL, ScheduledStep
from infinisst_backend.engine.stream import Stream, Turn, eviction_cut
from infinisst_backend.errors import CapacityError, EngineError
from infinisst_backend.runtime.model_runner import ModelRunner
from infinisst_backend.text.decoding import GreedyTurn, PartialStepError, beam_step, greedy_step, make_turn_decoder
from infinisst_backend.text.prompt import PromptBuilder

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepOutput:
    """What a step's execution produced: for each stream of the step, its decoding step (a ``DecodeStep``, or a
    deferred one whose failure belongs to that stream alone, resolved when applied)."""

    streams: list[Stream]
    steps: list[Any]


class Executor:
    """Runs scheduled steps on the model (through the :class:`ModelRunner`) and steps the turns' decoders."""

    def __init__(
        self,
        runner: ModelRunner,
        prompts: PromptBuilder,
        cfg: EngineConfig,
        streams: dict[Hashable, Stream],
        counters: dict[str, int],
    ):
        self.runner = runner
        self.prompts = prompts
        self.cfg = cfg
        self.streams = streams  # the engine's live streams (read only: a system prompt's donor must be live)
        self.counters = counters
        # Benchmark hook (dummy weights never emit EOT): turn_length_hook(m, max_new_tokens) caps each new turn's
        # length (forced_turns.TurnLengths.draw). None in every real deployment.
        self.turn_length_hook: Callable[[int, int], int] | None = None
        # Observer hook (evaluation, parity): logits_hook(phase, streams, logits, offsets) sees each step's logits
        # before the decoders step: stream i's rows are logits[offsets[i] : offsets[i + 1]] (raw, unprocessed).
        self.logits_hook: Callable[[str, list[Stream], torch.Tensor, list[int]], None] | None = None
        # Per system prompt (its token ids), the last stream that started with it: new streams share its pages.
        self._system_prompts: dict[tuple[int, ...], Stream] = {}

    def execute(self, plan: ScheduledStep, now: float) -> StepOutput:
        if plan.phase == PREFILL:
            self.counters["prefill_steps"] += 1
            logits = self._prefill(plan.streams, now)
            offsets = list(range(len(plan.streams) + 1))  # one row per stream after a prefill
        else:
            self.counters["decode_steps"] += 1
            logits = self._decode(plan.streams)
            offsets = list(itertools.accumulate((len(s.turn.rows) for s in plan.streams), initial=0))
        if self.logits_hook is not None:
            self.logits_hook(plan.phase, plan.streams, logits, offsets)
        return StepOutput(plan.streams, self._decoding_steps(plan.streams, logits, offsets))

    # -- prefill ---------------------------------------------------------------------------------------------------

    def _prefill(self, streams: list[Stream], now: float) -> torch.Tensor:
        """Encode each stream's next chunk, append its turn prompt to its cache, open its turn: logits [B, V]."""
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
            stream.turn = Turn(chunk, decoder, rows=[stream.kv], tokens=[], started=now)
            stream.kv = None  # the turn's rows own the cache until the turn ends
        return logits

    def _shared_prefix_len(self, prompt, m: int) -> int:
        """How many system-prompt tokens a first turn takes from a live stream: all of them, less as many as make the
        rest of the first turn exactly as long as a later turn's prompt, a prefill shape with CUDA graphs (with the
        shipped templates, the system prompt less its last token). Recomputing those tokens costs next to nothing;
        an eager prefill of streams starting together costs every stream in the step."""
        excess = prompt.num_tokens - self.prompts.next_turn(m).num_tokens
        return excess if 0 < excess <= prompt.system_len else prompt.system_len

    def _system_prompt_cache(self, key: tuple[int, ...]):
        """A live cache whose first ``len(key)`` tokens are the system prompt ``key`` (the last stream that started
        with it, while it lives), or None."""
        stream = self._system_prompts.get(key)
        if stream is None:
            return None
        if self.streams.get(stream.id) is not stream:
            del self._system_prompts[key]
            return None
        seq = stream.kv if stream.kv is not None else (stream.turn.rows[0] if stream.turn is not None else None)
        return seq if seq is not None and seq.num_tokens >= len(key) else None

    # -- decode ----------------------------------------------------------------------------------------------------

    def _decode(self, streams: list[Stream]) -> torch.Tensor:
        """Feed every row of every stream's turn its next token: logits [rows, V]."""
        rows = [row for s in streams for row in s.turn.rows]
        tokens = [tok for s in streams for tok in s.turn.tokens]
        return self.runner.decode(rows, tokens)

    # -- decoding steps --------------------------------------------------------------------------------------------

    def _decoding_steps(self, streams: list[Stream], logits: torch.Tensor, offsets: list[int]) -> list[Any]:
        """One decoding step of each stream's turn from its rows ``logits[offsets[i] : offsets[i + 1]]``: the greedy
        streams (one row each) in one batched step, the beam streams in another, each with one device-to-host
        transfer for the whole batch."""
        greedy = [i for i, s in enumerate(streams) if isinstance(s.turn.decoder, GreedyTurn)]
        beams = [i for i, s in enumerate(streams) if not isinstance(s.turn.decoder, GreedyTurn)]
        steps = {}
        for index, step_fn in ((greedy, greedy_step), (beams, beam_step)):
            steps.update(zip(index, self._batched_steps(step_fn, streams, logits, offsets, index)))
        return [steps[i] for i in range(len(streams))]

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


class Updater:
    """Applies a step's output to its streams and reports what happened as events.

    ``emit(event)`` sends an event; ``finish(stream, reason, code, message)`` frees a stream (the engine's lifecycle).
    """

    def __init__(
        self,
        runner: ModelRunner,
        cfg: EngineConfig,
        streams: dict[Hashable, Stream],
        counters: dict[str, int],
        emit: Callable[[Event], None],
        finish: Callable[..., None],
        clock,
    ):
        self.runner = runner
        self.cfg = cfg
        self.streams = streams
        self.counters = counters
        self.emit = emit
        self.finish = finish
        self.clock = clock
        # Test hook for fault injection: called as fault_hook(stream_id) inside each stream's own update; whatever it
        # raises fails that stream only (the reliability tests use it through the server).
        self.fault_hook: Callable[[Hashable], None] | None = None
        # Evictions decided by turns that ended in this step: (stream, its cache, keep, cut), run together at the
        # end of the step (_flush_compactions).
        self._pending_compactions: list[tuple[Stream, Any, int, int]] = []

    def update(self, output: StepOutput) -> None:
        for stream, step in zip(output.streams, output.steps):
            self.guarded(stream, self._apply, stream, step)
        self._flush_compactions()

    def guarded(self, stream: Stream, fn, *args) -> None:
        """Run per-stream work; a failure fails only this stream."""
        try:
            fn(*args)
        except Exception as e:
            logger.exception("stream %r failed", stream.id)
            code = e.code if isinstance(e, EngineError) else "INTERNAL"
            self.finish(stream, "error", code, f"processing of stream {stream.id!r} failed: {e}")

    def flush_requests(self, stream: Stream) -> None:
        """Requests whose chunks are all translated are done (in order); a stream ended and drained finishes."""
        for tag in stream.pop_done_requests():
            self.emit(RequestDone(stream.id, tag))
        if stream.finished:
            self.finish(stream, "end")

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
        turn.release()
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
        latency = self.clock.monotonic() - turn.chunk.arrival
        self.emit(TurnEnded(stream.id, turn.chunk.request.tag, tuple(result.emitted_ids), latency))
        stream.close_chunk(turn.chunk)
        self.flush_requests(stream)

    def _emit_text(self, stream: Stream, text: str) -> None:
        """Text of the running turn goes to the request whose audio completed the turn's chunk."""
        if text:
            chunk = stream.turn.chunk
            self.emit(TextDelta(stream.id, chunk.request.tag, text, chunk.source_seconds))

    def _flush_compactions(self) -> None:
        """Run the evictions of the turns that ended in this step as one batched compaction.

        A stream finished since its turn ended has released its cache: it is skipped. Errors raised before
        the pool changed (out of pages, bad arguments) are pinned on their streams by compacting one by one;
        any other error leaves the batch's caches undefined, so all its streams fail.
        """
        pending, self._pending_compactions = self._pending_compactions, []
        pending = [p for p in pending if self.streams.get(p[0].id) is p[0] and p[0].kv is p[1] and p[1].pages]
        if not pending:
            return
        try:
            self.runner.compact_many([(seq, keep, cut) for _, seq, keep, cut in pending])
        except (CapacityError, ValueError):
            logger.exception("batched KV eviction failed; evicting stream by stream")
            for stream, seq, keep, cut in pending:
                self.guarded(stream, self.runner.compact_many, [(seq, keep, cut)])
        except Exception as e:
            logger.exception("batched KV eviction failed")
            code = e.code if isinstance(e, EngineError) else "INTERNAL"
            for stream, *_ in pending:
                self.finish(stream, "error", code, f"KV cache eviction of stream {stream.id!r} failed: {e}")


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
