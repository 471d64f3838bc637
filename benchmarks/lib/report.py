"""The ``gpu_streams`` report: JSON, markdown (hand-written sections kept when it is written again) and plot; and the
reports of ``--merge`` (the trials of several runs pooled) and ``--combine`` (settings measured by different runs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .models import PAGE_SIZE
from .trials import HEADROOM_BYTES, P95_LIMIT_S, P99_LIMIT_S, SETTINGS


def fraction(a: int | None, b: int) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def lower_bound(setting: dict, scheduling: str) -> bool:
    """Whether a sweep's N* is only a lower bound: it passed, nothing above it failed, and it is below the memory
    limit (at the limit no larger N can be admitted, so N* is exact)."""
    sweep = setting["sweeps"][scheduling]
    n = sweep.get("n_star")
    limit = sweep.get("memory_limit", setting["memory_limit_streams"])
    return bool(n) and sweep.get("first_fail") is None and n < limit


def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def verdict(r: dict) -> str:
    """A trial's pass column in the report."""
    if r.get("profiled"):
        return "(profiled: not counted)"
    return "yes" if r["passes"] else "no" + (" (" + r["aborted"] + ")" if r["aborted"] else "")


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    info = report["environment"]
    lines = [
        "# Concurrent real-time streams per GPU",
        "",
        f"{info['gpu']}, torch {info['torch']} (CUDA {info['cuda']}), FlashInfer {info.get('flashinfer', '?')}, "
        f"transformers {info.get('transformers', '?')}. "
        f"{'SMOKE RUN: tiny model on CPU, no figures' if report['options']['smoke'] else 'Paper dimensions'}, "
        "random weights, "
        f"{report['options']['seconds']:g} s of audio per stream, max batch {report['options']['max_batch']} rows.",
        "",
        f"Command: `{report['command']}`",
        "",
        "N\\*: p95 chunk latency <= 0.5 s and p99 <= 1.0 s, every turn done. Naive: one stream at a time (HF "
        "transformers, contiguous cache), from the measured turn time. Static: batches run to the end of their "
        "turns before new work joins.",
        "",
        "| setting | N* | static N* | naive N* | x static | x naive | p95 at N* (s) | memory limit | N*/limit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["settings"].items():
        ratio = lambda a, b: f"{a / b:.1f}" if a is not None and b else "-"  # noqa: E731
        low_it, low_st = (lower_bound(s, sched) for sched in ("iteration", "static"))
        bound = {(False, True): "≤", (True, False): "≥", (True, True): "?"}.get((low_it, low_st), "")
        x_static, x_naive = ratio(s["n_star"], s["static_n_star"]), ratio(s["n_star"], s["naive_n_star"])
        lines.append(
            f"| {name} | {'≥' * low_it}{s['n_star']} | {'≥' * low_st}{s['static_n_star']} | {s['naive_n_star']} | "
            f"{bound}{x_static} | {'≥' * low_it}{x_naive} | "
            f"{s['p95_chunk_latency_s'] if s['p95_chunk_latency_s'] is not None else '-'} | "
            f"{s['memory_limit_streams']} | {fraction(s['n_star'], s['memory_limit_streams'])} |"
        )
    if any(lower_bound(s, sched) for s in report["settings"].values() for sched in ("iteration", "static")):
        lines += [
            "",
            "≥: no trial above this N failed and it is below the memory limit, so the sweep did not bracket N\\* (its "
            "budget ran out): a lower bound, and the ratios it enters are bounds too.",
        ]
    if report["options"].get("confirm"):
        confirmed = [name for name, s in report["settings"].items() if s.get("n_star_confirmed")]
        lines += [
            "",
            f"N\\* held in {report['options']['confirm']} repeated trial(s) with other seeds (`--confirm`): "
            f"{', '.join(confirmed) or 'none'}; a failed repeat made that N a fail.",
        ]
    lines += ["", "## Trials", "", "| setting | scheduling | N | p50 | p95 | p99 | CA delay p95 | busy | pass |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, s in report["settings"].items():
        for sched in ("iteration", "static"):
            for r in s["sweeps"][sched]["trials"]:
                if r.get("reason") == "memory":
                    continue
                n = f"{r['streams']}{' (repeat)' if r.get('repeat') else ''}"
                if r.get("reason") == "out of memory":
                    lines.append(f"| {name} | {sched} | {n} | | | | | | no (out of GPU memory) |")
                    continue
                lines.append(
                    f"| {name} | {sched} | {n} | {fmt(r['p50_s'])} | {fmt(r['p95_s'])} | {fmt(r['p99_s'])} | "
                    f"{fmt(r['ca_delay_p95_s'])} | {r['busy_fraction']:.2f} | "
                    f"{verdict(r)} |"
                )
    parts = report.get("parts")
    if parts:
        lines += ["", f"## Decode step and prefill vs batch size ({parts['context_tokens']}-token caches)", ""]
        lines += ["| batch | decode step (ms) | decode rows/s | prefill step (ms) | prefill tokens/s |"]
        lines.append("|---|---|---|---|---|")
        for d, p in zip(parts["decode"], parts["prefill"]):
            lines.append(
                f"| {d['batch']} | {d['step_ms']:.1f} | {d['rows_per_s']:.0f} | {p['step_ms']:.1f} | "
                f"{p['tokens_per_s']:.0f} |"
            )
    mem = report["memory"]
    lines += [
        "",
        "## Memory",
        "",
        f"- weights: {mem['weights_bytes'] / 2**30:.1f} GiB; KV page ({PAGE_SIZE} tokens): "
        f"{mem['page_bytes'] / 2**20:.1f} MiB",
        "- speech cache per stream (steady state, measured): "
        + ", ".join(f"m={m}: {b / 2**20:.1f} MiB" for m, b in mem["speech_cache_bytes"].items()),
        f"- LLM KV per stream at steady state (measured peak, greedy m=1): "
        f"{mem.get('kv_bytes_per_stream_measured', 0) / 2**20:.1f} MiB",
        "- reserved per stream by admission (worst case): "
        + ", ".join(f"{k}: {v / 2**20:.0f} MiB" for k, v in mem["reserved_bytes_per_stream"].items()),
        f"- memory limit (worst-case reservations, {HEADROOM_BYTES >> 30} GiB headroom): "
        f"{report['memory_limit_streams']} streams at greedy m=1; with measured steady-state bytes: "
        f"{mem.get('memory_limit_streams_measured', '-')}",
    ]
    if report.get("naive"):
        lines += ["", "## Naive baseline (one unbatched stream, HF transformers)", ""]
        lines += ["| setting | rows | prompt | decode steps | LLM turn (ms) | encoder (ms) | turn (ms) | naive N* |"]
        lines.append("|---|---|---|---|---|---|---|---|")
        for name, n in report["naive"].items():
            lines.append(
                f"| {name} | {n['rows']} | {n['prompt_tokens']} | {n['decode_steps']} | {n['llm_turn_ms']:.1f} | "
                f"{n['encoder_ms']:.1f} | {n['turn_ms']:.1f} | {n['naive_n_star']} |"
            )
    md = out.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n" + hand_written(md))
    plot(report, out.with_suffix(".png"))


def hand_written(md: Path) -> str:
    """The sections of an existing report from its first "## ... (written by hand ..." heading on, kept when the
    report is written again (a re-run or ``--combine`` over the same path); empty when there are none."""
    if not md.exists():
        return ""
    text = md.read_text()
    match = re.search(r"^## [^\n]*\(written by hand", text, flags=re.MULTILINE)
    return "\n" + text[match.start() :] if match else ""


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not available: no plot (the JSON has the data)")
        return
    names = list(report["settings"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for sched, style in (("iteration", "-o"), ("static", "--s")):
            trials = sorted(
                (r for r in report["settings"][name]["sweeps"][sched]["trials"] if r.get("p99_s") is not None),
                key=lambda r: r["streams"],
            )
            if not trials:
                continue
            xs = [r["streams"] for r in trials]
            for key, color in (("p50_s", "tab:green"), ("p95_s", "tab:orange"), ("p99_s", "tab:red")):
                ys = [min(r[key], 5.0) for r in trials]
                ax.plot(xs, ys, style, color=color, label=f"{sched} {key[:-2]}")
        ax.axhline(P95_LIMIT_S, color="tab:orange", lw=0.5)
        ax.axhline(P99_LIMIT_S, color="tab:red", lw=0.5)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("chunk latency (s, capped at 5)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merge_runs(paths: list[str], out: Path) -> None:
    """Pool the trials of several runs (same GPU, same options) into one bracket per setting, table and plot."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    gpus = {r["gpu"] for r in runs}
    if len(gpus) != 1:
        raise ValueError(f"runs from different GPUs cannot be pooled: {sorted(gpus)}")
    settings: dict = {}
    for run_index, run in enumerate(runs):
        for name, s in run["settings"].items():
            merged = settings.setdefault(name, {"sweeps": {"iteration": {"trials": []}, "static": {"trials": []}}})
            for sched in ("iteration", "static"):
                for trial in s["sweeps"][sched]["trials"]:
                    merged["sweeps"][sched]["trials"].append({**trial, "run": run_index})
            merged["naive_n_star"] = sorted({r["settings"][name]["naive_n_star"] for r in runs})
    for merged in settings.values():
        for sched in ("iteration", "static"):
            trials = merged["sweeps"][sched]["trials"]
            passed = [t["streams"] for t in trials if t["passes"]]
            failed = [
                t["streams"]
                for t in trials
                if not t["passes"] and t.get("reason") != "memory" and not t.get("profiled")
            ]
            merged[sched] = {
                "largest_pass": max(passed, default=0),
                "smallest_fail": min(failed, default=None),
                "passes_above_a_fail": sorted(n for n in passed if failed and n > min(failed)),
            }
    report = {"runs": [{"command": r["command"], "elapsed_s": r["elapsed_s"]} for r in runs], "gpu": gpus.pop()}
    report["settings"] = settings
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# All trials of {len(runs)} runs on one {report['gpu']} (one session)",
        "",
        *[f"- run {i}: `{r['command']}`" for i, r in enumerate(report["runs"])],
        "",
        "| setting | scheduling | largest N passed | smallest N failed | passes above a fail (noise) | naive N* |",
        "|---|---|---|---|---|---|",
    ]
    for name, merged in settings.items():
        for sched in ("iteration", "static"):
            m = merged[sched]
            lines.append(
                f"| {name} | {sched} | {m['largest_pass']} | {m['smallest_fail'] or '-'} | "
                f"{m['passes_above_a_fail'] or '-'} | {merged['naive_n_star']} |"
            )
    lines += [
        "",
        "| setting | scheduling | run | N | p50 | p95 | p99 | busy | pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, merged in settings.items():
        for sched in ("iteration", "static"):
            for t in sorted(merged["sweeps"][sched]["trials"], key=lambda t: t["streams"]):
                lines.append(
                    f"| {name} | {sched} | {t['run']} | {t['streams']} | {fmt(t.get('p50_s'))} | "
                    f"{fmt(t.get('p95_s'))} | {fmt(t.get('p99_s'))} | {t.get('busy_fraction', 0):.2f} | "
                    f"{'yes' if t['passes'] else 'no' + (' (stopped early)' if t.get('aborted') else '')} |"
                )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(report, out.with_suffix(".png"))


def combine_runs(paths: list[str], out: Path) -> None:
    """One report from runs that each measured other settings (same GPU, same code): every setting keeps the N*,
    baselines and trials of the run that measured it; the decode/prefill table comes from the run with the most
    batch sizes. ``--combine`` is for one headline measured in several calls (each within a device time limit).

    A path may end in ``:SETTING[,SETTING...]`` to take only those settings of that run (for a setting that another
    run measured again), or in a bare ``:`` to take none (a run given for its decode/prefill table); the report's
    ``combined_from`` names what was taken from each."""
    runs, taken = [], []
    for path in paths:
        file, colon, names = path.rpartition(":") if ":" in path else (path, "", "")
        run = json.loads(Path(file).read_text())
        wanted = [n for n in names.split(",") if n] if colon else list(run["settings"])
        missing = [n for n in wanted if n not in run["settings"]]
        if missing:
            raise ValueError(f"{file} did not measure {', '.join(missing)}")
        runs.append(run)
        taken.append(wanted)
    if len({r["gpu"] for r in runs}) != 1:
        raise ValueError("runs from different GPUs cannot be combined")
    report = json.loads(json.dumps(runs[0]))
    report["command"] = " ; ".join(r["command"] for r in runs)
    report["combined_from"] = [{"command": r["command"], "settings": names} for r, names in zip(runs, taken)]
    report["elapsed_s"] = sum(r["elapsed_s"] for r in runs)
    settings, naive, speech, reserved = {}, {}, {}, {}
    for r, names in zip(runs, taken):
        for name in names:
            if name in settings:
                raise ValueError(f"setting {name} was measured by more than one run")
            settings[name] = r["settings"][name]
            for pooled, source in ((naive, r.get("naive") or {}), (reserved, r["memory"]["reserved_bytes_per_stream"])):
                if name in source:
                    pooled[name] = source[name]
        speech.update(r["memory"]["speech_cache_bytes"])
    order = list(SETTINGS)
    report["settings"] = {name: settings[name] for name in sorted(settings, key=order.index)}
    report["naive"] = {name: naive[name] for name in report["settings"] if name in naive}
    report["memory"]["speech_cache_bytes"], report["memory"]["reserved_bytes_per_stream"] = speech, reserved
    with_parts = [r for r in runs if r.get("parts")]
    if with_parts:
        report["parts"] = max(with_parts, key=lambda r: len(r["parts"]["decode"]))["parts"]
    m1 = [r for r, names in zip(runs, taken) if "greedy_m1" in names]
    report["memory_limit_streams"] = (m1 or runs)[0]["memory_limit_streams"]
    write_report(report, out)
