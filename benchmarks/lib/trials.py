"""One trial of ``gpu_streams``: N staggered real-time streams through a fresh engine, simulated by discrete events.

The engine runs on this thread (``Engine.step()``) with a :class:`~.clock.VirtualClock`: it advances with the wall
time while the engine works and jumps ahead while the engine would wait; each chunk enters the engine stamped with
its due time (the moment its last sample arrives), so latencies are exactly those of a real-time run whose idle
waits cost nothing. Turn lengths are forced (dummy weights never emit EOT) through ``engine.turn_length_hook``. A
trial that already has more than 1% of its turns over 1 s (or 5% over 0.5 s) stops early as a fail.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import math
import pstats
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from client.stats import percentiles
from infinisst_backend.config import SAMPLE_RATE, SAMPLES_PER_UNIT, DecodingConfig, EngineConfig, ModelConfig
from infinisst_backend.engine.admission import worst_case_pages
from infinisst_backend.engine.engine import Engine
from infinisst_backend.engine.events import StreamError, StreamFinished, TextDelta, TurnEnded
from infinisst_backend.engine.forced_turns import TurnLengths
from infinisst_backend.model.infinisst import InfiniSSTModel
from infinisst_backend.text.prompt import PromptBuilder

from .clock import VirtualClock
from .gpu import total_memory
from .models import PAGE_SIZE, page_bytes, weights_bytes
from .static_scheduler import scheduler_for

P95_LIMIT_S = 0.5
P99_LIMIT_S = 1.0
HEADROOM_BYTES = 8 << 30  # activations, workspaces and allocator slack kept free of caches


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    m: int
    beam: int

    @property
    def period_s(self) -> float:
        return SAMPLES_PER_UNIT * self.m / SAMPLE_RATE


SETTINGS = {s.name: s for s in (Setting("greedy_m1", 1, 1), Setting("greedy_m2", 2, 1), Setting("beam4_m2", 2, 4))}


@dataclass
class Bench:
    """What every trial shares: the model, tokenizer, memory figures and options."""

    model: InfiniSSTModel
    tokenizer: object
    model_cfg: ModelConfig
    args: argparse.Namespace
    speech_cache_bytes: dict[int, int] = field(default_factory=dict)  # by m, steady state
    prompts: PromptBuilder = field(init=False)  # the engine's prompts, as it admits streams
    deadline: float = math.inf  # perf_counter() time after which no new trial starts
    device: str = "cuda"
    dtype: str = "bfloat16"
    attention_backend: str = "flashinfer"
    profiled: bool = False  # --profile-host: the first trial has run under cProfile

    def __post_init__(self) -> None:
        self.prompts = PromptBuilder(self.tokenizer, self.model_cfg.prompt)

    @property
    def system_len(self) -> int:
        return self.prompts.first_turn("German", 1).system_len

    def engine_config(self, setting: Setting, n: int, num_pages: int) -> EngineConfig:
        return EngineConfig(
            device=self.device,
            dtype=self.dtype,
            attention_backend=self.attention_backend,
            max_batch_size=self.args.max_batch,
            max_prefill_tokens=self.args.max_prefill_tokens,
            page_size=PAGE_SIZE,
            num_pages=num_pages,
            max_streams=n + 1,
            max_llm_cache_tokens=1000,
            batch_timeout_s=self.args.batch_timeout,
            default_latency_multiplier=setting.m,
            decoding=DecodingConfig(beam_size=setting.beam),
            max_request_seconds=60.0,
            stream_idle_timeout_s=1e9,
        )

    def stream_bytes(self, setting: Setting) -> tuple[int, int]:
        """(worst-case KV pages the engine reserves per stream, bytes per stream incl. the speech cache)."""
        cfg = self.engine_config(setting, 1, 1)
        first, later = self.prompts.first_turn("German", setting.m), self.prompts.next_turn(setting.m)
        prompt_tokens = (first.num_tokens, later.num_tokens)
        pages = worst_case_pages(cfg, setting.m, setting.beam, self.system_len, prompt_tokens)
        return pages, pages * self.page_bytes + self.speech_cache_bytes.get(setting.m, 0)

    @property
    def page_bytes(self) -> int:
        return page_bytes(self.model_cfg.llm, self.model.dtype.itemsize)

    def memory_limit(self, setting: Setting) -> int:
        """Streams whose worst-case caches fit next to the weights with HEADROOM_BYTES left."""
        free_for_caches = total_memory(self.device) - weights_bytes(self.model) - HEADROOM_BYTES
        return max(0, free_for_caches // self.stream_bytes(setting)[1])


@contextlib.contextmanager
def forced_turn_lengths(engine: Engine, lengths: TurnLengths) -> Iterator[None]:
    """Make every turn of ``engine`` end after a drawn number of tokens (the real decoder with that max length)."""
    engine.turn_length_hook = lengths.draw
    try:
        yield
    finally:
        engine.turn_length_hook = None


def run_trial(bench: Bench, setting: Setting, n: int, scheduling: str, seed: int) -> dict:
    """N staggered real-time streams for ``--seconds`` of audio each, on a fresh engine; latency statistics.

    A trial that runs out of GPU memory (activations beyond the headroom the memory limit keeps) is a failed
    trial, reported as such, and the sweep goes on."""
    wall0 = time.perf_counter()
    try:
        if getattr(bench.args, "profile_host", False) and not bench.profiled:
            bench.profiled = True
            return _profiled_trial(bench, setting, n, scheduling, seed)
        return _run_trial(bench, setting, n, scheduling, seed)
    except torch.OutOfMemoryError as e:
        message = str(e).split(". ")[0]
        detail = " ".join(str(e).split())[:400]  # what it asked for, what was free, allocated and reserved
        peak = torch.cuda.max_memory_allocated()
    gc.collect()  # the failed engine is unreachable once the exception is gone
    torch.cuda.empty_cache()
    wall = time.perf_counter() - wall0
    print(f"  out of GPU memory at N={n}: {detail}", flush=True)
    return {
        "streams": n,
        "scheduling": scheduling,
        "passes": False,
        "reason": "out of memory",
        "error": message,
        "error_detail": detail,
        "max_allocated_gib": round(peak / 2**30, 2),
        "wall_s": wall,
    }


def _profiled_trial(bench: Bench, setting: Setting, n: int, scheduling: str, seed: int) -> dict:
    """``--profile-host``: the run's first trial under cProfile (host-side Python: engine, scheduler, decoding, the
    runner's host work, the driver), written to ``<out>.host_profile_<setting>_<n>.txt``. Profiling slows the
    host, so the trial is marked ``profiled``: the sweep counts it neither as a pass nor as a fail and runs the same
    N again."""
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        result = _run_trial(bench, setting, n, scheduling, seed)
    finally:
        profiler.disable()
        path = Path(f"{bench.args.out}.host_profile_{setting.name}_{n}.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        text = io.StringIO()
        text.write(f"cProfile of one {setting.name} trial at N={n} ({scheduling}); times include profiling overhead\n")
        for key in ("tottime", "cumulative"):
            pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(40)
        path.write_text(text.getvalue())
        print(f"  host profile: {path}", flush=True)
    return {**result, "profiled": True, "passes": False, "reason": "profiled (cProfile slows the host)"}


def _run_trial(bench: Bench, setting: Setting, n: int, scheduling: str, seed: int) -> dict:
    args = bench.args
    period = setting.period_s
    num_chunks = max(1, math.ceil(args.seconds / period))
    expected = n * num_chunks
    pages_per_stream, _ = bench.stream_bytes(setting)
    result: dict = {"streams": n, "scheduling": scheduling, "expected_turns": expected}
    if n > bench.memory_limit(setting):
        result.update(passes=False, reason="memory", turns=0)
        return result

    events = TrialEvents(n)
    gc.collect()
    if bench.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        result["allocated_before_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    cfg = bench.engine_config(setting, n, n * pages_per_stream + 8)
    clock = VirtualClock()
    engine = Engine(
        bench.model,
        bench.tokenizer,
        bench.model_cfg,
        cfg,
        on_event=events,
        clock=clock,
        scheduler=scheduler_for(scheduling, cfg),
    )
    runner = engine.runner
    runner.profile = timing = {}  # the runner's synchronized seconds per call kind
    chunk = (0.1 * np.random.default_rng(seed).standard_normal(SAMPLES_PER_UNIT * setting.m)).astype(np.float32)
    ids = [f"s{i}" for i in range(n)]
    events.index = {sid: i for i, sid in enumerate(ids)}
    lengths = TurnLengths(seed)
    busy = 0.0
    aborted = None
    wall0 = time.perf_counter()
    with forced_turn_lengths(engine, lengths):
        for sid in ids:
            engine.open_stream(sid, "German", setting.m, DecodingConfig(beam_size=setting.beam))
        t0 = clock.monotonic()
        events.clock, events.starts = clock, [t0 + i * period / n for i in range(n)]
        # (due time, stream, chunk): chunk k of stream i ends at start_i + (k + 1) * period.
        schedule = sorted((events.starts[i] + (k + 1) * period, i, k) for i in range(n) for k in range(num_chunks))
        events.dues = [[events.starts[i] + (k + 1) * period for k in range(num_chunks)] for i in range(n)]
        cursor, steps, pages_peak = 0, 0, 0
        wall_limit = max(1.5 * args.seconds, args.seconds + 30.0)
        while True:
            now = clock.monotonic()
            while cursor < len(schedule) and schedule[cursor][0] <= now:
                due, i, k = schedule[cursor]
                clock.pinned = due  # the chunk's last sample reached the engine at its due time
                engine.add_audio(ids[i], chunk, tag=k, end=k == num_chunks - 1)
                clock.pinned = None
                events.delivered[i] += 1
                cursor += 1
            t = time.perf_counter()
            ran = engine.step()
            if ran:
                busy += time.perf_counter() - t
                steps += 1
                if steps % 8 == 0:
                    pages_peak = max(pages_peak, runner.pool.num_pages - runner.pool.num_free)
                    aborted = events.failing(clock.monotonic(), expected)
                    if aborted is None and time.perf_counter() - wall0 > wall_limit:
                        aborted = "wall-clock limit"
                    if aborted:
                        break
                continue
            if engine.has_work():  # a prefill held back for a fuller batch (batch_timeout_s)
                target = now + 1e-3
            elif cursor < len(schedule):
                target = schedule[cursor][0]
            else:
                break
            if cursor < len(schedule):
                target = min(target, schedule[cursor][0])
            clock.skip_to(max(target, now + 1e-6))
        duration = clock.monotonic() - t0
        engine.shutdown()
    leaked = runner.pool.num_pages - runner.pool.num_free
    lat = percentiles(events.latencies, (50, 95, 99), count=False)
    ca = percentiles(events.ca_delays, (50, 95), count=False, maximum=False)
    decode_rows = [r.num_rows for r in engine.step_records if r.phase == "decode"]
    prefill_rows = [r.num_rows for r in engine.step_records if r.phase == "prefill"]
    complete = aborted is None and events.finished == n and len(events.latencies) == expected and not events.errors
    result.update(
        turns=len(events.latencies),
        p50_s=lat["p50"],
        p95_s=lat["p95"],
        p99_s=lat["p99"],
        max_s=lat["max"],
        ca_delay_p50_s=ca["p50"],
        ca_delay_p95_s=ca["p95"],
        complete=complete,
        aborted=aborted,
        errors=events.errors[:5],
        virtual_s=duration,
        wall_s=time.perf_counter() - wall0,
        busy_fraction=busy / max(duration, 1e-9),
        model_s={k: round(v, 3) for k, v in timing.items()},
        engine_overhead_s=busy - sum(timing.values()),
        decode_steps=len(decode_rows),
        prefill_steps=len(prefill_rows),
        mean_decode_rows=float(np.mean(decode_rows)) if decode_rows else 0.0,
        mean_prefill_streams=float(np.mean(prefill_rows)) if prefill_rows else 0.0,
        kv_pages_peak=pages_peak,
        max_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if bench.device.startswith("cuda")
        else None,
        kv_bytes_per_stream_peak=pages_peak * bench.page_bytes / n,
        mean_turn_tokens=lengths.mean,
        pages_leaked=leaked,
    )
    result["passes"] = bool(complete and result["p95_s"] <= P95_LIMIT_S and result["p99_s"] <= P99_LIMIT_S)
    result["errors"] = [] if complete else result["errors"]
    del engine, runner
    gc.collect()
    if bench.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


class TrialEvents:
    """Collects the engine's events (called on the stepping thread)."""

    def __init__(self, n: int):
        self.latencies: list[float] = []
        self.ca_delays: list[float] = []
        self.ended = [0] * n
        self.delivered = [0] * n
        self.finished = 0
        self.over1 = 0  # finished turns over the p99 / p95 limits
        self.over05 = 0
        self.errors: list[str] = []
        self.index: dict = {}
        self.clock: VirtualClock | None = None
        self.starts: list[float] = []
        self.dues: list[list[float]] = []

    def __call__(self, event) -> None:
        if isinstance(event, TurnEnded):
            self.latencies.append(event.chunk_latency_s)
            self.ended[self.index[event.stream_id]] += 1
            self.over1 += event.chunk_latency_s > P99_LIMIT_S
            self.over05 += event.chunk_latency_s > P95_LIMIT_S
        elif isinstance(event, TextDelta):
            # Computation-aware delay: emission time minus the audio time read at emission (same clock).
            start = self.starts[self.index[event.stream_id]]
            self.ca_delays.append(self.clock.monotonic() - start - event.source_seconds)
        elif isinstance(event, StreamFinished):
            self.finished += 1
            if event.reason != "end":
                self.errors.append(f"{event.stream_id}: finished with {event.reason}")
        elif isinstance(event, StreamError):
            self.errors.append(f"{event.stream_id}: {event.code} {event.message}")

    def failing(self, now: float, expected: int) -> str | None:
        """Why the trial has already failed (turns done late plus chunks already waiting too long), or None."""
        if self.errors:
            return "stream error"
        over1, over05 = self.over1, self.over05
        for i, dues in enumerate(self.dues):
            for k in range(self.ended[i], self.delivered[i]):
                age = now - dues[k]
                over1 += age > P99_LIMIT_S
                over05 += age > P95_LIMIT_S
        if over1 > 0.01 * expected:
            return f"{over1} turns over {P99_LIMIT_S} s"
        if over05 > 0.05 * expected:
            return f"{over05} turns over {P95_LIMIT_S} s"
        return None
