"""Concurrent real-time streams per GPU (N*), with the naive and static baselines: ../shared/docs/benchmarks.md.

One command measures, on one GPU, with the paper's model dimensions and random (dummy) bf16 weights:

* **N\\*** per setting (greedy m=1, greedy m=2, beam 4 m=2): the largest number of staggered real-time streams
  with p95 chunk latency <= 0.5 s, p99 <= 1.0 s, every turn done, nothing dropped; for the engine as served
  (``scheduling="iteration"``, FlashInfer) and for the **static** baseline (``scheduling="static"``);
* the **naive** baseline (one stream at a time, HF transformers forward with a contiguous ``DynamicCache``),
  estimated from the measured time of one unbatched turn: ``naive N* = floor(chunk period / turn time)``;
* decode step time vs batch size, prefill tokens/s, speech-encoder time, memory per stream, the memory limit.

Workload. Turn lengths are forced (dummy weights never emit EOT): each turn's length, EOT included, is drawn from
``1 + Poisson(5m - 1)`` capped at ``10m`` (mean ~5 tokens per 0.96 s), from a seeded generator, by wrapping the
engine's ``make_turn_decoder`` so the turn ends at its max length (the real decoder, processors and all, runs).
Stream i starts at ``i * period / N`` and sends one chunk of noise per period for ``--seconds`` of audio.

Real time is simulated faithfully by discrete events: the engine runs on this thread (``Engine.step()``), its
clock is a virtual one that advances with the real wall time while the engine works and jumps ahead while it
would sleep; each chunk enters the engine stamped with its due time (the moment its last sample arrives), so
latencies are exactly those of a real-time run whose idle waits cost nothing. A trial that already has more
than 1% of its turns over 1 s (or 5% over 0.5 s) stops early as a fail.

    python benchmarks/gpu_streams.py --out docs/benchmarks/gpu_streams
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import inspect
import io
import json
import math
import platform
import pstats
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import infinisst_backend.engine.engine as engine_module
from infinisst_backend.config import (
    EMBEDDINGS_PER_UNIT,
    SAMPLE_RATE,
    SAMPLES_PER_UNIT,
    DecodingConfig,
    EngineConfig,
    LLMConfig,
    ModelConfig,
    SpeechEncoderConfig,
)
from infinisst_backend.engine.admission import worst_case_pages
from infinisst_backend.engine.engine import Engine
from infinisst_backend.engine.events import StreamError, StreamFinished, TextDelta, TurnEnded
from infinisst_backend.engine.forced_turns import TOKENS_PER_UNIT_MEAN, TurnLengths
from infinisst_backend.model.infinisst import InfiniSSTModel
from infinisst_backend.runtime.model_runner import ModelRunner
from infinisst_backend.text.prompt import PromptBuilder

P95_LIMIT_S = 0.5
P99_LIMIT_S = 1.0
VOCAB_SIZE = 128_263  # Llama-3.1 + InfiniSST's 7 added tokens (docs/model.md §1.4)
HEADROOM_BYTES = 8 << 30  # activations, workspaces and allocator slack kept free of caches
PAGE_SIZE = 16
# A later turn's prompt around its 12m speech rows (Llama-3.1 ids): <|eot_id|> user header, then assistant header.
LATER_TURN_PREFIX = [128009, 128006, 882, 128007, 271]
LATER_TURN_SUFFIX = [128009, 128006, 78191, 128007, 271]
LLAMA3_SPECIALS = {
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    128004: "<|finetune_right_pad_id|>",
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128008: "<|eom_id|>",
    128009: "<|eot_id|>",
}
INFINISST_TOKENS = ["<sp_patch>", "<sp_start>", "<sp_end>", "<latency_1>", "<latency_2>", "<latency_3>", "<latency_4>"]


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    m: int
    beam: int

    @property
    def period_s(self) -> float:
        return SAMPLES_PER_UNIT * self.m / SAMPLE_RATE


SETTINGS = {s.name: s for s in (Setting("greedy_m1", 1, 1), Setting("greedy_m2", 2, 1), Setting("beam4_m2", 2, 4))}


# ---------------------------------------------------------------------------------------------------- model


def synthetic_llama3_tokenizer():
    """A word-level tokenizer with Llama-3.1's vocabulary size and special-token ids (no files needed).

    Words are unknown (id 0) and whitespace is merged into the next word, so a later turn has exactly Llama-3.1's
    ``12m + 10`` tokens; the system prompt is 28 tokens (Llama-3.1's BPE gives about 39). Every id decodes.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = dict(LLAMA3_SPECIALS)
    specials.update({128256 + i: tok for i, tok in enumerate(INFINISST_TOKENS)})
    vocab = {f"w{i}": i for i in range(VOCAB_SIZE) if i not in specials and i != 0}
    vocab["<unk>"] = 0
    vocab.update({tok: i for i, tok in specials.items()})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+"), behavior="merged_with_next")
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials.values())})
    return tokenizer


def paper_model_config(num_layers: int = 32) -> ModelConfig:
    """The paper's dimensions: Llama-3.1-8B LLM, wav2vec 2.0 Large encoder (576-frame window), llama3 prompt.

    Llama-3.1's frequency-dependent RoPE scaling is left out (plain RoPE, same cost; see the report).
    """
    llm = LLMConfig(architecture="llama", vocab_size=VOCAB_SIZE, num_hidden_layers=num_layers, rope_theta=500_000.0)
    return ModelConfig(speech_encoder=SpeechEncoderConfig(), llm=llm, dtype="bfloat16")


