"""Concurrent real-time streams through Triton on the GPU: the engine-level N* confirmed end to end.

One command, on a machine with NVIDIA GPUs and tritonserver on PATH (``TRITON_BACKENDS`` naming the folder with
the Python backend):

1. writes a checkpoint with the paper's dimensions and random (dummy) bf16 weights (once; ``--checkpoint``);
2. writes a GPU model repository with ``server_tools.gen_gpu_repo`` (one KIND_GPU instance per GPU of ``--gpus``) with
   the benchmark-only parameter ``benchmark_forced_turn_seed`` (dummy weights never end a turn by themselves);
3. starts tritonserver, and for each N of ``--streams``: N real-time streams over gRPC (``client.api``), staggered
   over the first chunk period, each sending one 0.96 s chunk per period for ``--seconds``; chunk latency is what
   the client sees, from sending the chunk's request to that request's FINAL (which follows the chunk's turn);
4. writes JSON and markdown: p50/p95/p99 per N, pass/fail by benchmarks.md's rule, and the engine-level N* of
   ``docs/benchmarks/gpu_streams.json`` for comparison.

    python -m benchmarks.gpu_triton --streams 136,144,152 --gpus 0 --out build/gpu_triton_1gpu

(``docs/benchmarks/gpu_triton.md`` summarizes the committed runs by hand: keep ``--out`` off that name.)
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from client.api import StreamingClient
from client.stats import percentiles
from server_tools.gen_gpu_repo import write as write_repository
from server_tools.metrics import metric_values
from server_tools.tritonserver import TritonServer

ROOT = Path(__file__).resolve().parents[1]
P95_LIMIT_S, P99_LIMIT_S = 0.5, 1.0
SAMPLES_PER_UNIT = 15_360
STREAMS_PER_CONNECTION = 32


def wait_for_free_gpus(gpus: list[int], max_used_mib: int = 2048, timeout_s: float = 90.0) -> None:
    """Wait until no other process holds much memory on ``gpus`` (a previous server still exiting would shrink the KV
    pool the model sizes from free memory at load); warn if that does not happen within ``timeout_s``."""
    query = ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            lines = subprocess.run(query, capture_output=True, text=True, check=True, timeout=30).stdout.splitlines()
        except (OSError, subprocess.SubprocessError):
            return  # no nvidia-smi: nothing to check
        used = {int(i): int(mib) for i, mib in (line.split(",") for line in lines if line.strip())}
        busy = {g: used.get(g, 0) for g in gpus if used.get(g, 0) > max_used_mib}
        if not busy:
            return
        if time.monotonic() > deadline:
            print(f"  warning: GPU memory still in use before the server starts (MiB by GPU): {busy}", flush=True)
            return
        time.sleep(2.0)


def ensure_checkpoint(path: Path, layers: int) -> None:
    """A checkpoint of the paper's dimensions with random bf16 weights (written once, ~16 GB at 32 layers)."""
    if (path / "config.json").is_file():
        return
    import torch

    from benchmarks.lib.models import build_dummy_model, synthetic_llama3_tokenizer
    from infinisst_backend.model.checkpoint import save_checkpoint
    from infinisst_backend.presets import paper_model_config

    t = time.perf_counter()
    cfg = paper_model_config(layers)
    model = build_dummy_model(cfg, "cuda", torch.bfloat16)
    save_checkpoint(path, model, cfg, synthetic_llama3_tokenizer(), dtype="bfloat16")
    del model
    torch.cuda.empty_cache()
    print(f"wrote dummy checkpoint {path} in {time.perf_counter() - t:.0f} s", flush=True)


