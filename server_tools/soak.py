"""Soak test of a running server: real-time speakers with real audio plus perf_analyzer, for a chosen duration.

    python -m server_tools.soak --duration 60 [--url localhost:8001] [--metrics-url http://localhost:8002/metrics]
        [--speakers 21] [--perf-rate 6] [--json build/soak.json]

In order:
1. references: each talk (bundled speech samples joined into talks of a few files) is streamed alone; its
   text is what the same talk must produce under load (the wire contract: a stream's text does not depend on
   the other streams);
2. warm-up (``--warmup``, by default as long as the load): the load below, then a drain, so that the baseline
   includes the memory that this load needs (the allocator keeps its high-water mark: a fresh server's RSS
   grows during its first minute of heavy load whether or not anything leaks, then stays level);
3. baseline: KV pages and streams from the model's metrics, Triton's request counters, and the resident memory
   (RSS) and threads of the server's processes (tritonserver and its Python stubs, found from --server-pid or
   the gRPC port);
4. load for --duration seconds: --speakers concurrent streams, each sending a talk in pieces of
   --piece-seconds at speech pace and starting its next talk once the translation is complete (so the server
   stays saturated without an unbounded backlog), plus perf_analyzer in request-rate mode (--perf-rate
   requests/s of 0.96 s pieces) on sequences of the same audio. The defaults (21 speakers + 6 requests/s on 8
   sequences, ~27 real-time streams) are about twice the CPU demo's server-level real-time capacity (~13
   streams at m=1 on the 2-core CI machine; docs/reliability.md);
5. drain: wait until the model holds no stream and no pending chunk, then take the same figures again.

It prints (and with --json writes) requests, errors by code, latency percentiles, RSS, threads and KV pages
before and after. Exit status 1 when anything failed: an error other than an UNAVAILABLE refusal of a new
stream, a request without exactly one FINAL, a text that differs from its reference, perf_analyzer failing,
KV pages or streams not back to the baseline, or RSS grown by more than --max-rss-growth-mb.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from client import perf_data, perf_report
from client.api import SAMPLE_RATE, StreamingClient
from client.audio import load_audio, sample_file, split_pieces
from client.stats import percentiles
from server_tools.metrics import model_metric
from server_tools.processes import find_server_pid, process_tree

# Bundled speech (pytest-audioeval), joined three by three into talks of ~6-11 s, with a target language each.
SPEECH = [
    "en/quick_brown_fox.wav", "en/counting.wav", "en/hello_world.wav",
    "es/conteo.wav", "es/pangrama.wav", "es/hola_mundo.wav",
    "fr/bonjour_monde.wav", "fr/comptage.wav", "fr/pangrama.wav",
    "it/conteggio.wav", "it/pangrama.wav", "it/ciao_mondo.wav",
    "pt/ola_mundo.wav", "pt/contagem.wav", "pt/pangrama.wav",
    "pl/liczenie.wav", "pl/pangrama.wav", "pl/witaj_swiecie.wav",
    "zh/jishu.wav", "zh/nihao_shijie.wav", "zh/pangrama.wav",
    "hi/ginti.wav", "hi/pangrama.wav", "hi/namaste_duniya.wav",
]  # fmt: skip
LANGUAGES = ["de", "zh", "es", "German", "fr", "de", "ja", "it"]
REFUSAL = "UNAVAILABLE"  # the documented answer to a new stream when the instance is full


@dataclass(frozen=True, slots=True)
class Talk:
    """One speaker's audio: a stream from START to END."""

    name: str
    samples: np.ndarray  # 16 kHz mono float32
    language: str | None

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def default_talks(files_per_talk: int = 3) -> list[Talk]:
    """The bundled speech samples joined into talks (the demo model translates any audio)."""
    talks = []
    for i in range(0, len(SPEECH), files_per_talk):
        names = SPEECH[i : i + files_per_talk]
        samples = np.concatenate([load_audio(sample_file(n)) for n in names])
        talks.append(Talk("+".join(n.split("/")[-1].removesuffix(".wav") for n in names), samples, LANGUAGES[i % 8]))
    return talks


