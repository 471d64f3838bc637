"""Quality and latency under load: N concurrent real-time streams, scored the way IWSLT scores one.

    python -m client.evaluate --url HOST:PORT --source SRC.txt --target REF.txt --language LANG
        --latency-multiplier M --concurrency 1,8,32 --out DIR [--piece-seconds 0.32] [--seed 0]
    python -m client.evaluate ... --segments TALKS.yaml [--wav-dir DIR] --target REF.txt ...   (long-form)

Inputs follow SimulEval: ``SRC.txt`` lists audio files (one per line, relative to the list's folder or absolute),
``REF.txt`` their references (one per line). Any rate or channel count is read (resampled to 16 kHz mono, with a
note). Long-form: ``TALKS.yaml`` is a MuST-C segment YAML (``{duration, offset, speaker_id, wav}`` per segment,
seconds) and ``REF.txt`` has one reference per segment in YAML order; each talk (the segments of one ``wav``) is
one "file" played whole from 0 to the end of its last segment, and is scored with OmniSTEval's long-form path
(the talk's output resegmented against its segment references).

At each concurrency N (N = 1 always runs first: it is the baseline of the invariance check) the run has
``max(N, files)`` streams: stream j plays file ``j mod files`` from its first sample to its last, and is the
``j // files``-th repeat of that file. N slots play them: slot s plays streams s, s + N, s + 2N, ... one after the
other (the next one starts when the previous one's last sample has been spoken, plus a gap), and slot s starts at
a random jitter in [0, one chunk). So "offset" is a start-time offset, never an audio offset: every stream plays
its whole file, so its reference holds and its greedy output must equal the file's output at N = 1, while streams
replaying one file are at different places in it at any moment.

Sending is open loop: one timer thread sends every stream's piece i (``--piece-seconds`` of audio) when its last
sample is spoken, END with the last piece, whatever the server has answered; responses are received on the
client's reader thread. Writes ``DIR/N<N>/instances.log`` (SimulEval format, see :mod:`client.instances`) and
``DIR/scores.json`` (``{"runs": [...]}``, one entry per N). Beam search is the server's configuration
(``beam_size`` in config.pbtxt): the wire contract has no per-request decoding option, so there is no ``--beam``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import instances, metrics
from .api import SAMPLE_RATE, SAMPLES_PER_UNIT, AudioStream, StreamingClient, StreamResult
from .audio import load_audio, split_pieces

logger = logging.getLogger(__name__)
SOURCE_LANGUAGES = {"en", "english", "eng"}  # the speech is English: WER when the target is too
SLOT_GAP_S = 0.5  # silence between two streams of one slot


class EvaluationError(RuntimeError):
    """A problem with the inputs or the server, found before any stream starts."""


@dataclass(frozen=True, slots=True)
class PlannedStream:
    """One stream of a run: which file it plays, on which slot, from when (seconds after the run's start)."""

    index: int
    file_index: int
    repeat: int
    slot: int
    start_s: float
    duration_s: float


def plan_streams(durations_s: list[float], concurrency: int, chunk_s: float, seed: int = 0) -> list[PlannedStream]:
    """The streams of a run at ``concurrency`` over files of these durations (see the module docstring)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    rng = random.Random(seed * 1_000_003 + concurrency)
    next_start = [rng.uniform(0.0, chunk_s) for _ in range(concurrency)]
    out = []
    for j in range(max(concurrency, len(durations_s))):
        file_index, slot = j % len(durations_s), j % concurrency
        duration = durations_s[file_index]
        out.append(PlannedStream(j, file_index, j // len(durations_s), slot, next_start[slot], duration))
        next_start[slot] += duration + SLOT_GAP_S
    return out


def send_schedule(plans: list[PlannedStream], pieces: list[list[np.ndarray]], piece_s: float):
    """``(due_s, stream index, piece index, is_last)`` of every send of the run, in time order: piece i of a stream
    leaves when its last sample is spoken (the last piece, possibly shorter, when the file ends)."""

    def one(plan: PlannedStream):
        chunks = pieces[plan.file_index]
        for i in range(len(chunks)):
            due = plan.start_s + min((i + 1) * piece_s, plan.duration_s)
            yield (due, plan.index, i, i == len(chunks) - 1)

    return heapq.merge(*(one(p) for p in plans))


def read_inputs(source: Path, target: Path) -> tuple[list[Path], list[str]]:
    """The audio files of a SimulEval source list and the references, checked: every file exists, one reference
    per file, none empty."""
    for path in (source, target):
        if not path.is_file():
            raise EvaluationError(f"no such file: {path}")
    files = [Path(line.strip()) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    files = [f if f.is_absolute() else source.parent / f for f in files]
    references = [line.strip() for line in target.read_text(encoding="utf-8").splitlines()]
    while references and not references[-1]:
        references.pop()
    if not files:
        raise EvaluationError(f"{source} lists no audio file")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise EvaluationError(f"missing audio file(s) listed in {source}: {', '.join(missing)}")
    if len(references) != len(files):
        raise EvaluationError(f"{source} lists {len(files)} files but {target} has {len(references)} references")
    empty = [i + 1 for i, r in enumerate(references) if not r]
    if empty:
        raise EvaluationError(f"empty reference(s) in {target} at line(s) {empty}")
    return files, references


@dataclass(frozen=True, slots=True)
class Segment:
    """One segment of a talk (MuST-C YAML): where it is in the talk's audio (seconds) and its reference."""

    offset_s: float
    duration_s: float
    reference: str
    speaker_id: str | None = None


@dataclass(frozen=True, slots=True)
class Talk:
    """The segments sharing one ``wav``, sorted by offset: one long-form stream of the talk's audio."""

    wav: Path
    segments: tuple[Segment, ...]

    @property
    def end_s(self) -> float:
        """Where the talk's stream ends: the end of its last segment."""
        return max(s.offset_s + s.duration_s for s in self.segments)

    @property
    def reference(self) -> str:
        return " ".join(s.reference for s in self.segments)

    def scoring_segments(self) -> list[tuple[float, float, str]]:
        """``(offset s, duration s, reference)`` per segment, as :func:`client.instances.omnisteval_scores` takes."""
        return [(s.offset_s, s.duration_s, s.reference) for s in self.segments]


def read_segments(segments: Path, target: Path, wav_dir: Path | None = None) -> list[Talk]:
    """The talks of a MuST-C segment YAML and its per-segment references (one line per segment, in YAML order),
    checked: a list of ``{duration, offset, wav}`` mappings, every talk's audio exists (relative to ``wav_dir`` or
    the YAML's folder), one non-empty reference per segment. Talks are in order of first appearance; segments
    sorted by offset."""
    import yaml

    for path in (segments, target):
        if not path.is_file():
            raise EvaluationError(f"no such file: {path}")
    try:
        entries = yaml.safe_load(segments.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise EvaluationError(f"{segments} is not valid YAML: {e}") from None
    if not isinstance(entries, list) or not entries:
        raise EvaluationError(f"{segments} must be a non-empty YAML list of {{duration, offset, wav}} segments")
    references = [line.strip() for line in target.read_text(encoding="utf-8").splitlines()]
    while references and not references[-1]:
        references.pop()
    if len(references) != len(entries):
        raise EvaluationError(f"{segments} has {len(entries)} segments but {target} has {len(references)} references")
    empty = [i + 1 for i, r in enumerate(references) if not r]
    if empty:
        raise EvaluationError(f"empty reference(s) in {target} at line(s) {empty}")
    folder = wav_dir if wav_dir is not None else segments.parent
    talks: dict[str, list[Segment]] = {}
    for i, (entry, reference) in enumerate(zip(entries, references)):
        where = f"{segments}: segment {i + 1}"
        if not isinstance(entry, dict) or not {"duration", "offset", "wav"} <= entry.keys():
            raise EvaluationError(f"{where} must be a mapping with duration, offset and wav, got {entry!r}")
        try:
            offset, duration = float(entry["offset"]), float(entry["duration"])
        except (TypeError, ValueError):
            raise EvaluationError(f"{where}: offset and duration must be numbers (seconds)") from None
        if not (offset >= 0 and duration > 0):
            raise EvaluationError(f"{where}: needs offset >= 0 and duration > 0, got {offset} and {duration}")
        speaker = entry.get("speaker_id")
        segment = Segment(offset, duration, reference, None if speaker is None else str(speaker))
        talks.setdefault(str(entry["wav"]), []).append(segment)
    out = []
    for wav, talk_segments in talks.items():
        path = Path(wav) if Path(wav).is_absolute() else folder / wav
        out.append(Talk(path, tuple(sorted(talk_segments, key=lambda s: s.offset_s))))
    missing = [str(t.wav) for t in out if not t.wav.is_file()]
    if missing:
        raise EvaluationError(f"missing audio file(s) named in {segments}: {', '.join(missing)}")
    return out


def load_talks(talks: list[Talk]) -> list[np.ndarray]:
    """Each talk's audio (16 kHz mono) from 0 to the end of its last segment."""
    out = []
    for talk, audio in zip(talks, load_sources([t.wav for t in talks])):
        end = round(talk.end_s * SAMPLE_RATE)
        if end > len(audio) + SAMPLE_RATE // 100:
            raise EvaluationError(f"{talk.wav} lasts {len(audio) / SAMPLE_RATE:.2f} s but a segment ends at "
                                  f"{talk.end_s:.2f} s")  # fmt: skip
        out.append(audio[:end])
    return out


def load_sources(files: list[Path]) -> list[np.ndarray]:
    """Each file as 16 kHz mono float32; files at another rate are resampled, with a note on stderr."""
    import soundfile as sf

    out = []
    for path in files:
        rate = sf.info(str(path)).samplerate
        if rate != SAMPLE_RATE:
            logger.warning("%s: %d Hz, resampled to %d Hz", path, rate, SAMPLE_RATE)
        out.append(load_audio(path))
    return out


def check_server(url: str, model: str, timeout_s: float = 10.0) -> None:
    """Fail with a clear message unless the server answers at ``url`` and ``model`` is ready."""
    import tritonclient.grpc as grpcclient

    try:
        client = grpcclient.InferenceServerClient(url)
        ready = client.is_model_ready(model, client_timeout=timeout_s)
    except Exception as e:
        raise EvaluationError(f"cannot reach the Triton server at {url}: {e}") from None
    if not ready:
        raise EvaluationError(f"the server at {url} answers, but model {model!r} is not ready")


@dataclass(slots=True)
class RunOptions:
    url: str
    model: str
    language: str | None
    latency_multiplier: int | None
    piece_s: float
    seed: int
    timeout_s: float
    progress: bool = True


def run_concurrency(
    options: RunOptions, concurrency: int, files: list[Path], audio: list[np.ndarray], references: list[str]
) -> tuple[list[dict], dict]:
    """Serve one run at ``concurrency``; returns its instances.log records and facts about the client's pacing."""
    chunk_s = SAMPLES_PER_UNIT * (options.latency_multiplier or 1) / SAMPLE_RATE
    plans = plan_streams([len(a) / SAMPLE_RATE for a in audio], concurrency, chunk_s, options.seed)
    piece_samples = max(1, round(options.piece_s * SAMPLE_RATE))
    pieces = [split_pieces(a, piece_samples) for a in audio]
    lateness: list[float] = []
    send_errors: dict[int, str] = {}
    with StreamingClient(options.url, options.model) as client:
        streams = [
            client.open_stream(language=options.language, latency_multiplier=options.latency_multiplier) for _ in plans
        ]
        t0 = time.monotonic() + 0.2

        def sender() -> None:
            for due, j, i, last in send_schedule(plans, pieces, options.piece_s):
                time.sleep(max(0.0, t0 + due - time.monotonic()))
                lateness.append(time.monotonic() - (t0 + due))
                if j in send_errors:
                    continue
                try:
                    streams[j].send(pieces[plans[j].file_index][i], end=last)
                except Exception as e:  # the connection is gone: the stream's result says so
                    send_errors[j] = f"send failed: {e}"

        thread = threading.Thread(target=sender, name="evaluate-sender", daemon=True)
        thread.start()
        results = _wait_all(streams, plans, t0, options, concurrency)
        thread.join()
    records = []
    for plan, result in zip(plans, results):
        speech_start = t0 + plan.start_s
        if isinstance(result, str):
            records.append(_failed_record(plan, files, references, result))
            continue
        extra = {"file_index": plan.file_index, "repeat": plan.repeat, "slot": plan.slot, "start_s": plan.start_s}
        record = instances.instance_record(
            plan.index, str(files[plan.file_index]), references[plan.file_index], result, speech_start, **extra
        )
        if plan.index in send_errors:
            record["errors"].append(send_errors[plan.index])
        records.append(record)
    pacing = {"send_lateness_p99_s": instances.percentile(lateness, 99), "send_lateness_max_s": max(lateness)}
    return records, pacing


def _wait_all(
    streams: list[AudioStream], plans: list[PlannedStream], t0: float, options: RunOptions, concurrency: int
) -> list[StreamResult | str]:
    from tqdm import tqdm

    results: list[StreamResult | str | None] = [None] * len(streams)
    bar = tqdm(total=len(streams), desc=f"N={concurrency}", unit="stream", disable=not options.progress)
    with bar:
        while any(r is None for r in results):
            now = time.monotonic()
            for j, (stream, plan) in enumerate(zip(streams, plans)):
                if results[j] is not None:
                    continue
                if stream.done():
                    results[j] = stream.result(timeout=0)
                    bar.update()
                elif now > t0 + plan.start_s + plan.duration_s + options.timeout_s:
                    results[j] = f"no end within {options.timeout_s} s after the audio ended"
                    bar.update()
            time.sleep(0.05)
    return results  # type: ignore[return-value]


def _failed_record(plan: PlannedStream, files: list[Path], references: list[str], error: str) -> dict:
    return {
        "index": plan.index,
        "prediction": "",
        "delays": [],
        "elapsed": [],
        "wall_clock": [],
        "source_length": plan.duration_s * 1000.0,
        "reference": references[plan.file_index],
        "source": [str(files[plan.file_index])],
        "text": "",
        "errors": [error],
        "chunk_latencies_s": [],
        "lag_drift": None,
        "file_index": plan.file_index,
        "repeat": plan.repeat,
        "slot": plan.slot,
        "start_s": plan.start_s,
    }


def score_run(
    log_path: Path,
    concurrency: int,
    language: str | None,
    baseline: list[dict] | None,
    talks: list[Talk] | None = None,
) -> dict:
    """The ``scores.json`` entry of one run, computed from its instances.log (and N = 1's, for invariance).

    Long-form (``talks``): BLEU, chrF and WER are of the talks' outputs resegmented against the segment
    references (OmniSTEval's SoftSegmenter), latency of the resegmented segments with OmniSTEval's long-form YAAL."""
    records = instances.read_instances(log_path)
    segments = None if talks is None else [t.scoring_segments() for t in talks]
    omni = instances.omnisteval_scores(log_path, segments)

    def hyps_refs(recs: list[dict]) -> tuple[list[str], list[str]]:
        if segments is None:
            return [r["prediction"] for r in recs], [r["reference"] for r in recs]
        resegmented = instances.resegment_longform(recs, segments)
        return [i.prediction for i in resegmented], [i.reference for i in resegmented]

    hyps, refs = hyps_refs(records)
    bleu, chrf = metrics.corpus_bleu_chrf(hyps, refs)
    chunk = [x for r in records for x in r["chunk_latencies_s"]]
    drifts = [r["lag_drift"] for r in records if r["lag_drift"] is not None]
    run = {
        "concurrency": concurrency,
        "streams": len(records),
        "bleu": bleu,
        "chrf": chrf,
        "longyaal_cu_ms": omni.get("long_yaal"),
        "longyaal_ca_ms": omni.get("ca_long_yaal"),
        "laal_cu_ms": omni.get("long_laal"),
        "laal_ca_ms": omni.get("ca_long_laal"),
        "al_cu_ms": omni.get("long_al"),
        "al_ca_ms": omni.get("ca_long_al"),
        "yaal_cu_ms": omni.get("yaal"),
        "yaal_ca_ms": omni.get("ca_yaal"),
        "longyaal_wall_ms": instances.omnisteval_scores(log_path, segments, "wall_clock").get("ca_long_yaal"),
        "omnisteval_bleu": omni.get("bleu"),
        "omnisteval_chrf": omni.get("chrf"),
        "chunk_latency_p50_s": instances.percentile(chunk, 50),
        "chunk_latency_p95_s": instances.percentile(chunk, 95),
        "chunk_latency_p99_s": instances.percentile(chunk, 99),
        "lag_drift_mean": float(np.mean(drifts)) if drifts else None,
        "lag_drift_max": max(drifts) if drifts else None,
        "errors": sum(len(r["errors"]) for r in records),
    }
    if language is not None and language.lower() in SOURCE_LANGUAGES:
        run["wer"] = metrics.corpus_wer(hyps, refs)
    if baseline is not None:
        by_file = {r["file_index"]: r for r in baseline}
        same = [r["text"] == by_file[r["file_index"]]["text"] for r in records]
        run["identical_to_n1"] = sum(same) / len(same)
        baseline_hyps, baseline_refs = hyps_refs([by_file[r["file_index"]] for r in records])
        run["bleu_delta_vs_n1"] = bleu - metrics.corpus_bleu_chrf(baseline_hyps, baseline_refs)[0]
    return run


def evaluate(
    options: RunOptions,
    source: Path | None,
    target: Path,
    concurrency: list[int],
    out: Path,
    segments: Path | None = None,
    wav_dir: Path | None = None,
) -> dict:
    """Every run, its instances.log and scores.json; returns the scores. Short-form from ``source`` (a list of
    audio files), or long-form from ``segments`` (a MuST-C YAML: one stream per talk)."""
    talks = None
    if segments is not None:
        talks = read_segments(segments, target, wav_dir)
        files, references = [t.wav for t in talks], [t.reference for t in talks]
        audio = load_talks(talks)
    elif source is not None:
        files, references = read_inputs(source, target)
        audio = load_sources(files)
    else:
        raise EvaluationError("give --source (short-form) or --segments (long-form)")
    check_server(options.url, options.model)
    levels = [1] + [n for n in dict.fromkeys(concurrency) if n != 1]
    runs, baseline = [], None
    for n in levels:
        records, pacing = run_concurrency(options, n, files, audio, references)
        log_path = out / f"N{n}" / "instances.log"
        instances.write_instances(log_path, records)
        if n == 1:
            baseline = records
        runs.append({**score_run(log_path, n, options.language, baseline, talks), **pacing})
    scores = {
        "runs": runs,
        "settings": {
            "url": options.url,
            "model": options.model,
            "language": options.language,
            "latency_multiplier": options.latency_multiplier,
            "piece_seconds": options.piece_s,
            "seed": options.seed,
            "files": len(files),
            "source": None if source is None else str(source),
            "target": str(target),
            "segments": None if segments is None else str(segments),
            "segment_count": None if talks is None else sum(len(t.segments) for t in talks),
        },
    }
    (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
    return scores


def parse_concurrency(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--concurrency takes integers separated by commas, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"--concurrency levels must be >= 1, got {text!r}")
    return levels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="localhost:8001", help="Triton gRPC address (default %(default)s)")
    parser.add_argument("--model", default="infinisst", help="model name (default %(default)s)")
    parser.add_argument("--source", type=Path, default=None, help="list of audio files, one per line (short-form)")
    parser.add_argument("--target", type=Path, required=True, help="references, one per line (file or segment)")
    parser.add_argument("--segments", type=Path, default=None, help="MuST-C segment YAML (long-form, whole talks)")
    parser.add_argument("--wav-dir", type=Path, default=None, help="folder of the YAML's wavs (default: its folder)")
    parser.add_argument("--language", default=None, help="target language (server default if unset)")
    parser.add_argument("--latency-multiplier", type=int, default=None, help="m in 1..4 (server default if unset)")
    parser.add_argument("--concurrency", type=parse_concurrency, default=[1], help="e.g. 1,8,32 (N=1 always runs)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--piece-seconds", type=float, default=0.32, help="audio per request (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the start jitter (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a stream after its audio")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.piece_seconds <= 0:
        parser.error("--piece-seconds must be > 0")
    if args.latency_multiplier is not None and not 1 <= args.latency_multiplier <= 4:
        parser.error("--latency-multiplier must be in 1..4")
    if (args.source is None) == (args.segments is None):
        parser.error("give exactly one of --source (audio list, short-form) and --segments (MuST-C YAML, long-form)")
    if args.wav_dir is not None and args.segments is None:
        parser.error("--wav-dir goes with --segments")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = RunOptions(
        url=args.url,
        model=args.model,
        language=args.language,
        latency_multiplier=args.latency_multiplier,
        piece_s=args.piece_seconds,
        seed=args.seed,
        timeout_s=args.timeout,
        progress=not args.no_progress,
    )
    try:
        scores = evaluate(options, args.source, args.target, args.concurrency, args.out, args.segments, args.wav_dir)
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for run in scores["runs"]:
        print(
            f"N={run['concurrency']:<4d} BLEU={run['bleu']:.2f} chrF={run['chrf']:.2f} "
            f"LongYAAL CU/CA={_ms(run['longyaal_cu_ms'])}/{_ms(run['longyaal_ca_ms'])} "
            f"chunk p95={_ms(run['chunk_latency_p95_s'], 1000)} identical={run['identical_to_n1']:.2f} "
            f"errors={run['errors']}"
        )
    print(f"wrote {args.out / 'scores.json'}")
    return 1 if any(run["errors"] for run in scores["runs"]) else 0


def _ms(value: float | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.0f} ms"


if __name__ == "__main__":
    sys.exit(main())