def smoke_model_config() -> ModelConfig:
    """A tiny model of the same shape family, for ``--smoke`` (the harness on CPU, in seconds)."""
    speech = SpeechEncoderConfig(
        conv_layers=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2,
        embed_dim=64,
        num_layers=2,
        num_heads=4,
        ffn_dim=128,
    )
    llm = LLMConfig(
        architecture="llama",
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        rope_theta=500_000.0,
    )
    return ModelConfig(speech_encoder=speech, llm=llm, dtype="float32")


def build_dummy_model(
    cfg: ModelConfig, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> InfiniSSTModel:
    """The model with PyTorch's default random init, built on the device and cast to ``dtype`` (no checkpoint)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = InfiniSSTModel(cfg)
    # RotaryEmbedding is a plain object whose float64 frequencies live on the CPU (its tables are cast per device);
    # the device context above made them on the GPU.
    model.llm.rope.inv_freq = model.llm.rope.inv_freq.cpu()
    return model.to(dtype).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def total_memory(device: str) -> int:
    """Device memory in bytes (a nominal 16 GiB for the CPU smoke run)."""
    return torch.cuda.get_device_properties(0).total_memory if device.startswith("cuda") else 16 << 30


def weights_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def page_bytes(cfg: LLMConfig, itemsize: int = 2, page_size: int = PAGE_SIZE) -> int:
    return 2 * cfg.num_hidden_layers * page_size * cfg.num_key_value_heads * cfg.head_dim * itemsize


def gpu_info(device: str) -> dict:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info = {"gpu": torch.cuda.get_device_name(0), "multiprocessors": props.multi_processor_count}
    else:
        info = {"gpu": f"none (CPU smoke run on {platform.machine()})"}
    info["gpu_memory_bytes"] = total_memory(device)
    info.update(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version())
    for name in ("flashinfer", "transformers"):
        with contextlib.suppress(Exception):
            info[name] = __import__(name).__version__
    return info


# ---------------------------------------------------------------------------------------------------- workload


@contextlib.contextmanager
def forced_turn_lengths(engine: Engine, lengths: TurnLengths) -> Iterator[None]:
    """Make every turn of ``engine`` end after a drawn number of tokens (the real decoder with that max length)."""
    engine.turn_length_hook = lengths.draw
    try:
        yield
    finally:
        engine.turn_length_hook = None


class VirtualClock:
    """Real time while the engine works, jumps while it would wait; ``pin`` stamps an arrival with its due time."""

    def __init__(self):
        self.offset = 0.0
        self.pinned: float | None = None

    def monotonic(self) -> float:
        return self.pinned if self.pinned is not None else time.perf_counter() + self.offset

    def skip_to(self, t: float) -> None:
        now = self.monotonic()
        if t > now:
            self.offset += t - now

    def sleep(self, seconds: float) -> None:  # the engine never sleeps here (it is stepped), but be complete
        self.offset += max(0.0, seconds)


@contextlib.contextmanager
def virtual_time(clock: VirtualClock) -> Iterator[None]:
    """Point the engine module's ``time`` at the virtual clock."""

    class _Time:
        monotonic = staticmethod(clock.monotonic)
        sleep = staticmethod(clock.sleep)
        perf_counter = staticmethod(time.perf_counter)

    real = engine_module.time
    engine_module.time = _Time
    try:
        yield
    finally:
        engine_module.time = real


class _Timed:
    """Wraps a runner method: adds its synchronized wall time to a bucket."""

    def __init__(self, fn, bucket: dict, key: str, device: str):
        self.fn, self.bucket, self.key, self.device = fn, bucket, key, device

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        out = self.fn(*args, **kwargs)
        sync(self.device)
        self.bucket[self.key] = self.bucket.get(self.key, 0.0) + time.perf_counter() - t
        return out


# ---------------------------------------------------------------------------------------------------- one trial


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

    def engine_config(self, setting: Setting, scheduling: str, n: int, num_pages: int) -> EngineConfig:
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
            scheduling=scheduling,
            default_latency_multiplier=setting.m,
            decoding=DecodingConfig(beam_size=setting.beam),
            max_request_seconds=60.0,
            stream_idle_timeout_s=1e9,
        )

    def stream_bytes(self, setting: Setting) -> tuple[int, int]:
        """(worst-case KV pages the engine reserves per stream, bytes per stream incl. the speech cache)."""
        cfg = self.engine_config(setting, "iteration", 1, 1)
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

    events = _TrialEvents(n)
    gc.collect()
    if bench.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        result["allocated_before_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    engine = Engine(
        bench.model,
        bench.tokenizer,
        bench.model_cfg,
        bench.engine_config(setting, scheduling, n, n * pages_per_stream + 8),
        on_event=events,
    )
    timing: dict = {}
    runner = engine.runner
    for name in ("encode_speech", "prefill", "decode", "compact_many"):
        setattr(runner, name, _Timed(getattr(runner, name), timing, name + "_s", bench.device))
    chunk = (0.1 * np.random.default_rng(seed).standard_normal(SAMPLES_PER_UNIT * setting.m)).astype(np.float32)
    ids = [f"s{i}" for i in range(n)]
    events.index = {sid: i for i, sid in enumerate(ids)}
    clock = VirtualClock()
    lengths = TurnLengths(seed)
    busy = 0.0
    aborted = None
    wall0 = time.perf_counter()
    with virtual_time(clock), forced_turn_lengths(engine, lengths):
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
    lat = np.array(events.latencies)
    ca = np.array(events.ca_delays)
    decode_rows = [r.num_rows for r in engine.step_records if r.phase == "decode"]
    prefill_rows = [r.num_rows for r in engine.step_records if r.phase == "prefill"]
    complete = aborted is None and events.finished == n and len(events.latencies) == expected and not events.errors
    result.update(
        turns=len(events.latencies),
        p50_s=_percentile(lat, 50),
        p95_s=_percentile(lat, 95),
        p99_s=_percentile(lat, 99),
        max_s=_percentile(lat, 100),
        ca_delay_p50_s=_percentile(ca, 50),
        ca_delay_p95_s=_percentile(ca, 95),
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


def _percentile(values: np.ndarray, q: float) -> float | None:
    """The q-th percentile, or None when there are no values (e.g. a trial stopped before any turn ended)."""
    return float(np.percentile(values, q)) if values.size else None


def _fraction(a: int | None, b: int) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def _lower_bound(setting: dict, scheduling: str) -> bool:
    """Whether a sweep's N* is only a lower bound: it passed, nothing above it failed, and it is below the memory
    limit (at the limit no larger N can be admitted, so N* is exact)."""
    sweep = setting["sweeps"][scheduling]
    n = sweep.get("n_star")
    limit = sweep.get("memory_limit", setting["memory_limit_streams"])
    return bool(n) and sweep.get("first_fail") is None and n < limit


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


class _TrialEvents:
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


def sweep(
    bench: Bench, setting: Setting, scheduling: str, start: int, budget_s: float, seed: int, confirm: int = 0
) -> dict:
    """Bracket N*: up by x1.5 while trials pass, down by x0.67 while they fail, then bisect; within budget_s
    (and before the run's --time-limit).

    ``confirm``: then repeat the trial at N* with other seeds until it has passed ``confirm`` more times; a repeat
    that fails makes that N a fail, and N* falls back to the largest N below it that passed (repeated in turn).
    Near the knee the p95 is flat, so one trial can pass or fail by noise; ``confirmed`` says whether N* held.
    """
    limit = bench.memory_limit(setting)
    deadline = min(time.perf_counter() + budget_s, bench.deadline)
    if time.perf_counter() + 10.0 > bench.deadline:
        return {"n_star": None, "first_fail": None, "memory_limit": limit, "trials": [], "skipped": "time limit"}
    good, bad, n, trials = 0, None, max(1, min(start, limit)), []
    while True:
        r = run_trial(bench, setting, n, scheduling, seed + len(trials))
        trials.append(r)
        _print_trial(setting, r)
        _save_trial(bench, setting, r)
        if r.get("profiled"):  # neither a pass nor a fail: the same N again, unprofiled
            continue
        if r["passes"]:
            good = max(good, n)
        else:
            bad = n if bad is None else min(bad, n)
        if bad is None:
            if n >= limit:
                break
            nxt = min(limit, max(n + 1, int(n * 1.5)))
        elif good == 0:
            if n == 1:
                break
            nxt = max(1, int(n * 0.67))
        else:
            if bad - good <= max(1, good // 8):
                break
            nxt = (good + bad) // 2
        # A passing trial costs up to ~--seconds of wall time: start one only if it fits the budget.
        if time.perf_counter() + min(bench.args.seconds, r["wall_s"] * max(1.0, nxt / n)) > deadline:
            break
        n = nxt
    passes_at_star = 0
    while confirm and good and passes_at_star < confirm:
        if time.perf_counter() + bench.args.seconds > deadline:
            break
        r = run_trial(bench, setting, good, scheduling, seed + len(trials))
        r["repeat"] = True
        trials.append(r)
        _print_trial(setting, r)
        _save_trial(bench, setting, r)
        if r["passes"]:
            passes_at_star += 1
            continue
        bad = good if bad is None else min(bad, good)
        good = max((t["streams"] for t in trials if t["passes"] and t["streams"] < good), default=0)
        passes_at_star = 0
    return {
        "n_star": good,
        "first_fail": bad,
        "memory_limit": limit,
        "trials": trials,
        "confirmed": bool(confirm) and passes_at_star >= confirm,
    }


def _trials_log(bench: Bench) -> Path:
    """``<--out>.trials.jsonl``: every trial of the run, one JSON line each, written as it ends."""
    return Path(str(bench.args.out) + ".trials.jsonl")


def _save_trial(bench: Bench, setting: Setting, r: dict) -> None:
    """Append the trial to :func:`_trials_log`, so that a run cut off before its report (a device time limit) keeps
    what it measured."""
    path = _trials_log(bench)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"setting": setting.name, **r}) + "\n")


