"""SimulEval-format ``instances.log`` of streams served live, and their scores (OmniSTEval, sacrebleu, jiwer).

One line per stream (JSON), SimulEval's keys with SimulEval's units, so OmniSTEval (``omnisteval shortform
--hypothesis_file instances.log``), SimulEval and StreamLAAL read it as it is:

- ``index``, ``source`` (the audio file), ``reference``, ``source_length`` (ms of audio);
- ``prediction``: the translation's words joined by single spaces (one latency unit per word);
- ``delays`` (ms, one per word, computation-unaware): the audio already sent when the request whose response
  carried the word's last character was sent (the request's last sample, counted from the stream's first);
- ``elapsed`` (ms, one per word, computation-aware, the paper's per-chunk compute time): ``delays`` plus the time
  from sending that request to receiving the word's last character, as the client measures it;
- ``wall_clock`` (ms, one per word, load-aware): arrival of the word's last character, counted from the moment
  the stream's first sample was spoken (its scheduled speech start; audio is sent at 1x real time).

With real-time sending ``wall_clock`` and ``elapsed`` differ only by how late each request left; ``wall_clock``
also holds any delay that builds up over a stream (queueing), which ``elapsed`` of a later chunk does not
double-count. The other keys (``text``, ``file_index``, ``repeat``, ``errors``, ``chunk_latencies_s``,
``lag_drift``, ...) are this project's.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .api import SAMPLE_RATE, StreamResult


@dataclass(frozen=True, slots=True)
class UnitTimes:
    """One emitted word (latency unit): its text and three timestamps in ms."""

    word: str
    cu_ms: float
    ca_ms: float
    wall_ms: float


def word_times(result: StreamResult, speech_start: float) -> list[UnitTimes]:
    """The words of ``result.text`` with the times of the response that carried each word's last character.

    ``speech_start`` is the ``time.monotonic()`` at which the stream's first sample was (scheduled to be) spoken.
    """
    owner: list[int] = []  # character position -> index of its piece
    for i, piece in enumerate(result.pieces):
        owner += [i] * len(piece.text)
    text = "".join(p.text for p in result.pieces)
    out = []
    for match in re.finditer(r"\S+", text):
        piece = result.pieces[owner[match.end() - 1]]
        request = result.requests[piece.request_index]
        cu_ms = request.end_sample / SAMPLE_RATE * 1000.0
        out.append(
            UnitTimes(
                word=match.group(),
                cu_ms=cu_ms,
                ca_ms=cu_ms + (piece.received - request.sent) * 1000.0,
                wall_ms=(piece.received - speech_start) * 1000.0,
            )
        )
    return out


def lag_drift(result: StreamResult, speech_start: float) -> float | None:
    """Slope (seconds per second of audio) of wall-clock minus audio time over the stream, fitted by least squares
    over its requests: at each request's FINAL, the time since the speech start minus the audio sent so far. Near 0
    when the server keeps up; positive when a backlog builds up."""
    points = [
        (r.end_sample / SAMPLE_RATE, r.done - speech_start - r.end_sample / SAMPLE_RATE)
        for r in result.requests
        if r.done is not None and r.error is None
    ]
    xs = np.array([x for x, _ in points])
    if len(points) < 2 or np.ptp(xs) <= 0:
        return None
    return float(np.polyfit(xs, np.array([y for _, y in points]), 1)[0])


def instance_record(
    index: int, source: str, reference: str, result: StreamResult, speech_start: float, **extra
) -> dict:
    """One ``instances.log`` line for a finished stream (see the module docstring)."""
    units = word_times(result, speech_start)
    samples = result.requests[-1].end_sample if result.requests else 0
    return {
        "index": index,
        "prediction": " ".join(u.word for u in units),
        "delays": [round(u.cu_ms, 3) for u in units],
        "elapsed": [round(u.ca_ms, 3) for u in units],
        "wall_clock": [round(u.wall_ms, 3) for u in units],
        "prediction_length": len(units),
        "source_length": round(samples / SAMPLE_RATE * 1000.0, 3),
        "reference": reference,
        "source": [source],
        "text": result.text,
        "errors": [e.message for e in result.errors],
        "chunk_latencies_s": [round(x, 6) for x in result.chunk_latencies()],
        "lag_drift": lag_drift(result, speech_start),
        **extra,
    }


def write_instances(path: Path, records: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_instances(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def omnisteval_scores(
    path: Path, talks: Sequence[Sequence[tuple[float, float, str]]] | None = None, emission_ca_key: str = "elapsed"
) -> dict[str, float | None]:
    """OmniSTEval's scores of an ``instances.log`` (``delays`` as CU and ``emission_ca_key`` as CA emissions in
    ms, word units): BLEU, chrF, and the latency metrics with ``long_`` (LongYAAL: words emitted after the end of
    the source count, as they do for a live stream whose END flushes the tail) and ``ca_`` (computation-aware)
    prefixes, plus short-form ``yaal``/``ca_yaal``. NaN (nothing to score) is None.

    Short-form (``talks`` None): each line is one segment, read by OmniSTEval's own loader. Long-form: each line is
    a whole talk, ``talks[record["file_index"]]`` its segments ``(offset s, duration s, reference)``; the lines are
    first resegmented against the segment references (:func:`resegment_longform`) and the segments are scored."""
    from omnisteval import YAALScorer, evaluate_instances
    from omnisteval.io import load_shortform_instances

    if talks is None:
        instances = load_shortform_instances(str(path), None, emission_cu_key="delays", emission_ca_key=emission_ca_key)
    else:
        instances = resegment_longform(read_instances(path), talks, emission_ca_key)
    scores, _, _ = evaluate_instances(instances, is_longform=True, fix_emission_ca_flag=True)
    scores["yaal"] = YAALScorer(computation_aware=False)(instances)
    scores["ca_yaal"] = YAALScorer(computation_aware=True)(instances)
    return {k: _finite(v) for k, v in scores.items()}


def resegment_longform(
    records: Sequence[dict], talks: Sequence[Sequence[tuple[float, float, str]]], emission_ca_key: str = "elapsed"
) -> list:
    """OmniSTEval's long-form resegmentation (SoftSegmenter) of talk-level records: a list of ``Instance``, one per
    segment of each record's talk (``talks[record["file_index"]]``: ``(offset s, duration s, reference)`` in time
    order), in record order, with emissions relative to the segment's offset.

    Inputs go the way ``omnisteval longform --speech_segmentation YAML --ref_sentences_file REF --hypothesis_file
    LOG --word_level`` takes them (its own loaders on files written here): every record becomes a recording of its
    own (``stream<i>``), so streams that replay one talk are each scored against that talk's segments. ``elapsed``
    holds per-word times already (not SimulEval's cumulative ones), so OmniSTEval's CA fix is not applied."""
    import tempfile

    import yaml
    from omnisteval.io import load_resegmentation_inputs
    from omnisteval.resegment import resegment

    segmentation, references, hypotheses = [], [], []
    for i, record in enumerate(records):
        name = f"stream{i}"
        for offset_s, duration_s, reference in talks[record["file_index"]]:
            segmentation.append({"duration": float(duration_s), "offset": float(offset_s), "wav": f"{name}.wav"})
            references.append(reference)
        hypotheses.append({**record, "source": [f"{name}.wav"]})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "segments.yaml").write_text(yaml.safe_dump(segmentation), encoding="utf-8")
        (folder / "references.txt").write_text("".join(f"{r}\n" for r in references), encoding="utf-8")
        write_instances(folder / "hypotheses.jsonl", hypotheses)
        ref_words, hyp_words, segments, ref_sentences = load_resegmentation_inputs(
            str(folder / "segments.yaml"),
            None,
            str(folder / "references.txt"),
            str(folder / "hypotheses.jsonl"),
            hypothesis_format="jsonl",
            emission_cu_key="delays",
            emission_ca_key=emission_ca_key,
        )
    instances, _ = resegment(ref_words, hyp_words, segments, ref_sentences)
    return instances


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