def talks_from_files(files: list[Path]) -> list[Talk]:
    return [Talk(f.name, load_audio(f), LANGUAGES[i % len(LANGUAGES)]) for i, f in enumerate(files)]


# ---------------------------------------------------------------------------------------------- load client


@dataclass(slots=True)
class StreamOutcome:
    """One talk as one stream under load."""

    talk: int
    sequence_id: int
    refused: bool  # the START was answered UNAVAILABLE (capacity): nothing else was sent
    requests: int
    errors: list[str]  # "CODE: message" of every error response
    finals_ok: bool  # every request got exactly one FINAL
    text_ok: bool | None  # equals the talk's reference (None: not checked)
    first_response_s: float | None
    chunk_latencies: list[float]
    request_latencies: list[float]  # send -> FINAL, every request
    audio_seconds: float = 0.0  # audio the server translated for it


def stream_talk(client: StreamingClient, talk: Talk, piece_seconds: float, realtime: bool, timeout: float):
    """Send one talk as one stream and wait for its translation; returns (StreamResult or None if refused)."""
    stream = client.open_stream(language=talk.language)
    pieces = split_pieces(talk.samples, max(1, int(round(piece_seconds * SAMPLE_RATE))))
    t0 = time.monotonic()
    stream.send(pieces[0], end=len(pieces) == 1)
    # The START must be admitted before the rest is sent: a refused stream does not exist on the server.
    first = stream.wait_request(0, timeout=timeout)
    if first.error is not None and first.error.code == REFUSAL and len(pieces) > 1:
        return stream, None
    for i, piece in enumerate(pieces[1:], start=1):
        if realtime:  # piece i leaves when its last sample would have been spoken
            time.sleep(max(0.0, t0 + i * piece_seconds - time.monotonic()))
        stream.send(piece, end=i == len(pieces) - 1)
    return stream, stream.result(timeout=timeout)