def _verdict(r: dict) -> str:
    """A trial's pass column in the report."""
    if r.get("profiled"):
        return "(profiled: not counted)"
    return "yes" if r["passes"] else "no" + (" (" + r["aborted"] + ")" if r["aborted"] else "")


def _print_trial(setting: Setting, r: dict) -> None:
    if r.get("reason") == "memory":
        print(f"  {setting.name} {r['scheduling']:9s} N={r['streams']:4d}  over the memory limit", flush=True)
        return
    if r.get("reason") == "out of memory":
        print(f"  {setting.name} {r['scheduling']:9s} N={r['streams']:4d}  FAIL out of GPU memory: {r['error']}")
        return
    print(
        f"  {setting.name} {r['scheduling']:9s} N={r['streams']:4d}  p50={_f(r['p50_s'])} p95={_f(r['p95_s'])} "
        f"p99={_f(r['p99_s'])}  busy={r['busy_fraction']:.2f} wall={r['wall_s']:.0f}s "
        f"dec_rows={r['mean_decode_rows']:.0f} pre_streams={r['mean_prefill_streams']:.1f} "
        f"model={r['model_s']} overhead={r['engine_overhead_s']:.1f}s mem0={r.get('allocated_before_gib')}G  "
        f"{'PROFILED' if r.get('profiled') else 'PASS' if r['passes'] else 'FAIL ' + str(r['aborted'] or '')}",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------------- parts


def _median_time(fn, repeats: int, device: str, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def measure_parts(bench: Bench, batch_sizes: list[int], context: int) -> dict:
    """Decode step time vs batch size and prefill throughput of the runner (FlashInfer), ``context``-token caches."""
    cfg = bench.engine_config(SETTINGS["greedy_m1"], "iteration", max(batch_sizes), 1)
    pages_per_seq = math.ceil((context + 200) / PAGE_SIZE)  # room for the timed decode and prefill calls
    cfg.num_pages = max(batch_sizes) * pages_per_seq + 8
    cfg.max_streams = 1  # no streams here: no speech cache slots
    runner = ModelRunner(bench.model, cfg, cfg.num_pages)
    runner.kv.data.normal_()  # never time on zeros
    hidden = bench.model_cfg.llm.hidden_size
    rng = np.random.default_rng(0)
    decode, prefill = [], []
    for b in batch_sizes:
        seqs = [runner.new_sequence() for _ in range(b)]
        for seq in seqs:
            seq.reserve(context)
        tokens = rng.integers(0, 128_000, b).tolist()
        t = _median_time(lambda seqs=seqs, tokens=tokens, r=runner: r.decode(seqs, tokens), 8, bench.device)
        decode.append({"batch": b, "step_ms": 1e3 * t, "rows_per_s": b / t})
        # A later turn's prompt at m=1: 5 ids, 12 speech rows, 5 ids = 22 tokens per stream.
        speech = torch.randn(EMBEDDINGS_PER_UNIT, hidden, device=bench.device, dtype=bench.model.dtype)
        parts = [(LATER_TURN_PREFIX, speech, LATER_TURN_SUFFIX)] * b
        t = _median_time(lambda seqs=seqs, parts=parts, r=runner: r.prefill(seqs, parts), 4, bench.device)
        prefill.append({"batch": b, "tokens": 22 * b, "step_ms": 1e3 * t, "tokens_per_s": 22 * b / t})
        for seq in seqs:
            seq.release()
        print(f"  parts B={b:4d}: decode {decode[-1]['step_ms']:.1f} ms, prefill {prefill[-1]['step_ms']:.1f} ms")
    del runner
    gc.collect()
    if bench.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"context_tokens": context, "decode": decode, "prefill": prefill}


def measure_encoder(bench: Bench, batch_sizes: list[int], m: int) -> dict:
    """Speech-encoder time per batched chunk at steady state (576-frame cache full), and the cache's bytes."""
    speech = bench.model.speech
    out = []
    chunk = torch.from_numpy((0.1 * np.random.default_rng(1).standard_normal(SAMPLES_PER_UNIT * m)).astype("f4"))
    cache_bytes = 0
    for b in batch_sizes:
        pool = speech.new_pool(b)  # freed after this batch size (the frontend's default pool would keep growing)
        caches = [speech.new_cache(m, pool) for _ in range(b)]
        warm_chunks = math.ceil(speech.cfg.max_cache_frames / (speech.cfg.block_size * m)) + 1
        for _ in range(warm_chunks):
            speech.encode_chunks(caches, [chunk.to(bench.device)] * b)
        cache_bytes = caches[0].nbytes()
        t = _median_time(
            lambda caches=caches, b=b: speech.encode_chunks(caches, [chunk.to(bench.device)] * b), 3, bench.device
        )
        out.append({"batch": b, "ms": 1e3 * t})
        del caches, pool
    gc.collect()
    if bench.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"m": m, "steady_state_cache_bytes": cache_bytes, "times": out}


