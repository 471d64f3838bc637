"""The quality-under-load report: several ``client.evaluate`` outputs (one per latency multiplier m) as one table
and one plot.

    python -m client.load_report DIR_m1 DIR_m2 ... --out docs/benchmarks/quality_under_load [--title TEXT]

Each DIR holds a ``scores.json`` written by :mod:`client.evaluate`. Writes ``OUT.json`` (every run, by m and N),
``OUT.md`` (a table per m: BLEU/WER, chrF, LongYAAL CU / CA per chunk / CA wall-clock, chunk latency p50/p95/p99,
lag drift, identical to N = 1, errors) and ``OUT.png`` (BLEU against LongYAAL (CA), one point per m, one curve per
N).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = [
    ("N", "concurrency", "{:d}"),
    ("BLEU", "bleu", "{:.2f}"),
    ("WER", "wer", "{:.3f}"),
    ("chrF", "chrf", "{:.2f}"),
    ("LongYAAL CU (ms)", "longyaal_cu_ms", "{:.0f}"),
    ("LongYAAL CA (ms)", "longyaal_ca_ms", "{:.0f}"),
    ("LongYAAL wall (ms)", "longyaal_wall_ms", "{:.0f}"),
    ("chunk p50 (s)", "chunk_latency_p50_s", "{:.3f}"),
    ("chunk p95 (s)", "chunk_latency_p95_s", "{:.3f}"),
    ("chunk p99 (s)", "chunk_latency_p99_s", "{:.3f}"),
    ("lag drift (s/s)", "lag_drift_mean", "{:+.4f}"),
    ("identical to N=1", "identical_to_n1", "{:.2f}"),
    ("errors", "errors", "{:d}"),
]


def load_runs(dirs: list[Path]) -> dict[int, dict]:
    """``{m: scores.json}`` of each folder, keyed by its latency multiplier (1 when the server default ran)."""
    out = {}
    for d in dirs:
        scores = json.loads((d / "scores.json").read_text(encoding="utf-8"))
        m = scores.get("settings", {}).get("latency_multiplier") or 1
        if m in out:
            raise ValueError(f"two runs for m={m}: {d} and another folder")
        out[m] = scores
    return dict(sorted(out.items()))


def markdown(by_m: dict[int, dict], title: str) -> str:
    lines = [f"# {title}", ""]
    for m, scores in by_m.items():
        runs = scores["runs"]
        columns = [c for c in COLUMNS if any(r.get(c[1]) is not None for r in runs)]
        lines += [f"## m = {m}", "", "| " + " | ".join(c[0] for c in columns) + " |"]
        lines.append("|" + "---|" * len(columns))
        for run in runs:
            cells = ["-" if run.get(key) is None else fmt.format(run[key]) for _, key, fmt in columns]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(by_m: dict[int, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[int, list[tuple[float, float, int]]] = {}
    for m, scores in by_m.items():
        for run in scores["runs"]:
            if run.get("longyaal_ca_ms") is not None:
                curves.setdefault(run["concurrency"], []).append((run["longyaal_ca_ms"], run["bleu"], m))
    fig, ax = plt.subplots(figsize=(6, 4))
    for n, points in sorted(curves.items()):
        xs, ys, ms = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=f"N={n}")
        for x, y, m in points:
            ax.annotate(f"m={m}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("LongYAAL, computation-aware (ms)")
    ax.set_ylabel("BLEU")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(dirs: list[Path], out: Path, title: str = "Quality and latency under load") -> list[Path]:
    """Write ``out`` + ``.json``, ``.md``, ``.png``; returns the three paths."""
    by_m = load_runs(dirs)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_suffix(".json"), out.with_suffix(".md"), out.with_suffix(".png")]
    report = {"title": title, "by_latency_multiplier": {str(m): s for m, s in by_m.items()}}
    paths[0].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(by_m, title) + "\n", encoding="utf-8")
    plot(by_m, paths[2], title)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.load_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="client.evaluate output folders (one per m)")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    parser.add_argument("--title", default="Quality and latency under load")
    args = parser.parse_args(argv)
    for path in write_report(args.dirs, args.out, args.title):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