class LoadClient:
    """``speakers`` concurrent streams of real audio until a deadline; each speaker streams talks back to back.

    A speaker starts its next talk when the previous translation is complete; a refused START (UNAVAILABLE)
    is retried with a new stream after ``backoff_s``.
    """

    def __init__(
        self,
        url: str,
        model: str,
        talks: list[Talk],
        references: list[str] | None,
        speakers: int,
        piece_seconds: float,
        timeout: float,
        backoff_s: float = 1.0,
    ):
        self.url, self.model, self.talks, self.references = url, model, talks, references
        self.speakers, self.piece_seconds, self.timeout, self.backoff_s = speakers, piece_seconds, timeout, backoff_s
        self.outcomes: list[StreamOutcome] = []
        self._lock = threading.Lock()

    def run(self, seconds: float) -> list[StreamOutcome]:
        self.outcomes = []
        deadline = time.monotonic() + seconds
        with StreamingClient(self.url, self.model) as client:
            threads = [
                threading.Thread(target=self._speak, args=(client, i, deadline), name=f"soak-speaker-{i}", daemon=True)
                for i in range(self.speakers)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return self.outcomes

    def _speak(self, client: StreamingClient, index: int, deadline: float) -> None:
        # Speakers start staggered over one chunk period so that their chunks do not all complete at once.
        time.sleep(index * 0.96 / max(1, self.speakers))
        k = 0
        while time.monotonic() < deadline:
            talk = (index + k * self.speakers) % len(self.talks)
            k += 1
            try:
                outcome = self._one_talk(client, talk)
            except Exception as e:  # a timeout or a broken connection is a failure to report, not to hide
                outcome = StreamOutcome(
                    talk, 0, False, 0, [f"CLIENT: {type(e).__name__}: {e}"], False, None, None, [], []
                )
            with self._lock:
                self.outcomes.append(outcome)
            if outcome.refused:
                time.sleep(self.backoff_s)

    def _one_talk(self, client: StreamingClient, talk_index: int) -> StreamOutcome:
        talk = self.talks[talk_index]
        stream, result = stream_talk(client, talk, self.piece_seconds, True, self.timeout)
        if result is None:
            record = stream.wait_request(0)
            message = record.error.message
            return StreamOutcome(
                talk_index, stream.sequence_id, True, 1, [message], record.finals == 1, None, None, [], []
            )
        reference = None if self.references is None else self.references[talk_index]
        return StreamOutcome(
            talk=talk_index,
            sequence_id=stream.sequence_id,
            refused=False,
            requests=len(result.requests),
            errors=[e.message for e in result.errors],
            finals_ok=all(r.finals == 1 for r in result.requests),
            text_ok=None if reference is None or result.errors else result.text == reference,
            first_response_s=result.first_response_s,
            chunk_latencies=result.chunk_latencies(),
            request_latencies=[r.done - r.sent for r in result.requests if r.done is not None],
            audio_seconds=talk.seconds,
        )


def reference_texts(url: str, model: str, talks: list[Talk], timeout: float) -> list[str]:
    """Each talk streamed alone, as fast as the server answers: the text it must also produce under load."""
    texts = []
    with StreamingClient(url, model) as client:
        for talk in talks:
            _, result = stream_talk(client, talk, 1.0, False, timeout)
            if result is None or result.errors:
                problem = "refused" if result is None else result.errors[0].message
                raise RuntimeError(f"reference stream of talk {talk.name} failed: {problem}")
            texts.append(result.text)
    return texts


# ---------------------------------------------------------------------------------------------- perf_analyzer


def perf_analyzer_binary() -> str:
    local = Path(sys.prefix) / "bin" / "perf_analyzer"  # the wrapper scripts/setup.sh writes
    found = str(local) if local.exists() else shutil.which("perf_analyzer")
    if found is None:
        raise FileNotFoundError("perf_analyzer not found: run `make setup`, or pass --perf-rate 0")
    return found


class PerfRun:
    """perf_analyzer in request-rate mode on sequences of the talks' audio, in the background."""

    def __init__(
        self, url: str, model: str, talks: list[Talk], rate: float, sequences: int, seconds: float, work: Path
    ):
        work = Path(tempfile.mkdtemp(prefix="perf-", dir=work))  # perf_analyzer will not overwrite its files
        data = {"data": [perf_data.audio_steps(t.samples, 15_360) for t in talks]}
        steps = work / "perf_steps.json"
        steps.write_text(json.dumps(data))
        self.profile = work / "perf_profile.json"
        self.log = work / "perf_analyzer.log"
        length = min(len(s) for s in data["data"])
        self.command = [
            perf_analyzer_binary(), "-m", model, "-u", url, "-i", "grpc", "--streaming",
            "--input-data", str(steps), "--sequence-length", str(length), "--sequence-length-variation", "0",
            "--request-rate-range", f"{rate:g}", "--num-of-sequences", str(sequences), "--serial-sequences",
            "--request-count", str(max(1, int(rate * seconds))), "--profile-export-file", str(self.profile),
        ]  # fmt: skip
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)

    def finish(self, timeout: float) -> dict:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            code = None
        output = self.log.read_text(errors="replace")
        summary = perf_report.summarize(json.loads(self.profile.read_text())) if self.profile.exists() else []
        row = summary[0] if summary else {}
        failed = code != 0 or "error" in output.lower() or "failed" in output.lower()
        return {
            "exit_code": code,
            "ok": not failed and bool(row) and row.get("requests_without_response", 1) == 0,
            "requests": row.get("requests", 0),
            "requests_without_response": row.get("requests_without_response"),
            "requests_per_s": row.get("requests_per_s"),
            "audio_seconds_per_s": row.get("audio_seconds_per_s"),
            "first_response_s": row.get("first_response"),
            "last_response_s": row.get("last_response"),
            "log_tail": output[-1500:] if failed else "",
        }