def measure_naive(bench: Bench, encoder_ms_b1: dict[int, float], context: int) -> dict:
    """One stream, unbatched: HF transformers Llama with a contiguous DynamicCache of ``context`` tokens.

    A turn = speech encoder (batch 1) + prefill of the turn prompt (12m + 10 tokens) + (mean forced length - 1)
    decode steps with an argmax read back per step; beam 4 runs 4 rows, as the reference does (docs/model.md §6.2).
    naive N* = floor(chunk period / turn time): workers share the GPU one turn at a time.
    """
    import transformers

    llm_cfg = bench.model_cfg.llm
    hf_cfg = transformers.LlamaConfig(**llm_cfg.to_hf_dict(), attn_implementation="sdpa")
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    weights = bench.model.llm.state_dict()
    weights["lm_head.weight"] = weights["lm_head.weight"][: llm_cfg.vocab_size]  # the GPU runner pads the rows
    hf.load_state_dict(weights, strict=True, assign=True)  # shares our weights
    rotary = type(hf.model.rotary_emb)(config=hf_cfg)
    hf.model.rotary_emb = rotary.to(bench.device)
    hf.eval()
    cache_arg = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    hidden = llm_cfg.hidden_size
    out = {}
    for setting in (s for s in SETTINGS.values() if s.m in encoder_ms_b1):
        rows = setting.beam
        q = EMBEDDINGS_PER_UNIT * setting.m + 10
        steps = round(TOKENS_PER_UNIT_MEAN * setting.m - 1)  # decode steps of a mean-length turn

        def turn(rows=rows, q=q, steps=steps, hf=hf):
            ctx = torch.randn(rows, context, hidden, device=bench.device, dtype=bench.model.dtype)
            cache = transformers.DynamicCache(config=hf_cfg)
            with torch.inference_mode():
                hf(inputs_embeds=ctx, use_cache=True, logits_to_keep=1, **{cache_arg: cache})
                sync(bench.device)
                t = time.perf_counter()
                x = torch.randn(rows, q, hidden, device=bench.device, dtype=bench.model.dtype)
                logits = hf(inputs_embeds=x, use_cache=True, logits_to_keep=1, **{cache_arg: cache}).logits
                token = logits[:, -1].argmax(-1)
                token.tolist()
                prefill_t = time.perf_counter() - t
                for _ in range(steps):
                    logits = hf(input_ids=token[:, None], use_cache=True, logits_to_keep=1, **{cache_arg: cache}).logits
                    token = logits[:, -1].argmax(-1)
                    token.tolist()  # generate() reads every step's token on the host
                return prefill_t, time.perf_counter() - t

        turn()
        runs = [turn() for _ in range(5)]
        prefill_s = float(np.median([r[0] for r in runs]))
        llm_s = float(np.median([r[1] for r in runs]))
        turn_s = llm_s + encoder_ms_b1[setting.m] / 1e3
        out[setting.name] = {
            "rows": rows,
            "prompt_tokens": q,
            "decode_steps": steps,
            "prefill_ms": 1e3 * prefill_s,
            "llm_turn_ms": 1e3 * llm_s,
            "encoder_ms": encoder_ms_b1[setting.m],
            "turn_ms": 1e3 * turn_s,
            "naive_n_star": int(setting.period_s // turn_s),
        }
        print(f"  naive {setting.name}: turn {1e3 * turn_s:.1f} ms -> {out[setting.name]['naive_n_star']} streams")
    del hf
    gc.collect()
    if bench.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------------- report


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    info = report["environment"]
    lines = [
        "# Concurrent real-time streams per GPU",
        "",
        f"{info['gpu']}, torch {info['torch']} (CUDA {info['cuda']}), FlashInfer {info.get('flashinfer', '?')}, "
        f"transformers {info.get('transformers', '?')}. "
        f"{'SMOKE RUN: tiny model on CPU, no figures' if report['options']['smoke'] else 'Paper dimensions'}, "
        "random weights, "
        f"{report['options']['seconds']:g} s of audio per stream, max batch {report['options']['max_batch']} rows.",
        "",
        f"Command: `{report['command']}`",
        "",
        "N\\*: p95 chunk latency <= 0.5 s and p99 <= 1.0 s, every turn done. Naive: one stream at a time (HF "
        "transformers, contiguous cache), from the measured turn time. Static: batches run to the end of their "
        "turns before new work joins.",
        "",
        "| setting | N* | static N* | naive N* | x static | x naive | p95 at N* (s) | memory limit | N*/limit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["settings"].items():
        ratio = lambda a, b: f"{a / b:.1f}" if a is not None and b else "-"  # noqa: E731
        low_it, low_st = (_lower_bound(s, sched) for sched in ("iteration", "static"))
        bound = {(False, True): "≤", (True, False): "≥", (True, True): "?"}.get((low_it, low_st), "")
        x_static, x_naive = ratio(s["n_star"], s["static_n_star"]), ratio(s["n_star"], s["naive_n_star"])
        lines.append(
            f"| {name} | {'≥' * low_it}{s['n_star']} | {'≥' * low_st}{s['static_n_star']} | {s['naive_n_star']} | "
            f"{bound}{x_static} | {'≥' * low_it}{x_naive} | "
            f"{s['p95_chunk_latency_s'] if s['p95_chunk_latency_s'] is not None else '-'} | "
            f"{s['memory_limit_streams']} | {_fraction(s['n_star'], s['memory_limit_streams'])} |"
        )
    if any(_lower_bound(s, sched) for s in report["settings"].values() for sched in ("iteration", "static")):
        lines += [
            "",
            "≥: no trial above this N failed and it is below the memory limit, so the sweep did not bracket N\\* (its "
            "budget ran out): a lower bound, and the ratios it enters are bounds too.",
        ]
    if report["options"].get("confirm"):
        confirmed = [name for name, s in report["settings"].items() if s.get("n_star_confirmed")]
        lines += [
            "",
            f"N\\* held in {report['options']['confirm']} repeated trial(s) with other seeds (`--confirm`): "
            f"{', '.join(confirmed) or 'none'}; a failed repeat made that N a fail.",
        ]
    lines += ["", "## Trials", "", "| setting | scheduling | N | p50 | p95 | p99 | CA delay p95 | busy | pass |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, s in report["settings"].items():
        for sched in ("iteration", "static"):
            for r in s["sweeps"][sched]["trials"]:
                if r.get("reason") == "memory":
                    continue
                n = f"{r['streams']}{' (repeat)' if r.get('repeat') else ''}"
                if r.get("reason") == "out of memory":
                    lines.append(f"| {name} | {sched} | {n} | | | | | | no (out of GPU memory) |")
                    continue
                lines.append(
                    f"| {name} | {sched} | {n} | {_f(r['p50_s'])} | {_f(r['p95_s'])} | {_f(r['p99_s'])} | "
                    f"{_f(r['ca_delay_p95_s'])} | {r['busy_fraction']:.2f} | "
                    f"{_verdict(r)} |"
                )
    parts = report.get("parts")
    if parts:
        lines += ["", f"## Decode step and prefill vs batch size ({parts['context_tokens']}-token caches)", ""]
        lines += ["| batch | decode step (ms) | decode rows/s | prefill step (ms) | prefill tokens/s |"]
        lines.append("|---|---|---|---|---|")
        for d, p in zip(parts["decode"], parts["prefill"]):
            lines.append(
                f"| {d['batch']} | {d['step_ms']:.1f} | {d['rows_per_s']:.0f} | {p['step_ms']:.1f} | "
                f"{p['tokens_per_s']:.0f} |"
            )
    mem = report["memory"]
    lines += [
        "",
        "## Memory",
        "",
        f"- weights: {mem['weights_bytes'] / 2**30:.1f} GiB; KV page ({PAGE_SIZE} tokens): "
        f"{mem['page_bytes'] / 2**20:.1f} MiB",
        "- speech cache per stream (steady state, measured): "
        + ", ".join(f"m={m}: {b / 2**20:.1f} MiB" for m, b in mem["speech_cache_bytes"].items()),
        f"- LLM KV per stream at steady state (measured peak, greedy m=1): "
        f"{mem.get('kv_bytes_per_stream_measured', 0) / 2**20:.1f} MiB",
        "- reserved per stream by admission (worst case): "
        + ", ".join(f"{k}: {v / 2**20:.0f} MiB" for k, v in mem["reserved_bytes_per_stream"].items()),
        f"- memory limit (worst-case reservations, {HEADROOM_BYTES >> 30} GiB headroom): "
        f"{report['memory_limit_streams']} streams at greedy m=1; with measured steady-state bytes: "
        f"{mem.get('memory_limit_streams_measured', '-')}",
    ]
    if report.get("naive"):
        lines += ["", "## Naive baseline (one unbatched stream, HF transformers)", ""]
        lines += ["| setting | rows | prompt | decode steps | LLM turn (ms) | encoder (ms) | turn (ms) | naive N* |"]
        lines.append("|---|---|---|---|---|---|---|---|")
        for name, n in report["naive"].items():
            lines.append(
                f"| {name} | {n['rows']} | {n['prompt_tokens']} | {n['decode_steps']} | {n['llm_turn_ms']:.1f} | "
                f"{n['encoder_ms']:.1f} | {n['turn_ms']:.1f} | {n['naive_n_star']} |"
            )
    md = out.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n" + _hand_written(md))
    _plot(report, out.with_suffix(".png"))


def _hand_written(md: Path) -> str:
    """The sections of an existing report from its first "## ... (written by hand ..." heading on, kept when the
    report is written again (a re-run or ``--combine`` over the same path); empty when there are none."""
    if not md.exists():
        return ""
    text = md.read_text()
    match = re.search(r"^## [^\n]*\(written by hand", text, flags=re.MULTILINE)
    return "\n" + text[match.start() :] if match else ""


def _plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not available: no plot (the JSON has the data)")
        return
    names = list(report["settings"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for sched, style in (("iteration", "-o"), ("static", "--s")):
            trials = sorted(
                (r for r in report["settings"][name]["sweeps"][sched]["trials"] if r.get("p99_s") is not None),
                key=lambda r: r["streams"],
            )
            if not trials:
                continue
            xs = [r["streams"] for r in trials]
            for key, color in (("p50_s", "tab:green"), ("p95_s", "tab:orange"), ("p99_s", "tab:red")):
                ys = [min(r[key], 5.0) for r in trials]
                ax.plot(xs, ys, style, color=color, label=f"{sched} {key[:-2]}")
        ax.axhline(P95_LIMIT_S, color="tab:orange", lw=0.5)
        ax.axhline(P99_LIMIT_S, color="tab:red", lw=0.5)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("chunk latency (s, capped at 5)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/benchmarks/gpu_streams", help="path without suffix")
    parser.add_argument("--settings", default="greedy_m1,greedy_m2,beam4_m2")
    parser.add_argument("--seconds", type=float, default=60.0, help="audio per stream in each trial")
    parser.add_argument("--start", default="greedy_m1=96,greedy_m2=96,beam4_m2=48", help="first N per setting")
    parser.add_argument("--static-start", default="", help="first N of the static sweeps (default: N*/2)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all sweeps together")
    parser.add_argument("--time-limit", type=float, default=0.0, help="start no trial after this many seconds")
    parser.add_argument(
        "--static-share", type=float, default=0.3, help="part of a setting's budget for static (0: no static sweep)"
    )
    parser.add_argument("--max-batch", type=int, default=256, help="EngineConfig.max_batch_size (rows)")
    parser.add_argument("--max-prefill-tokens", type=int, default=8192)
    parser.add_argument("--batch-timeout", type=float, default=0.005)
    parser.add_argument("--layers", type=int, default=32, help="LLM layers (32 = Llama-3.1-8B)")
    parser.add_argument("--parts-batches", default="1,8,32,64,128,256")
    parser.add_argument("--skip-parts", action="store_true")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--confirm", type=int, default=0, help="repeat the trial at N* until it passed this many more times"
    )
    parser.add_argument(
        "--profile-host",
        action="store_true",
        help="run the first trial under cProfile and write <out>.host_profile_<setting>_<N>.txt (that trial is not "
        "counted: the same N runs again)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the harness, no figures")
    parser.add_argument("--merge", nargs="+", metavar="RUN_JSON", help="pool earlier runs' trials (no GPU needed)")
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="RUN_JSON[:SETTINGS]",
        help="one report from runs of different settings (no GPU needed); RUN.json:a,b takes only those settings "
        "of a run, RUN.json: none (its decode/prefill table only)",
    )
    return parser.parse_args(argv)


def _kv(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}


def merge_runs(paths: list[str], out: Path) -> None:
    """Pool the trials of several runs (same GPU, same options) into one bracket per setting, table and plot."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    gpus = {r["gpu"] for r in runs}
    if len(gpus) != 1:
        raise ValueError(f"runs from different GPUs cannot be pooled: {sorted(gpus)}")
    settings: dict = {}
    for run_index, run in enumerate(runs):
        for name, s in run["settings"].items():
            merged = settings.setdefault(name, {"sweeps": {"iteration": {"trials": []}, "static": {"trials": []}}})
            for sched in ("iteration", "static"):
                for trial in s["sweeps"][sched]["trials"]:
                    merged["sweeps"][sched]["trials"].append({**trial, "run": run_index})
            merged["naive_n_star"] = sorted({r["settings"][name]["naive_n_star"] for r in runs})
    for merged in settings.values():
        for sched in ("iteration", "static"):
            trials = merged["sweeps"][sched]["trials"]
            passed = [t["streams"] for t in trials if t["passes"]]
            failed = [
                t["streams"]
                for t in trials
                if not t["passes"] and t.get("reason") != "memory" and not t.get("profiled")
            ]
            merged[sched] = {
                "largest_pass": max(passed, default=0),
                "smallest_fail": min(failed, default=None),
                "passes_above_a_fail": sorted(n for n in passed if failed and n > min(failed)),
            }
    report = {"runs": [{"command": r["command"], "elapsed_s": r["elapsed_s"]} for r in runs], "gpu": gpus.pop()}
    report["settings"] = settings
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# All trials of {len(runs)} runs on one {report['gpu']} (one session)",
        "",
        *[f"- run {i}: `{r['command']}`" for i, r in enumerate(report["runs"])],
        "",
        "| setting | scheduling | largest N passed | smallest N failed | passes above a fail (noise) | naive N* |",
        "|---|---|---|---|---|---|",
    ]
    for name, merged in settings.items():
        for sched in ("iteration", "static"):
            m = merged[sched]
            lines.append(
                f"| {name} | {sched} | {m['largest_pass']} | {m['smallest_fail'] or '-'} | "
                f"{m['passes_above_a_fail'] or '-'} | {merged['naive_n_star']} |"
            )
    lines += [
        "",
        "| setting | scheduling | run | N | p50 | p95 | p99 | busy | pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, merged in settings.items():
        for sched in ("iteration", "static"):
            for t in sorted(merged["sweeps"][sched]["trials"], key=lambda t: t["streams"]):
                lines.append(
                    f"| {name} | {sched} | {t['run']} | {t['streams']} | {_f(t.get('p50_s'))} | {_f(t.get('p95_s'))} | "
                    f"{_f(t.get('p99_s'))} | {t.get('busy_fraction', 0):.2f} | "
                    f"{'yes' if t['passes'] else 'no' + (' (stopped early)' if t.get('aborted') else '')} |"
                )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(report, out.with_suffix(".png"))


def combine_runs(paths: list[str], out: Path) -> None:
    """One report from runs that each measured other settings (same GPU, same code): every setting keeps the N*,
    baselines and trials of the run that measured it; the decode/prefill table comes from the run with the most
    batch sizes. ``--combine`` is for one headline measured in several calls (each within a device time limit).

    A path may end in ``:SETTING[,SETTING...]`` to take only those settings of that run (for a setting that another
    run measured again), or in a bare ``:`` to take none (a run given for its decode/prefill table); the report's
    ``combined_from`` names what was taken from each."""
    runs, taken = [], []
    for path in paths:
        file, colon, names = path.rpartition(":") if ":" in path else (path, "", "")
        run = json.loads(Path(file).read_text())
        wanted = [n for n in names.split(",") if n] if colon else list(run["settings"])
        missing = [n for n in wanted if n not in run["settings"]]
        if missing:
            raise ValueError(f"{file} did not measure {', '.join(missing)}")
        runs.append(run)
        taken.append(wanted)
    if len({r["gpu"] for r in runs}) != 1:
        raise ValueError("runs from different GPUs cannot be combined")
    report = json.loads(json.dumps(runs[0]))
    report["command"] = " ; ".join(r["command"] for r in runs)
    report["combined_from"] = [{"command": r["command"], "settings": names} for r, names in zip(runs, taken)]
    report["elapsed_s"] = sum(r["elapsed_s"] for r in runs)
    settings, naive, speech, reserved = {}, {}, {}, {}
    for r, names in zip(runs, taken):
        for name in names:
            if name in settings:
                raise ValueError(f"setting {name} was measured by more than one run")
            settings[name] = r["settings"][name]
            for pooled, source in ((naive, r.get("naive") or {}), (reserved, r["memory"]["reserved_bytes_per_stream"])):
                if name in source:
                    pooled[name] = source[name]
        speech.update(r["memory"]["speech_cache_bytes"])
    order = list(SETTINGS)
    report["settings"] = {name: settings[name] for name in sorted(settings, key=order.index)}
    report["naive"] = {name: naive[name] for name in report["settings"] if name in naive}
    report["memory"]["speech_cache_bytes"], report["memory"]["reserved_bytes_per_stream"] = speech, reserved
    with_parts = [r for r in runs if r.get("parts")]
    if with_parts:
        report["parts"] = max(with_parts, key=lambda r: len(r["parts"]["decode"]))["parts"]
    m1 = [r for r, names in zip(runs, taken) if "greedy_m1" in names]
    report["memory_limit_streams"] = (m1 or runs)[0]["memory_limit_streams"]
    write_report(report, out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.merge:
        merge_runs(args.merge, Path(args.out))
        return
    if args.combine:
        combine_runs(args.combine, Path(args.out))
        return
    t_start = time.perf_counter()
    if args.smoke:  # the harness end to end on CPU with a tiny model and the torch attention
        device, dtype, backend, model_cfg = "cpu", torch.float32, "torch", smoke_model_config()
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_streams.py needs a CUDA GPU (or --smoke for a CPU run of the harness)")
        device, dtype, backend, model_cfg = "cuda", torch.bfloat16, "flashinfer", paper_model_config(args.layers)
    model = build_dummy_model(model_cfg, device, dtype, seed=args.seed)
    tokenizer = synthetic_llama3_tokenizer()
    bench = Bench(model, tokenizer, model_cfg, args, device=device, dtype=str(dtype).split(".")[1])
    bench.attention_backend = backend
    _trials_log(bench).unlink(missing_ok=True)  # this run's trials only
    info = gpu_info(device)
    print(
        f"{info['gpu']}: model built in {time.perf_counter() - t_start:.0f} s, weights "
        f"{weights_bytes(model) / 2**30:.1f} GiB, S={bench.system_len}",
        flush=True,
    )

    settings = [SETTINGS[name] for name in args.settings.split(",")]
    encoder = {m: measure_encoder(bench, [1, 32, 128], m) for m in sorted({s.m for s in settings})}
    bench.speech_cache_bytes = {m: e["steady_state_cache_bytes"] for m, e in encoder.items()}
    parts = None
    if not args.skip_parts:
        parts = measure_parts(bench, [int(b) for b in args.parts_batches.split(",")], context=1040)
    naive = None
    if not args.skip_naive:
        naive = measure_naive(bench, {m: e["times"][0]["ms"] for m, e in encoder.items()}, context=1000)
    print(f"parts done at {time.perf_counter() - t_start:.0f} s", flush=True)

    if args.time_limit:
        bench.deadline = t_start + args.time_limit
    starts, static_starts = _kv(args.start), _kv(args.static_start)
    per_setting = args.budget / len(settings)
    results = {}
    for i, setting in enumerate(settings):
        seed = args.seed + 1000 * i
        budget = per_setting * (1 - args.static_share)
        it = sweep(bench, setting, "iteration", starts.get(setting.name, 64), budget, seed, args.confirm)
        st_start = static_starts.get(setting.name, max(1, (it["n_star"] or 0) // 2))
        st = {"n_star": None, "first_fail": None, "trials": []}
        if args.static_share > 0:
            st = sweep(bench, setting, "static", st_start, per_setting * args.static_share, seed + 500)
        at_star = next((r for r in it["trials"] if r["streams"] == it["n_star"] and r["passes"]), None)
        pages, stream_bytes = bench.stream_bytes(setting)
        results[setting.name] = {
            "m": setting.m,
            "beam": setting.beam,
            "n_star": it["n_star"],
            "n_star_first_fail": it["first_fail"],
            "n_star_confirmed": it.get("confirmed", False),
            "static_n_star": st["n_star"],
            "naive_n_star": naive[setting.name]["naive_n_star"] if naive else None,
            "p95_chunk_latency_s": round(at_star["p95_s"], 4) if at_star else None,
            "p99_chunk_latency_s": round(at_star["p99_s"], 4) if at_star else None,
            "memory_limit_streams": bench.memory_limit(setting),
            "reserved_pages_per_stream": pages,
            "sweeps": {"iteration": it, "static": st},
        }
    greedy_trials = [r for r in results.get("greedy_m1", {}).get("sweeps", {}).get("iteration", {}).get("trials", [])]
    kv_measured = max((r.get("kv_bytes_per_stream_peak", 0) for r in greedy_trials if r.get("complete")), default=0)
    total = total_memory(device)
    free_for_caches = total - weights_bytes(model) - HEADROOM_BYTES
    steady = kv_measured + bench.speech_cache_bytes.get(1, 0)
    report = {
        "command": "python benchmarks/gpu_streams.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": info,
        "gpu": info["gpu"],
        "options": vars(args),
        "system_prompt_tokens": bench.system_len,
        "memory_limit_streams": bench.memory_limit(SETTINGS["greedy_m1"]),
        "settings": results,
        "parts": parts,
        "encoder": encoder,
        "naive": naive,
        "memory": {
            "gpu_total_bytes": total,
            "weights_bytes": weights_bytes(model),
            "page_bytes": bench.page_bytes,
            "headroom_bytes": HEADROOM_BYTES,
            "speech_cache_bytes": bench.speech_cache_bytes,
            "kv_bytes_per_stream_measured": kv_measured,
            "memory_limit_streams_measured": int(free_for_caches // steady) if kv_measured else None,
            "reserved_bytes_per_stream": {s.name: bench.stream_bytes(s)[1] for s in settings},
            "max_memory_allocated_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        },
        "elapsed_s": time.perf_counter() - t_start,
    }
    write_report(report, Path(args.out))
    print(f"done in {report['elapsed_s']:.0f} s")
    for name, s in results.items():
        print(
            f"{name}: N*={s['n_star']} (first fail {s['n_star_first_fail']}), static {s['static_n_star']}, "
            f"naive {s['naive_n_star']}, p95 {s['p95_chunk_latency_s']}, memory limit {s['memory_limit_streams']}"
        )


if __name__ == "__main__":
    main()
