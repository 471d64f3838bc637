"""The search for N* of one setting and scheduling: trials up and down, then bisection, within a time budget; every
trial appended to ``<--out>.trials.jsonl`` as it ends."""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import trials
from .report import fmt
from .trials import Bench, Setting


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
    good, bad, n, done = 0, None, max(1, min(start, limit)), []
    while True:
        r = trials.run_trial(bench, setting, n, scheduling, seed + len(done))
        done.append(r)
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
        r = trials.run_trial(bench, setting, good, scheduling, seed + len(done))
        r["repeat"] = True
        done.append(r)
        _print_trial(setting, r)
        _save_trial(bench, setting, r)
        if r["passes"]:
            passes_at_star += 1
            continue
        bad = good if bad is None else min(bad, good)
        good = max((t["streams"] for t in done if t["passes"] and t["streams"] < good), default=0)
        passes_at_star = 0
    return {
        "n_star": good,
        "first_fail": bad,
        "memory_limit": limit,
        "trials": done,
        "confirmed": bool(confirm) and passes_at_star >= confirm,
    }


def trials_log(bench: Bench) -> Path:
    """``<--out>.trials.jsonl``: every trial of the run, one JSON line each, written as it ends."""
    return Path(str(bench.args.out) + ".trials.jsonl")


def _save_trial(bench: Bench, setting: Setting, r: dict) -> None:
    """Append the trial to :func:`trials_log`, so that a run cut off before its report (a device time limit) keeps
    what it measured."""
    path = trials_log(bench)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"setting": setting.name, **r}) + "\n")


def _print_trial(setting: Setting, r: dict) -> None:
    if r.get("reason") == "memory":
        print(f"  {setting.name} {r['scheduling']:9s} N={r['streams']:4d}  over the memory limit", flush=True)
        return
    if r.get("reason") == "out of memory":
        print(f"  {setting.name} {r['scheduling']:9s} N={r['streams']:4d}  FAIL out of GPU memory: {r['error']}")
        return
    print(
        f"  {setting.name} {r['scheduling']:9s} N={r['streams']:4d}  p50={fmt(r['p50_s'])} p95={fmt(r['p95_s'])} "
        f"p99={fmt(r['p99_s'])}  busy={r['busy_fraction']:.2f} wall={r['wall_s']:.0f}s "
        f"dec_rows={r['mean_decode_rows']:.0f} pre_streams={r['mean_prefill_streams']:.1f} "
        f"model={r['model_s']} overhead={r['engine_overhead_s']:.1f}s mem0={r.get('allocated_before_gib')}G  "
        f"{'PROFILED' if r.get('profiled') else 'PASS' if r['passes'] else 'FAIL ' + str(r['aborted'] or '')}",
        flush=True,
    )
