"""client.evaluate end to end: three short clips at N = 1 and 2 through the real tritonserver (tiny random demo
checkpoint: gibberish, but deterministic, so the plumbing is what is checked).

The outputs exist; OmniSTEval's own CLI and loader read ``instances.log``; the scores in ``scores.json`` are
computed again here from the logs with the libraries; greedy outputs at N = 2 equal N = 1; no errors; the report
writer turns the output into json/md/png.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("omnisteval")
pytest.importorskip("sacrebleu")

import sacrebleu  # noqa: E402
from omnisteval import YAALScorer  # noqa: E402
from omnisteval.io import load_shortform_instances  # noqa: E402
from omnisteval.scoring import LAALScorer  # noqa: E402

from client import evaluate, load_report  # noqa: E402
from client.audio import sample_file  # noqa: E402

pytestmark = pytest.mark.server

CLIPS = ["en/quick_brown_fox.wav", "en/counting.wav", "en/hello_world.wav"]
REFERENCES = ["Der schnelle braune Fuchs springt.", "Eins zwei drei vier fünf.", "Hallo Welt."]


@pytest.fixture(scope="module")
def evaluated(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    (root / "src.txt").write_text("".join(f"{sample_file(c)}\n" for c in CLIPS))
    (root / "ref.txt").write_text("".join(f"{r}\n" for r in REFERENCES))
    argv = ["--url", server.grpc_url, "--source", str(root / "src.txt"), "--target", str(root / "ref.txt")]
    argv += ["--language", "de", "--latency-multiplier", "1", "--concurrency", "1,2", "--out", str(root / "out")]
    assert evaluate.main([*argv, "--no-progress", "--timeout", "60"]) == 0
    return root / "out"


def test_outputs_and_invariance(evaluated):
    scores = json.loads((evaluated / "scores.json").read_text())
    runs = {run["concurrency"]: run for run in scores["runs"]}
    assert sorted(runs) == [1, 2]
    for n, run in runs.items():
        records = [json.loads(line) for line in (evaluated / f"N{n}" / "instances.log").read_text().splitlines()]
        assert len(records) == 3 and sorted(r["file_index"] for r in records) == [0, 1, 2]
        assert run["errors"] == 0 and all(r["errors"] == [] for r in records)
        assert run["identical_to_n1"] == 1.0 and run.get("bleu_delta_vs_n1", 0.0) == pytest.approx(0.0)
        assert "wer" not in run  # the target is not the source's language
        for r in records:
            words = r["prediction"].split()
            assert words and len(words) == len(r["delays"]) == len(r["elapsed"]) == len(r["wall_clock"])
            assert r["delays"] == sorted(r["delays"]) and r["delays"][-1] <= r["source_length"] + 1e-6
            assert all(ca >= cu for ca, cu in zip(r["elapsed"], r["delays"]))
        assert run["chunk_latency_p95_s"] > 0


def test_omnisteval_reads_the_log_and_scores_match(evaluated, tmp_path):
    scores = {run["concurrency"]: run for run in json.loads((evaluated / "scores.json").read_text())["runs"]}
    for n, run in scores.items():
        log = evaluated / f"N{n}" / "instances.log"
        records = [json.loads(line) for line in log.read_text().splitlines()]
        hyps, refs = [r["prediction"] for r in records], [r["reference"] for r in records]
        (tmp_path / f"ref{n}.txt").write_text("".join(f"{r}\n" for r in refs))
        out = tmp_path / f"N{n}"
        cli = [sys.executable, "-m", "omnisteval.cli", "shortform", "--hypothesis_file", str(log)]
        cli += ["--ref_sentences_file", str(tmp_path / f"ref{n}.txt"), "--word_level", "--output_folder", str(out)]
        subprocess.run(cli, check=True, capture_output=True, timeout=60)
        tsv = {k: float(v) for k, v in (line.split("\t") for line in (out / "scores.tsv").read_text().splitlines()[1:])
               if k in ("BLEU", "chrF", "YAAL (CU)", "YAAL (CA)", "LAAL (CU)", "LAAL (CA)")}  # fmt: skip
        expected = {"BLEU": "bleu", "chrF": "chrf", "YAAL (CU)": "yaal_cu_ms", "YAAL (CA)": "yaal_ca_ms"}
        expected |= {"LAAL (CU)": "laal_cu_ms", "LAAL (CA)": "laal_ca_ms"}
        assert tsv == pytest.approx({k: run[v] for k, v in expected.items()}, abs=1e-3)

        instances = load_shortform_instances(str(log), None, "delays", "elapsed")
        assert sacrebleu.corpus_bleu(hyps, [refs]).score == pytest.approx(run["bleu"])
        assert sacrebleu.corpus_chrf(hyps, [refs]).score == pytest.approx(run["chrf"])
        longyaal = YAALScorer(computation_aware=False, is_longform=True)(instances)
        assert longyaal == pytest.approx(run["longyaal_cu_ms"])
        assert YAALScorer(computation_aware=True, is_longform=True)(instances) == pytest.approx(run["longyaal_ca_ms"])
        assert LAALScorer(computation_aware=False)(instances) == pytest.approx(run["laal_cu_ms"])
        assert LAALScorer(computation_aware=True)(instances) == pytest.approx(run["laal_ca_ms"])
        assert run["longyaal_ca_ms"] >= run["longyaal_cu_ms"] > 0


def test_report_writer(evaluated, tmp_path):
    paths = load_report.write_report([evaluated], tmp_path / "quality_under_load", title="plumbing only")
    assert [p.name for p in paths] == ["quality_under_load.json", "quality_under_load.md", "quality_under_load.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert "| N | BLEU |" in paths[1].read_text()
    assert set(json.loads(paths[0].read_text())["by_latency_multiplier"]) == {"1"}


def test_unreachable_server_fails_before_any_stream(tmp_path):
    (tmp_path / "src.txt").write_text(f"{sample_file(CLIPS[0])}\n")
    (tmp_path / "ref.txt").write_text("Hallo.\n")
    argv = ["--url", "127.0.0.1:9", "--source", str(tmp_path / "src.txt"), "--target", str(tmp_path / "ref.txt")]
    assert evaluate.main([*argv, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert not (tmp_path / "out").exists()


def test_longform_talk(server, tmp_path):
    """The three clips as one talk (a MuST-C YAML of three segments) at N = 1: one instances.log line for the
    talk, scored with OmniSTEval's long-form path."""
    import numpy as np
    import soundfile as sf

    from client.audio import load_audio

    clips = [load_audio(sample_file(c)) for c in CLIPS]
    sf.write(tmp_path / "talk.wav", np.concatenate(clips), 16_000)
    offsets = np.cumsum([0] + [len(c) for c in clips[:-1]]) / 16_000
    (tmp_path / "talk.yaml").write_text(
        "".join(
            f"- {{duration: {len(c) / 16_000}, offset: {o}, speaker_id: s, wav: talk.wav}}\n"
            for c, o in zip(clips, offsets)
        )  # fmt: skip
    )
    (tmp_path / "ref.txt").write_text("".join(f"{r}\n" for r in REFERENCES))
    argv = ["--url", server.grpc_url, "--segments", str(tmp_path / "talk.yaml"), "--target", str(tmp_path / "ref.txt")]
    argv += ["--language", "de", "--latency-multiplier", "1", "--out", str(tmp_path / "out"), "--no-progress"]
    assert evaluate.main([*argv, "--timeout", "60"]) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "N1" / "instances.log").read_text().splitlines()]
    assert record["reference"] == " ".join(REFERENCES) and record["errors"] == []
    assert record["source_length"] == pytest.approx(sum(len(c) for c in clips) / 16, abs=1.0)
    assert len(record["prediction"].split()) == len(record["delays"]) == len(record["elapsed"]) > 0
    (run,) = json.loads((tmp_path / "out" / "scores.json").read_text())["runs"]
    assert run["streams"] == 1 and run["errors"] == 0 and run["identical_to_n1"] == 1.0
    assert run["longyaal_cu_ms"] is not None and run["longyaal_ca_ms"] >= run["longyaal_cu_ms"]
