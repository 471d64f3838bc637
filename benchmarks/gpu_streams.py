"""Concurrent real-time streams per GPU (N*), with the naive and static baselines: ../shared/docs/benchmarks.md.

One command measures, on one GPU, with the paper's model dimensions and random (dummy) bf16 weights:

* **N\\*** per setting (greedy m=1, greedy m=2, beam 4 m=2): the largest number of staggered real-time streams
  with p95 chunk latency <= 0.5 s, p99 <= 1.0 s, every turn done, nothing dropped; for the engine as served
  ("iteration" scheduling, FlashInfer) and for the **static** baseline (``benchmarks.lib.static_scheduler``);
* the **naive** baseline (one stream at a time, HF transformers forward with a contiguous ``DynamicCache``),
  estimated from the measured time of one unbatched turn: ``naive N* = floor(chunk period / turn time)``;
* decode step time vs batch size, prefill tokens/s, speech-encoder time, memory per stream, the memory limit.

Workload. Turn lengths are forced (dummy weights never emit EOT): each turn's length, EOT included, is drawn from
``1 + Poisson(5m - 1)`` capped at ``10m`` (mean ~5 tokens per 0.96 s), from a seeded generator, through the
engine's ``turn_length_hook``, so the turn ends at its max length (the real decoder, processors and all, runs).
Stream i starts at ``i * period / N`` and sends one chunk of noise per period for ``--seconds`` of audio.

Real time is simulated faithfully by discrete events (``benchmarks.lib.trials``): the engine runs on this thread
(``Engine.step()``), its clock is a virtual one that advances with the real wall time while the engine works and
jumps ahead while it would sleep; each chunk enters the engine stamped with its due time (the moment its last sample
arrives), so latencies are exactly those of a real-time run whose idle waits cost nothing. A trial that already has
more than 1% of its turns over 1 s (or 5% over 0.5 s) stops early as a fail.

    python -m benchmarks.gpu_streams --out docs/benchmarks/gpu_streams
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.lib.gpu import gpu_info, total_memory
from benchmarks.lib.models import build_dummy_model, synthetic_llama3_tokenizer, weights_bytes
from benchmarks.lib.parts import measure_encoder, measure_naive, measure_parts
from benchmarks.lib.report import combine_runs, merge_runs, write_report
from benchmarks.lib.sweep import sweep, trials_log
from benchmarks.lib.trials import HEADROOM_BYTES, SETTINGS, Bench
from infinisst_backend.presets import paper_model_config, smoke_model_config


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
            sys.exit("benchmarks.gpu_streams needs a CUDA GPU (or --smoke for a CPU run of the harness)")
        device, dtype, backend, model_cfg = "cuda", torch.bfloat16, "flashinfer", paper_model_config(args.layers)
    model = build_dummy_model(model_cfg, device, dtype, seed=args.seed)
    tokenizer = synthetic_llama3_tokenizer()
    bench = Bench(model, tokenizer, model_cfg, args, device=device, dtype=str(dtype).split(".")[1])
    bench.attention_backend = backend
    trials_log(bench).unlink(missing_ok=True)  # this run's trials only
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
        "command": "python -m benchmarks.gpu_streams " + " ".join(sys.argv[1:] if argv is None else argv),
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
