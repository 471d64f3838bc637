"""How many real-time streams does one engine sustain? (CPU figure for the demo model.)

Each stream sends 0.96 s x m of audio every 0.96 s x m of wall time (streams staggered over the first chunk
period), through the engine's own thread, exactly as the server does. A run passes when the p95 chunk latency
(chunk's last sample in -> its turn's last token out) is <= 0.5 s and p99 <= 1.0 s and no stream falls behind.
The sweep doubles N until a run fails, then bisects. Prints a table and writes JSON + markdown.

    python -m benchmarks.cpu_streams --checkpoint build/demo_checkpoint --seconds 20
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from pathlib import Path

import numpy as np
import torch

from infinisst_backend.config import SAMPLE_RATE, SAMPLES_PER_UNIT, DecodingConfig, EngineConfig
from infinisst_backend.engine.engine import Engine
from infinisst_backend.engine.events import StreamFinished, TurnEnded


def run_trial(engine: Engine, n: int, seconds: float, m: int, beam: int, seed: int) -> dict:
    """Stream n synthetic real-time streams for `seconds` of audio each; latency percentiles."""
    rng = np.random.default_rng(seed)
    chunk = SAMPLES_PER_UNIT * m
    period = chunk / SAMPLE_RATE
    num_chunks = max(1, int(seconds / period))
    latencies: list[float] = []
    finished = threading.Event()
    done = [0]
    lock = threading.Lock()

    def on_event(event):
        with lock:
            if isinstance(event, TurnEnded):
                latencies.append(event.chunk_latency_s)
            elif isinstance(event, StreamFinished):
                done[0] += 1
                if done[0] == n:
                    finished.set()

    engine.on_event = on_event
    ids = [f"bench-{seed}-{i}" for i in range(n)]
    for sid in ids:
        engine.open_stream(sid, "German", m, DecodingConfig(beam_size=beam))
    audio = (0.1 * rng.standard_normal(chunk * num_chunks)).astype(np.float32)
    start = time.monotonic()
    offsets = [i * period / n for i in range(n)]  # staggered over the first chunk period
    schedule = sorted((offsets[i] + (k + 1) * period, i, k) for i in range(n) for k in range(num_chunks))
    for due, i, k in schedule:
        delay = start + due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        engine.add_audio(ids[i], audio[k * chunk : (k + 1) * chunk], end=k == num_chunks - 1)
    finished.wait(timeout=seconds * 10 + 60)
    lat = np.array(latencies)
    return {
        "streams": n,
        "turns": int(lat.size),
        "p50_s": float(np.percentile(lat, 50)),
        "p95_s": float(np.percentile(lat, 95)),
        "p99_s": float(np.percentile(lat, 99)),
        "complete": bool(finished.is_set()) and lat.size == n * num_chunks,
    }


def passes(result: dict) -> bool:
    return result["complete"] and result["p95_s"] <= 0.5 and result["p99_s"] <= 1.0


def sweep(engine: Engine, seconds: float, m: int, beam: int, max_streams: int) -> tuple[int, list[dict]]:
    results, seed = [], 0

    def trial(n):
        nonlocal seed
        seed += 1
        r = run_trial(engine, n, seconds, m, beam, seed)
        results.append(r)
        print(
            f"  N={n:4d}  p50={r['p50_s']:.3f}s  p95={r['p95_s']:.3f}s  p99={r['p99_s']:.3f}s  "
            f"{'ok' if passes(r) else 'FAIL'}",
            flush=True,
        )
        return passes(r)

    good, bad, n = 0, None, 1
    while n <= max_streams:
        if not trial(n):
            bad = n
            break
        good, n = n, n * 2
    if bad is None:
        return good, results
    while bad - good > 1 and bad - good > good // 8:
        mid = (good + bad) // 2
        if trial(mid):
            good = mid
        else:
            bad = mid
    return good, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="build/demo_checkpoint")
    parser.add_argument("--seconds", type=float, default=20.0, help="audio per stream in each trial")
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--beam", type=int, default=1)
    parser.add_argument("--max-streams", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--out", default="docs/benchmarks/cpu_streams")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = EngineConfig(max_batch_size=64, num_pages=16_384, max_streams=args.max_streams + 8, batch_timeout_s=0.005)
    engine = Engine.from_checkpoint(args.checkpoint, cfg)
    engine.start()
    print(
        f"demo model, m={args.m}, beam={args.beam}, {args.seconds:g} s of audio per stream, "
        f"{torch.get_num_threads()} torch threads on {platform.processor() or platform.machine()}"
    )
    n_star, results = sweep(engine, args.seconds, args.m, args.beam, args.max_streams)
    engine.shutdown()
    print(f"N* = {n_star} real-time streams (p95 <= 0.5 s, p99 <= 1.0 s)")
    report = {
        "n_star": n_star,
        "m": args.m,
        "beam": args.beam,
        "seconds_per_stream": args.seconds,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": __import__("os").cpu_count(),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "trials": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# CPU real-time streams (demo model, m={args.m}, beam {args.beam})",
        "",
        f"N\\* = **{n_star}** on {report['cpu_count']} CPU cores ({report['machine']}, torch {torch.__version__}).",
        "",
        f"Command: `python -m benchmarks.cpu_streams --checkpoint {args.checkpoint} --seconds {args.seconds:g} "
        f"--m {args.m} --beam {args.beam}`",
        "",
        "| streams | turns | p50 (s) | p95 (s) | p99 (s) | pass |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['streams']} | {r['turns']} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['p99_s']:.3f} | "
            f"{'yes' if passes(r) else 'no'} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