def run_load(url: str, n: int, seconds: float, m: int, seed: int) -> dict:
    """N staggered real-time streams; per-chunk latencies as the client sees them."""
    period = 0.96 * m
    num_chunks = max(1, round(seconds / period))
    chunk = (0.1 * np.random.default_rng(seed).standard_normal(SAMPLES_PER_UNIT * m)).astype(np.float32)
    clients = [StreamingClient(url) for _ in range(-(-n // STREAMS_PER_CONNECTION))]
    # The model's defaults (German, m from config.pbtxt): START requests carry AUDIO only. (Seen on the H100 with
    # Triton 2.51, KIND_GPU: under a burst of STARTs with the BYTES input TARGET_LANGUAGE the Python stub crashed
    # deserializing it; see the report.)
    streams = [clients[i // STREAMS_PER_CONNECTION].open_stream() for i in range(n)]
    t0 = time.monotonic() + 0.5
    # (due, stream, chunk): chunk k of stream i is spoken by t0 + i * period / n + (k + 1) * period.
    due = [(t0 + i * period / n + (k + 1) * period, i, k) for i in range(n) for k in range(num_chunks)]
    heapq.heapify(due)
    late = []
    while due:
        when, i, k = heapq.heappop(due)
        wait = when - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        late.append(time.monotonic() - when)
        streams[i].send(chunk, end=k == num_chunks - 1)
    results, failed = [], 0
    deadline = time.monotonic() + 120
    for s in streams:
        try:
            results.append(s.result(timeout=max(1.0, deadline - time.monotonic())))
        except Exception as e:  # a stream that errs or never finishes fails the trial
            failed += 1
            print(f"  stream {s.sequence_id}: {type(e).__name__}: {e}", flush=True)
    for c in clients:
        c.close()
    lat = np.array([x for r in results for x in r.chunk_latencies()])
    errors = sum(len(r.errors) for r in results)
    kinds: dict[str, list] = {}  # error code -> [count, first message]: a refused START shows next to its fallout
    for e in (e for r in results for e in r.errors):
        entry = kinds.setdefault(e.message.split(":", 1)[0], [0, e.message])
        entry[0] += 1
    messages = [f"{count} x {message}" for count, message in sorted(kinds.values(), key=lambda v: -v[0])]
    for message in messages[:3]:
        print(f"  error: {message[:300]}", flush=True)
    expected = n * num_chunks
    out = {
        "streams": n,
        "m": m,
        "chunks_expected": expected,
        "chunks_done": int(lat.size),
        "failed_streams": failed,
        "errors": errors,
        "error_messages": messages[:5],
        "send_lateness_p99_s": float(np.percentile(late, 99)),
    }
    if lat.size:
        out.update({f"{k}_s": v for k, v in percentiles(lat, (50, 95, 99), count=False).items()})
    out["passes"] = bool(
        lat.size == expected
        and not failed
        and not errors
        and out["p95_s"] <= P95_LIMIT_S
        and out["p99_s"] <= P99_LIMIT_S
    )
    return out


def _tokens_by_instance(server: TritonServer) -> dict[str, float]:
    """``infinisst_generated_tokens_total`` per model instance (the instance name of its labels)."""
    values = metric_values(server.metrics(), "infinisst_generated_tokens_total")
    return {re.search(r'instance="([^"]+)"', k).group(1): v for k, v in values.items() if "instance=" in k}


def _shares(trial: dict) -> str:
    tokens = trial.get("generated_tokens_by_instance") or {}
    total = sum(tokens.values())
    return " / ".join(f"{name} {v / total:.0%}" for name, v in sorted(tokens.items())) if total else "-"


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Concurrent real-time streams through Triton (GPU)",
        "",
        f"{report['gpu']} x {len(report['gpus'])}, tritonserver with the model on KIND_GPU (one instance per GPU), "
        "paper dimensions, random bf16 weights, forced turn lengths (benchmark_forced_turn_seed), greedy "
        f"m={report['m']}, {report['seconds']:.0f} s of audio per stream, load from `client.api` over gRPC.",
        "",
        f"Command: `{report['command']}`",
        "",
        "Chunk latency as the client sees it: from sending a chunk's request to its FINAL. Pass: p95 <= 0.5 s, "
        "p99 <= 1.0 s, every chunk answered, no error.",
        "",
        "| streams | p50 (s) | p95 (s) | p99 (s) | max (s) | chunks | errors | pass | tokens by instance |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in report["trials"]:
        lines.append(
            f"| {t['streams']} | {t.get('p50_s', 0):.3f} | {t.get('p95_s', 0):.3f} | {t.get('p99_s', 0):.3f} | "
            f"{t.get('max_s', 0):.3f} | {t['chunks_done']}/{t['chunks_expected']} | "
            f"{t['errors'] + t['failed_streams']} | {'yes' if t['passes'] else 'no'} | {_shares(t)} |"
        )
    lines += ["", f"Largest N that passed here: {report['n_star_triton']}."]
    if report.get("engine_n_star") and report.get("ratio_to_engine") is not None:
        lines.append(
            f"Engine-level N* (docs/benchmarks/gpu_streams.json, one GPU): {report['engine_n_star']}; "
            f"through Triton / engine x GPUs: {report['ratio_to_engine']:.2f}."
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", required=True, help="comma-separated N to try, in order")
    p.add_argument("--gpus", default="0")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--checkpoint", type=Path, default=Path("/tmp/infinisst_paper_dummy"))
    p.add_argument("--repository", type=Path, default=ROOT / "build" / "gpu_triton_repository")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config.pbtxt values")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "gpu_triton")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    gpus = [int(g) for g in args.gpus.split(",")]
    ensure_checkpoint(args.checkpoint, args.layers)
    sizes = [int(n) for n in args.streams.split(",")]
    overrides = {
        "benchmark_forced_turn_seed": str(args.seed),
        "max_streams": str(max(sizes) // len(gpus) + 16),
        "default_latency_multiplier": str(args.m),
        # The engine benchmark's pool holds N streams' worst case with 8 GiB to spare; gen_gpu_repo's 0.75 holds only
        # ~234 paper-size streams on an H100 (docs/benchmarks/gpu_triton.md), 0.9 about 305.
        "kv_memory_fraction": "0.9",
    }
    overrides.update(dict(item.split("=", 1) for item in args.set))
    write_repository(args.repository, [("infinisst", args.checkpoint.resolve(), "German")], gpus, overrides)
    backends = os.environ.get("TRITON_BACKENDS")  # the folder with the Python backend (device bundle)
    server = TritonServer(
        args.repository,
        args.out.parent / (args.out.name + "_tritonserver.log"),
        extra_args=["--exit-timeout-secs=30"] + ([f"--backend-directory={backends}"] if backends else []),
    )
    wait_for_free_gpus(gpus)
    server.start()
    trials = []
    try:
        print(f"model ready in {server.wait_ready(['infinisst'], timeout=600):.0f} s", flush=True)
        url = server.grpc_url
        run_load(url, min(8, sizes[0]), 5.0, args.m, args.seed)  # warm-up (first prefill/decode shapes)
        for n in sizes:
            before = _tokens_by_instance(server)
            t = run_load(url, n, args.seconds, args.m, args.seed + n)
            after = _tokens_by_instance(server)
            # How Triton spread the load: target tokens each instance generated during the trial.
            t["generated_tokens_by_instance"] = {k: v - before.get(k, 0.0) for k, v in after.items()}
            trials.append(t)
            print(
                f"  N={n}: p50 {t.get('p50_s', 0):.3f} p95 {t.get('p95_s', 0):.3f} p99 {t.get('p99_s', 0):.3f} "
                f"chunks {t['chunks_done']}/{t['chunks_expected']} errors {t['errors']} "
                f"{'PASS' if t['passes'] else 'FAIL'}, tokens by instance {_shares(t)}",
                flush=True,
            )
    finally:
        server.stop()
    engine_json = ROOT / "docs" / "benchmarks" / "gpu_streams.json"
    engine_n = None
    if engine_json.is_file():
        engine_n = json.loads(engine_json.read_text())["settings"].get(f"greedy_m{args.m}", {}).get("n_star")
    passed = [t["streams"] for t in trials if t["passes"]]
    import torch

    report = {
        "command": "python -m benchmarks.gpu_triton " + " ".join(sys.argv[1:] if argv is None else argv),
        "gpu": torch.cuda.get_device_name(gpus[0]),
        "gpus": gpus,
        "m": args.m,
        "seconds": args.seconds,
        "trials": trials,
        "n_star_triton": max(passed) if passed else None,
        "engine_n_star": engine_n,
        "ratio_to_engine": (max(passed) / (engine_n * len(gpus))) if passed and engine_n else None,
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
