"""Latency percentiles from perf_analyzer's ``--profile-export-file``.

    python -m client.perf_report PROFILE.json [PROFILE.json ...] [--json OUT.json]

For decoupled models perf_analyzer's own latency runs from a request to its *last* response, whatever it
prints. Per concurrency level this reports, over all requests:
- first response: request sent -> first response with non-empty TEXT (the text the chunk caused);
- last response: request sent -> its last response (the FINAL, which follows the chunk's turn);
- throughput in requests/s and audio seconds/s over the measurement windows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .stats import percentiles

SAMPLE_RATE = 16_000


def _first_text_time(request: dict) -> int | None:
    times = request.get("response_timestamps", [])
    outputs = request.get("response_outputs")
    if outputs is None:
        return times[0] if times else None
    for t, out in zip(times, outputs):
        if out.get("TEXT"):
            return t
    return None


def summarize(profile: dict) -> list[dict]:
    """One row per experiment (concurrency level or request rate)."""
    rows = []
    for experiment in profile.get("experiments", []):
        requests = experiment.get("requests", [])
        first, last, audio = [], [], 0.0
        missing = 0
        for r in requests:
            times = r.get("response_timestamps", [])
            if not times:
                missing += 1
                continue
            last.append((times[-1] - r["timestamp"]) / 1e9)
            t = _first_text_time(r)
            if t is not None:
                first.append((t - r["timestamp"]) / 1e9)
            audio += len(r.get("request_inputs", {}).get("AUDIO", [])) / SAMPLE_RATE
        bounds = experiment.get("window_boundaries", [])
        span = (bounds[-1] - bounds[0]) / 1e9 if len(bounds) >= 2 else 0.0
        rows.append(
            {
                "mode": experiment["experiment"]["mode"],
                "concurrency": experiment["experiment"]["value"],
                "requests": len(requests),
                "requests_without_response": missing,
                "requests_per_s": len(requests) / span if span else None,
                "audio_seconds_per_s": audio / span if span else None,
                "first_response": percentiles(first, count=False, maximum=False),
                "last_response": percentiles(last, count=False, maximum=False),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1000:.0f}"

    header = "concurrency  requests  req/s  audio s/s  first p50/p90/p99 (ms)  last p50/p90/p99 (ms)"
    lines = [header]
    for r in rows:
        f, last = r["first_response"], r["last_response"]
        rate = "-" if r["requests_per_s"] is None else f"{r['requests_per_s']:.1f}"
        audio = "-" if r["audio_seconds_per_s"] is None else f"{r['audio_seconds_per_s']:.1f}"
        first_ms = f"{ms(f['p50'])}/{ms(f['p90'])}/{ms(f['p99'])}"
        last_ms = f"{ms(last['p50'])}/{ms(last['p90'])}/{ms(last['p99'])}"
        lines.append(
            f"{r['concurrency']:>11}  {r['requests']:>8}  {rate:>5}  {audio:>9}  {first_ms:>22}  {last_ms:>21}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.perf_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("profiles", nargs="+", type=Path, help="perf_analyzer --profile-export-file outputs")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    rows = [row for path in args.profiles for row in summarize(json.loads(path.read_text()))]
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
