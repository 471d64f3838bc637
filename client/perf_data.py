"""Turn audio files into perf_analyzer ``--input-data`` sequences.

    python -m client.perf_data FILE [FILE ...] --out steps.json [--piece-seconds 0.96] [--language de]

Each file becomes one stream of steps, one step per request: ``{"AUDIO": {"content": [...], "shape": [n]}}``
(perf_analyzer adds the batch dimension). perf_analyzer sets START on a sequence's first step and END on its
last, and cycles through the streams. Use ``--sequence-length`` equal to the number of steps (printed) so each
sequence plays one whole file; scripts/perf_sweep.sh does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE, load_audio, split_pieces


def audio_steps(samples: np.ndarray, piece_samples: int, language: str | None = None, multiplier: int | None = None):
    """The steps of one stream. TARGET_LANGUAGE / LATENCY_MULTIPLIER go on every step (the server reads them on
    START only) because perf_analyzer expects the same inputs in each step."""
    steps = []
    for piece in split_pieces(samples, piece_samples):
        step = {"AUDIO": {"content": piece.astype(np.float64).tolist(), "shape": [int(piece.size)]}}
        if language is not None:
            step["TARGET_LANGUAGE"] = {"content": [language], "shape": [1]}
        if multiplier is not None:
            step["LATENCY_MULTIPLIER"] = {"content": [int(multiplier)], "shape": [1]}
        steps.append(step)
    return steps


def build(files: list[Path], piece_seconds: float, language=None, multiplier=None, max_seconds=None) -> dict:
    """``{"data": [stream, ...]}``, each stream a list of steps."""
    piece_samples = max(1, int(round(piece_seconds * SAMPLE_RATE)))
    streams = []
    for path in files:
        samples = load_audio(path)
        if max_seconds is not None:
            samples = samples[: int(max_seconds * SAMPLE_RATE)]
        streams.append(audio_steps(samples, piece_samples, language, multiplier))
    return {"data": streams}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.perf_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="audio files, one stream each")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--piece-seconds", type=float, default=0.96, help="audio per request (default %(default)s)")
    parser.add_argument("--language", default=None, help="TARGET_LANGUAGE for every stream (server default if unset)")
    parser.add_argument("--latency-multiplier", type=int, default=None, help="LATENCY_MULTIPLIER for every stream")
    parser.add_argument("--max-seconds", type=float, default=None, help="cut each file to this many seconds")
    args = parser.parse_args(argv)
    if args.piece_seconds <= 0:
        parser.error("--piece-seconds must be > 0")
    data = build(args.files, args.piece_seconds, args.language, args.latency_multiplier, args.max_seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data))
    lengths = [len(s) for s in data["data"]]
    print(f"wrote {args.out}: {len(lengths)} stream(s), steps per stream {lengths}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