# ---------------------------------------------------------------------------------------------- server figures


@dataclass(slots=True)
class Snapshot:
    """The server's figures at one moment."""

    kv_pages_used: float
    kv_pages_free: float
    active_streams: float
    pending_chunks: float
    triton_success: float
    triton_failure: float
    rss_mb: float | None
    threads: int | None
    processes: list[dict] = field(default_factory=list)


def snapshot(metrics_url: str, model: str, pid: int | None) -> Snapshot:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    tree = process_tree(pid) if pid is not None else []
    return Snapshot(
        kv_pages_used=model_metric(text, "infinisst_kv_pages_used", model),
        kv_pages_free=model_metric(text, "infinisst_kv_pages_free", model),
        active_streams=model_metric(text, "infinisst_active_streams", model),
        pending_chunks=model_metric(text, "infinisst_pending_chunks", model),
        triton_success=model_metric(text, "nv_inference_request_success", model),
        triton_failure=model_metric(text, "nv_inference_request_failure", model),
        rss_mb=sum(p["rss_mb"] for p in tree) if tree else None,
        threads=sum(p["threads"] for p in tree) if tree else None,
        processes=tree,
    )


def drain(metrics_url: str, model: str, pid: int | None, timeout: float, settle_s: float = 2.5) -> Snapshot:
    """Wait until the model holds no stream and no pending chunk (metrics refresh about once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = snapshot(metrics_url, model, pid)
        if (snap.active_streams == 0 and snap.pending_chunks == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    time.sleep(settle_s)  # let the metrics thread publish the freed pages, and freed memory settle
    return snapshot(metrics_url, model, pid)


# ---------------------------------------------------------------------------------------------- the soak


def summarize(outcomes: list[StreamOutcome]) -> dict:
    """Counts, errors by code and latency percentiles of the load client."""
    codes: Counter[str] = Counter()
    failures = []
    for o in outcomes:
        for message in o.errors:
            code = message.partition(": ")[0] if ": " in message else "TRITON"
            codes[code] += 1
            if not (o.refused and code == REFUSAL):
                failures.append(f"talk {o.talk} seq {o.sequence_id}: {message}")
        if not o.finals_ok:
            failures.append(f"talk {o.talk} seq {o.sequence_id}: a request did not get exactly one FINAL")
        if o.text_ok is False:
            failures.append(f"talk {o.talk} seq {o.sequence_id}: text differs from the talk's reference")
    served = [o for o in outcomes if not o.refused]
    return {
        "streams": len(outcomes),
        "streams_served": len(served),
        "streams_refused": sum(o.refused for o in outcomes),
        "requests": sum(o.requests for o in outcomes),
        "audio_seconds": sum(o.audio_seconds for o in served),
        "errors_by_code": dict(codes),
        "texts_checked": sum(o.text_ok is not None for o in served),
        "texts_equal": sum(o.text_ok is True for o in served),
        "failures": failures,
        "first_response_s": percentiles([o.first_response_s for o in served if o.first_response_s]),
        "chunk_latency_s": percentiles([x for o in served for x in o.chunk_latencies]),
        "request_latency_s": percentiles([x for o in served for x in o.request_latencies]),
    }


@dataclass(slots=True)
class SoakConfig:
    url: str
    metrics_url: str
    model: str
    duration: float
    speakers: int
    piece_seconds: float
    perf_rate: float
    perf_sequences: int
    warmup: float
    server_pid: int | None
    max_rss_growth_mb: float
    check_text: bool
    timeout: float


def run_soak(cfg: SoakConfig, talks: list[Talk], log=print) -> dict:
    """The whole soak (see the module docstring); returns the report as a dict (``report["ok"]``)."""
    pid = cfg.server_pid or find_server_pid(int(cfg.url.rsplit(":", 1)[1]))
    offered = cfg.speakers + cfg.perf_rate * 0.96
    log(f"soak: {cfg.duration:g} s, {cfg.speakers} real-time speakers + perf_analyzer {cfg.perf_rate:g} req/s "
        f"(~{offered:.1f} real-time streams offered), {len(talks)} talks, server pid {pid}")  # fmt: skip
    references = reference_texts(cfg.url, cfg.model, talks, cfg.timeout) if cfg.check_text else None
    load = LoadClient(cfg.url, cfg.model, talks, references, cfg.speakers, cfg.piece_seconds, cfg.timeout)
    with tempfile.TemporaryDirectory(prefix="soak-") as work:
        if cfg.warmup > 0:
            log(f"warm-up: {cfg.warmup:g} s")
            _load_phase(cfg, talks, load, cfg.warmup, Path(work))
            drain(cfg.metrics_url, cfg.model, pid, cfg.timeout, settle_s=0.0)
        before = drain(cfg.metrics_url, cfg.model, pid, cfg.timeout)
        log(f"baseline: {_figures(before)}")
        started = time.monotonic()
        outcomes, perf = _load_phase(cfg, talks, load, cfg.duration, Path(work))
        loaded_s = time.monotonic() - started
        after = drain(cfg.metrics_url, cfg.model, pid, cfg.timeout)
        log(f"after:    {_figures(after)}")
    client = summarize(outcomes)
    checks = {
        "client_failures": not client["failures"],
        "perf_analyzer": perf is None or perf["ok"],
        "kv_pages_back": after.kv_pages_used == before.kv_pages_used,
        "streams_back": after.active_streams == 0 and after.pending_chunks == 0,
        "rss": before.rss_mb is None or after.rss_mb - before.rss_mb <= cfg.max_rss_growth_mb,
    }
    return {
        "ok": all(checks.values()),
        "checks": checks,
        "config": asdict(cfg),
        "offered_realtime_streams": offered,
        "load_seconds": loaded_s,
        # audio translated per second of load, in real-time streams (the server's throughput while saturated)
        "served_realtime_streams": client["audio_seconds"] / loaded_s + ((perf or {}).get("audio_seconds_per_s") or 0),
        "client": client,
        "perf_analyzer": perf,
        "before": asdict(before),
        "after": asdict(after),
    }


def _load_phase(cfg: SoakConfig, talks: list[Talk], load: LoadClient, seconds: float, work: Path):
    perf = None
    if cfg.perf_rate > 0:
        perf = PerfRun(cfg.url, cfg.model, talks, cfg.perf_rate, cfg.perf_sequences, seconds, work)
        perf.start()
    outcomes = load.run(seconds)
    return outcomes, None if perf is None else perf.finish(cfg.timeout)


def _figures(s: Snapshot) -> str:
    rss = "-" if s.rss_mb is None else f"{s.rss_mb:.0f} MB"
    return (
        f"kv pages used {s.kv_pages_used:.0f} (free {s.kv_pages_free:.0f}), streams {s.active_streams:.0f}, "
        f"pending chunks {s.pending_chunks:.0f}, RSS {rss}, threads {s.threads}, "
        f"Triton requests ok {s.triton_success:.0f} / failed {s.triton_failure:.0f}"
    )


def format_report(report: dict) -> str:
    def p(summary: dict) -> str:
        if not summary or not summary.get("n", summary.get("p50")):
            return "-"
        keys = [k for k in ("p50", "p90", "p95", "p99", "max") if summary.get(k) is not None]
        return "  ".join(f"{k}={summary[k] * 1000:.0f} ms" for k in keys)

    c, before, after = report["client"], report["before"], report["after"]
    lines = [
        "",
        f"== soak: {'PASS' if report['ok'] else 'FAIL'} ({report['load_seconds']:.0f} s under load, "
        f"~{report['offered_realtime_streams']:.1f} real-time streams offered, "
        f"{report['served_realtime_streams']:.1f} served)",
        f"load client: {c['streams']} streams ({c['streams_served']} served, {c['streams_refused']} refused), "
        f"{c['requests']} requests, texts equal to reference {c['texts_equal']}/{c['texts_checked']}",
        f"errors by code: {c['errors_by_code'] or 'none'}",
        f"first response   {p(c['first_response_s'])}",
        f"chunk latency    {p(c['chunk_latency_s'])}",
        f"request latency  {p(c['request_latency_s'])}",
    ]
    perf = report["perf_analyzer"]
    if perf is not None:
        lines += [
            f"perf_analyzer: exit {perf['exit_code']}, {perf['requests']} requests "
            f"({perf['requests_per_s'] or 0:.1f}/s), {perf['requests_without_response']} without response",
            f"  first response {p(perf['first_response_s'])}",
            f"  last response  {p(perf['last_response_s'])}",
        ]
        if perf["log_tail"]:
            lines.append(perf["log_tail"])
    rss = "-" if before["rss_mb"] is None else f"{before['rss_mb']:.0f} -> {after['rss_mb']:.0f} MB"
    lines += [
        f"server RSS {rss}, threads {before['threads']} -> {after['threads']}",
        f"KV pages used {before['kv_pages_used']:.0f} -> {after['kv_pages_used']:.0f}, "
        f"streams {after['active_streams']:.0f}, pending chunks {after['pending_chunks']:.0f}",
        f"Triton requests ok +{after['triton_success'] - before['triton_success']:.0f}, "
        f"failed +{after['triton_failure'] - before['triton_failure']:.0f}",
        "checks: " + ", ".join(f"{k}={'ok' if v else 'FAILED'}" for k, v in report["checks"].items()),
    ]
    lines += [f"  {f}" for f in c["failures"][:20]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server_tools.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds under load (default %(default)s)")
    parser.add_argument("--url", default="localhost:8001", help="Triton gRPC address (default %(default)s)")
    parser.add_argument("--metrics-url", default=None, help="metrics endpoint (default http://HOST:8002/metrics)")
    parser.add_argument("--model", default="infinisst", help="model name (default %(default)s)")
    parser.add_argument("--speakers", type=int, default=21, help="concurrent real-time streams (default %(default)s)")
    parser.add_argument("--piece-seconds", type=float, default=0.32, help="audio per request (default %(default)s)")
    parser.add_argument(
        "--perf-rate", type=float, default=6.0, help="perf_analyzer requests/s of 0.96 s (0: off; default %(default)s)"
    )
    parser.add_argument("--perf-sequences", type=int, default=8, help="perf_analyzer concurrent sequences")
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds of warm-up load (default: as long as --duration)"
    )
    parser.add_argument("--files", type=Path, nargs="*", default=None, help="audio files, one talk each")
    parser.add_argument("--server-pid", type=int, default=None, help="tritonserver pid (default: found locally)")
    parser.add_argument(
        "--max-rss-growth-mb", type=float, default=64.0, help="RSS growth allowed (default %(default)s)"
    )
    parser.add_argument("--no-text-check", dest="check_text", action="store_false", help="skip the references")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a stream or the drain")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.speakers < 0 or args.piece_seconds <= 0 or args.perf_rate < 0:
        parser.error("--duration and --piece-seconds must be > 0, --speakers and --perf-rate >= 0")
    if args.metrics_url is None:
        host = re.sub(r":\d+$", "", args.url)
        args.metrics_url = f"http://{host}:8002/metrics"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    talks = talks_from_files(args.files) if args.files else default_talks()
    cfg = SoakConfig(
        url=args.url,
        metrics_url=args.metrics_url,
        model=args.model,
        duration=args.duration,
        speakers=args.speakers,
        piece_seconds=args.piece_seconds,
        perf_rate=args.perf_rate,
        perf_sequences=args.perf_sequences,
        warmup=args.duration if args.warmup is None else args.warmup,
        server_pid=args.server_pid,
        max_rss_growth_mb=args.max_rss_growth_mb,
        check_text=args.check_text,
        timeout=args.timeout,
    )
    report = run_soak(cfg, talks, log=lambda line: print(line, flush=True))
    print(format_report(report), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
