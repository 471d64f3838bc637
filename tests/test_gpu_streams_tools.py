"""The streams benchmark's bookkeeping (``benchmarks.gpu_streams``, ``benchmarks.lib``), without a GPU: an
out-of-memory trial is a failed trial and the sweep goes on; ``--combine`` joins runs that measured different
settings; the static baseline's scheduler."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks.lib import sweep, trials
from benchmarks.lib.report import combine_runs, verdict

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "docs" / "benchmarks" / "gpu_streams_runs"


def _bench(limit: int, out: Path) -> SimpleNamespace:
    return SimpleNamespace(
        memory_limit=lambda setting: limit,
        deadline=float("inf"),
        args=SimpleNamespace(seconds=60.0, out=str(out)),
    )


def test_out_of_memory_trial_fails_and_the_sweep_goes_on(monkeypatch, tmp_path):
    """Trials pass up to 120 streams, fail on latency up to 140 and run out of GPU memory above: the sweep records the
    out-of-memory trial as a failure and still brackets N* between a pass and a fail. Each trial is also appended to
    ``<out>.trials.jsonl`` as it ends (what a run cut off before its report keeps)."""

    def trial(bench, setting, n, scheduling, seed):
        if n > 140:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 390.00 MiB")
        return {"streams": n, "scheduling": scheduling, "passes": n <= 120, "wall_s": 1.0, "p95_s": 0.4}

    monkeypatch.setattr(trials, "_run_trial", trial)
    monkeypatch.setattr(sweep, "_print_trial", lambda setting, r: None)
    setting = trials.SETTINGS["greedy_m1"]
    result = sweep.sweep(_bench(296, tmp_path / "run"), setting, "iteration", start=100, budget_s=1e6, seed=0)
    tried = {t["streams"]: t for t in result["trials"]}
    oom = [t for t in result["trials"] if t.get("reason") == "out of memory"]
    assert oom and all(not t["passes"] and "out of memory" in t["error"] and t["streams"] > 140 for t in oom)
    assert result["n_star"] == max(n for n, t in tried.items() if t["passes"])
    assert 100 <= result["n_star"] <= 120
    assert result["first_fail"] > result["n_star"]
    saved = [json.loads(line) for line in (tmp_path / "run.trials.jsonl").read_text().splitlines()]
    assert [(t["setting"], t["streams"], t["passes"]) for t in saved] == [
        ("greedy_m1", t["streams"], t["passes"]) for t in result["trials"]
    ]


def test_combine_joins_runs_of_different_settings(tmp_path):
    m1, m2 = RUNS / "gpu_streams_m1_8f6ea59.json", RUNS / "gpu_streams_m2_beam4_8f6ea59.json"
    out = tmp_path / "combined"
    combine_runs([str(m1), str(m2)], out)
    report = json.loads(out.with_suffix(".json").read_text())
    runs = [json.loads(p.read_text()) for p in (m1, m2)]
    assert list(report["settings"]) == ["greedy_m1", "greedy_m2", "beam4_m2"]
    for name, s in report["settings"].items():  # every setting's figures from the run that measured it
        source = next(r for r in runs if name in r["settings"])
        assert s == source["settings"][name]
        assert report["naive"][name] == source["naive"][name]
    assert report["memory_limit_streams"] == runs[0]["memory_limit_streams"]
    assert report["parts"] == runs[0]["parts"]  # the run with the most batch sizes
    assert report["command"] == f"{runs[0]['command']} ; {runs[1]['command']}"
    table = out.with_suffix(".md").read_text()
    assert "| greedy_m1 | 242 | ≥60 | 7 |" in table and "| beam4_m2 | 90 | ≥40 | 8 |" in table  # static: one pass
    assert "| greedy_m2 | iteration | 290 | | | | | | no (out of GPU memory) |" in table
    with pytest.raises(ValueError, match="more than one run"):
        combine_runs([str(m1), str(m1)], tmp_path / "twice")


def test_combine_takes_the_named_settings_of_a_run(tmp_path):
    """``RUN.json:a,b`` takes only those settings: a setting measured again by a later run comes from that run."""
    m1, m2 = RUNS / "gpu_streams_m1_634b10b.json", RUNS / "gpu_streams_m2_beam4_634b10b.json"
    beam = RUNS / "gpu_streams_beam4_634b10b.json"
    out = tmp_path / "combined"
    combine_runs([str(m1), f"{m2}:greedy_m2", f"{beam}:beam4_m2"], out)
    report = json.loads(out.with_suffix(".json").read_text())
    runs = [json.loads(p.read_text()) for p in (m1, m2, beam)]
    assert list(report["settings"]) == ["greedy_m1", "greedy_m2", "beam4_m2"]
    assert report["settings"]["greedy_m2"] == runs[1]["settings"]["greedy_m2"]
    assert report["settings"]["beam4_m2"] == runs[2]["settings"]["beam4_m2"]
    assert report["naive"]["beam4_m2"] == runs[2]["naive"]["beam4_m2"]
    assert [c["settings"] for c in report["combined_from"]] == [["greedy_m1"], ["greedy_m2"], ["beam4_m2"]]
    combine_runs([f"{m2}:greedy_m2", f"{m1}:", f"{RUNS / 'gpu_streams_m1_8f6ea59.json'}:"], out)
    report = json.loads(out.with_suffix(".json").read_text())  # the last two for their decode/prefill tables only
    assert list(report["settings"]) == ["greedy_m2"]
    assert report["parts"] == json.loads((RUNS / "gpu_streams_m1_8f6ea59.json").read_text())["parts"]
    with pytest.raises(ValueError, match="did not measure greedy_m1"):
        combine_runs([f"{m2}:greedy_m1"], tmp_path / "missing")


def test_profile_host_profiles_the_first_trial_and_repeats_it(monkeypatch, tmp_path):
    """--profile-host: the first trial runs under cProfile and writes its host profile; it counts neither as a pass
    nor as a fail, and the sweep runs the same N again, unprofiled."""

    def busy_host_work(n):
        return sum(i * i for i in range(20_000 + n))

    def trial(bench, setting, n, scheduling, seed):
        busy_host_work(n)
        return {"streams": n, "scheduling": scheduling, "passes": n <= 120, "wall_s": 1.0, "p95_s": 0.4}

    monkeypatch.setattr(trials, "_run_trial", trial)
    monkeypatch.setattr(sweep, "_print_trial", lambda setting, r: None)
    bench = _bench(296, tmp_path / "run")
    bench.args.profile_host, bench.profiled = True, False
    setting = trials.SETTINGS["beam4_m2"]
    result = sweep.sweep(bench, setting, "iteration", start=100, budget_s=1e6, seed=0)
    first, second = result["trials"][:2]
    assert first["profiled"] and not first["passes"] and first["streams"] == second["streams"] == 100
    assert second["passes"] and not second.get("profiled")
    assert sum(bool(t.get("profiled")) for t in result["trials"]) == 1
    assert 100 <= result["n_star"] <= 120 and result["first_fail"] > 120
    profile = (tmp_path / "run.host_profile_beam4_m2_100.txt").read_text()
    assert "beam4_m2 trial at N=100" in profile and "busy_host_work" in profile
    assert "(profiled: not counted)" == verdict(first)


def test_a_report_written_again_keeps_its_hand_written_sections_and_marks_lower_bounds(tmp_path):
    """Writing a report over an existing one keeps everything from its first "(written by hand" section on; an N*
    that no failing trial bracketed (below the memory limit) is shown as a lower bound, its ratios as bounds."""
    m1 = RUNS / "gpu_streams_m1_634b10b.json"  # iteration 303 = the memory limit (exact); static 60, never failed
    out = tmp_path / "report"
    out.with_suffix(".md").write_text("# old table\n\n## Notes (written by hand, today)\n\nkeep me\n")
    combine_runs([str(m1)], out)
    text = out.with_suffix(".md").read_text()
    assert "# old table" not in text and text.endswith("## Notes (written by hand, today)\n\nkeep me\n")
    assert "| greedy_m1 | 303 | ≥60 | 5 | ≤5.0 | 60.6 |" in text
    combine_runs([str(RUNS / "gpu_streams_beam4_634b10b.json")], out)  # 68 with a fail at 75: exact
    assert "| beam4_m2 | 68 | ≥40 | 4 | ≤1.7 | 17.0 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".md").read_text().count("keep me") == 1


def test_the_static_baseline_lets_no_new_work_join_a_running_batch():
    """StaticScheduler: while any turn runs, only decode steps (a waiting prefill is due but does not run); with no
    turn running it schedules as the engine does. "iteration" is the engine's own Scheduler."""
    from benchmarks.lib.static_scheduler import StaticScheduler, scheduler_for
    from infinisst_backend.config import EngineConfig
    from infinisst_backend.engine.scheduler import DECODE, PREFILL, Scheduler

    def stream(i, turn_started=None, waiting=False):
        turn = None if turn_started is None else SimpleNamespace(started=turn_started, rows=[0])
        chunks = [SimpleNamespace(arrival=0.0)] if waiting else []
        return SimpleNamespace(id=i, m=1, turns_done=1, turn=turn, chunks=chunks, ready_for_prefill=waiting)

    cfg = EngineConfig(batch_timeout_s=0.0)
    running, waiting = [stream(0, turn_started=1.0), stream(1, turn_started=0.5)], [stream(2, waiting=True)]
    static, iteration = scheduler_for("static", cfg), scheduler_for("iteration", cfg)
    assert isinstance(static, StaticScheduler) and type(iteration) is Scheduler
    step = static.schedule(running + waiting, 28, now=10.0)
    assert step.phase == DECODE and [s.id for s in step.streams] == [1, 0]  # oldest turn first
    assert iteration.schedule(running + waiting, 28, now=10.0).phase == PREFILL  # new work joins at once
    assert static.schedule(waiting, 28, now=10.0).phase == PREFILL
    with pytest.raises(ValueError, match="scheduling"):
        scheduler_for("dynamic", cfg)
