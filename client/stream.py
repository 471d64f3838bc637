"""Stream audio files to the server as concurrent live streams and print the translations as they arrive.

    python -m client.stream FILE [FILE ...] [--url localhost:8001] [--realtime | --fast] [--language de]
        [--latency-multiplier 1] [--piece-seconds 0.32]

Each file is one stream (one Triton sequence), read as 16 kHz mono (WAV, FLAC, ...; resampled if needed) and
sent in pieces of --piece-seconds: in real time (each piece when its last sample would have been spoken) or as
fast as possible. At the end: each translation, and first-response / per-chunk latency percentiles.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from .api import SAMPLE_RATE, AudioStream, StreamingClient, StreamResult, TextPiece
from .audio import load_audio, split_pieces
from .stats import percentiles


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client.stream", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="audio files (one concurrent stream each)")
    parser.add_argument("--url", default="localhost:8001", help="Triton gRPC address (default %(default)s)")
    parser.add_argument("--model", default="infinisst", help="model name (default %(default)s)")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--realtime", dest="realtime", action="store_true", default=True, help="send at speech pace")
    pace.add_argument("--fast", dest="realtime", action="store_false", help="send as fast as possible")
    parser.add_argument("--language", default=None, help="target language name or code (server default if unset)")
    parser.add_argument("--latency-multiplier", type=int, default=None, help="m in 1..4 (server default if unset)")
    parser.add_argument("--piece-seconds", type=float, default=0.32, help="audio per request (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each stream's end")
    parser.add_argument("--quiet", action="store_true", help="print only the final translations and latencies")
    args = parser.parse_args(argv)
    if args.piece_seconds <= 0:
        parser.error("--piece-seconds must be > 0")
    return args


def send_file(stream: AudioStream, pieces: list, piece_seconds: float, realtime: bool) -> None:
    """Send all pieces, then END. In real time, piece i leaves when its last sample would have been spoken."""
    t0 = time.monotonic()
    for i, piece in enumerate(pieces):
        if realtime:
            time.sleep(max(0.0, t0 + (i + 1) * piece_seconds - time.monotonic()))
        stream.send(piece, end=i == len(pieces) - 1)


def format_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def report(names: list[str], results: list[StreamResult], realtime: bool) -> str:
    """The final translations and latency percentiles, as printable text."""
    lines = ["", "== translations"]
    for name, r in zip(names, results):
        lines.append(f"[{name}] {r.text}")
        lines += [f"[{name}] ERROR {e.message}" for e in r.errors]
    first = [r.first_response_s for r in results if r.first_response_s is not None]
    rows = [
        ("first response (from 1st request)", first),
        ("chunk latency", [x for r in results for x in r.chunk_latencies()]),
    ]
    if realtime:
        rows.append(("text delay (computation-aware)", [x for r in results for x in r.text_delays()]))
    lines.append("")
    lines.append(f"== latency over {len(results)} stream(s)")
    for label, values in rows:
        s = percentiles(values, (50, 90, 99))
        lines.append(
            f"{label:34s} n={s['n']:<4d} p50={format_seconds(s['p50'])}  p90={format_seconds(s['p90'])}  "
            f"p99={format_seconds(s['p99'])}  max={format_seconds(s['max'])}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [f.name for f in args.files]
    audio = [load_audio(f) for f in args.files]
    piece_samples = max(1, int(round(args.piece_seconds * SAMPLE_RATE)))
    print_lock = threading.Lock()

    def show(stream: AudioStream, piece: TextPiece) -> None:
        """One stream: the text flows on one line as it arrives. Several: one labelled line per response."""
        if args.quiet or not piece.text:
            return
        with print_lock:
            if len(names) == 1:
                sys.stdout.write(piece.text)
                sys.stdout.flush()
            else:
                print(f"[{labels[stream.sequence_id]} @{piece.source_seconds:5.2f}s] {piece.text}", flush=True)

    with StreamingClient(args.url, args.model) as client:
        options = dict(language=args.language, latency_multiplier=args.latency_multiplier, on_text=show)
        streams = [client.open_stream(**options) for _ in args.files]
        labels = {s.sequence_id: name for s, name in zip(streams, names)}
        senders = [
            threading.Thread(
                target=send_file,
                args=(s, split_pieces(a, piece_samples), args.piece_seconds, args.realtime),
                daemon=True,
            )
            for s, a in zip(streams, audio)
        ]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        results = [s.result(timeout=args.timeout) for s in streams]
    print(report(names, results, args.realtime), flush=True)
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
