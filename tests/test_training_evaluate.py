"""training.evaluate and client.metrics: the held-out evaluation through the streaming engine, on the tiny random
demo checkpoint (float64) and a small corpus built here through training.data.

The tool runs end to end in its three modes and writes its reports; a stream's output, run among others in the
tool's batches, equals the same stream run alone with ``Engine.run_until_idle``; the WER normalisation and the
scores are right; the parity comparison finds the first differing step and the reference's margin there.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip(
    "espeakng_loader", reason="requirements-train.txt is not installed (scripts/setup_training_data.sh)"
)
pytest.importorskip("jiwer")
pytest.importorskip("sacrebleu")

from client import metrics  # noqa: E402
from infinisst_backend.engine.engine import Engine  # noqa: E402
from infinisst_backend.model import demo  # noqa: E402
from infinisst_backend.model.checkpoint import load_checkpoint  # noqa: E402
from tests.support import collect, small_corpus_records  # noqa: E402
from training import evaluate  # noqa: E402
from training.data import corpus  # noqa: E402
from training.data.dataset import heldout_set  # noqa: E402

HELDOUT = dict(max_seconds=6.0, min_seconds=3.0)
HELDOUT_ARGS = ["--max-seconds", "6", "--min-seconds", "3"]


# --- fixtures: a checkpoint that also knows English, a small corpus --------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny random demo checkpoint (build/demo_checkpoint when it is there), with English added to its prompt's
    languages so that the WER path runs too (files linked, config.json rewritten)."""
    source = evaluate.PROJECT_ROOT / "build" / "demo_checkpoint"
    if not demo.is_demo_checkpoint(source, 0):
        source = demo.build_demo_checkpoint(tmp_path_factory.mktemp("demo"))
    out = tmp_path_factory.mktemp("checkpoint")
    for path in source.iterdir():
        if path.name != "config.json":
            (out / path.name).symlink_to(path.resolve())
    config = json.loads((source / "config.json").read_text())
    config["prompt"]["languages"]["en"] = "English"
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    records = small_corpus_records(60, 30)
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl.xz"
    corpus.write_corpus(records, path)
    return path


@pytest.fixture(scope="module")
def heldout_run(checkpoint, corpus_file, tmp_path_factory):
    """The tool's held-out mode on 3 utterances, every language, m = 1 and 2, 4 streams at once."""
    out = tmp_path_factory.mktemp("eval") / "eval"
    hyps = out.with_name("hyps.jsonl")
    argv = ["--checkpoint", str(checkpoint), "--corpus", str(corpus_file), "--languages", "en,es,de", "--m", "1,2"]
    argv += ["--n", "3", "--device", "cpu", "--dtype", "float64", "--streams", "4", *HELDOUT_ARGS]
    argv += ["--out", str(out), "--hyps", str(hyps)]
    assert evaluate.main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    rows = [json.loads(line) for line in hyps.read_text().splitlines()]
    return report, rows, out


# --- metrics ---------------------------------------------------------------------------------------------------------


def test_normalize_text():
    assert metrics.normalize_text("  Hello,   World! ") == "hello world"
    assert metrics.normalize_text("Don't stop — it’s 3.50 $, (really)?") == "dont stop its 3 50 really"
    assert metrics.normalize_text("well-known\tGOP\n1920s") == "well known gop 1920s"
    assert metrics.normalize_text("«Señor» Müller.") == "señor müller"
    assert metrics.normalize_text("...") == ""


def test_scores():
    refs = ["The cat sat on the mat.", "Hello world"]
    assert metrics.corpus_wer(["the cat sat on the mat", "hello, World!"], refs) == 0.0
    # one substitution and one deletion over 8 reference words
    assert metrics.corpus_wer(["the dog sat on the mat", "hello"], refs) == pytest.approx(2 / 8)
    assert metrics.corpus_wer(["", ""], refs) == 1.0
    assert metrics.utterance_wer("the cat sat", refs[0]) == pytest.approx(3 / 6)
    es = metrics.score("es", ["el gato se sentó en la alfombra roja"], ["el gato se sentó en la alfombra roja"])
    assert es.bleu == pytest.approx(100.0) and es.chrf == pytest.approx(100.0) and es.wer is None
    assert metrics.score("de", ["ganz anders"], ["das ist ein Satz"]).bleu < 10
    assert metrics.length_ratio("one two three", "one two") == 1.5
    en = metrics.score("en", ["a b", "c"], ["a b", "c d"])
    assert en.to_dict() == {"count": 2, "length_ratio": 0.75, "wer": 0.25}
    with pytest.raises(ValueError, match="hypotheses"):
        metrics.corpus_wer(["a"], ["a", "b"])


# --- held-out mode ---------------------------------------------------------------------------------------------------


def test_heldout_report(heldout_run):
    report, rows, out = heldout_run
    for key in ("command", "checkpoint", "device", "dtype", "git", "engine_config", "heldout", "results", "timing"):
        assert key in report
    assert report["checkpoint"]["weights_sha256"] and len(report["checkpoint"]["weights_sha256"]) == 64
    assert report["command"].startswith("python -m training.evaluate --checkpoint")
    assert report["heldout"]["utterances"] == 3 and report["stream_errors"] == []
    assert report["engine_config"]["attention_backend"] == "torch" and report["dtype"] == "float64"
    # the server's decoding and batching (config.pbtxt), not the tool's own
    assert report["engine_config"]["decoding"]["repetition_penalty"] == 1.2
    results = {(r["language"], r["m"]): r for r in report["results"]}
    assert {("en", 1), ("en", 2), ("es", 1), ("es", 2)} <= set(results)
    for (language, _), r in results.items():
        assert r["count"] >= 1 and r["length_ratio"] >= 0
        if language == "en":
            assert 0 <= r["wer"] and len(r["examples"]) == min(3, r["count"]) and "meets_target" in r
        else:
            assert "examples" not in r and 0 <= r["bleu"] <= 100 and 0 <= r["chrf"] <= 100
    # German only where the utterance has it (Ding sentences)
    assert sum(r["language"] == "de" for r in rows) == 2 * results.get(("de", 1), {"count": 0})["count"]
    markdown = out.with_suffix(".md").read_text()
    assert "| en | 1 |" in markdown and report["command"] in markdown
    for row in rows:  # no GPL reference text reaches the report
        if row["language"] != "en":
            assert row["reference"] not in markdown and row["reference"] not in json.dumps(report)
    assert all(row["turns"] >= 1 for row in rows)


def test_batched_streams_equal_each_stream_alone(heldout_run, checkpoint, corpus_file):
    """Each stream's text from the tool (4 at once, 0.32 s pieces) equals the stream alone, all audio at once."""
    report, rows, _ = heldout_run
    utterances = {u.id: u for u in heldout_set(corpus_file, n=3, **HELDOUT)}
    model, tokenizer, model_cfg = load_checkpoint(checkpoint, dtype="float64")
    cfg = evaluate.server_engine_config(checkpoint, "cpu", "float64", "torch")
    assert cfg.batch_timeout_s == report["engine_config"]["batch_timeout_s"]
    for row in rows[:4]:
        engine = Engine(model, tokenizer, model_cfg, cfg)
        engine.open_stream("solo", row["language"], row["m"])
        engine.add_audio("solo", utterances[row["source"]].audio, tag=0, end=True)
        engine.run_until_idle()
        alone = collect(engine.events, "solo")
        assert alone["finished"] == "end" and not alone["errors"]
        assert row["hypothesis"] == alone["text"] and row["turns"] == len(alone["turns"])


def test_stream_all_runs_every_job_with_few_slots(checkpoint):
    model, tokenizer, model_cfg = load_checkpoint(checkpoint, dtype="float64")
    engine = Engine(model, tokenizer, model_cfg, evaluate.server_engine_config(checkpoint, "cpu", "float64"))
    rng = np.random.default_rng(0)
    jobs = [evaluate.StreamJob(f"j{i}", (0.1 * rng.standard_normal(n)).astype(np.float32), "es", 1) for i, n in
            enumerate([0, 7_000, 20_000])]  # fmt: skip
    outputs = evaluate.stream_all(engine, jobs, max_active=2)
    assert [outputs[j.id].finished for j in jobs] == ["end"] * 3
    assert [len(outputs[j.id].turns) for j in jobs] == [0, 1, 2]
    assert engine.runner.pool.num_free == engine.runner.pool.num_pages


# --- WAV mode --------------------------------------------------------------------------------------------------------


def test_wav_mode(checkpoint, tmp_path, capsys):
    pytest.importorskip("pytest_audioeval")
    files = evaluate.resolve_wavs("audioeval:en")
    assert {f.name for f in files} >= {"hello_world.wav", "counting.wav"}
    text = " ".join(files[0].with_suffix(".txt").read_text().split())
    assert evaluate.wav_references(files[:1], None, None) == [text]
    out = tmp_path / "human"
    argv = ["--checkpoint", str(checkpoint), "--wav", "audioeval:en/hello_world.wav", "--languages", "en", "--m", "1"]
    assert evaluate.main([*argv, "--dtype", "float64", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    (result,) = report["results"]
    assert result["count"] == 1 and result["clips"][0]["reference"] == "Hello world." and result["wer"] >= 0
    assert "hello_world.wav" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--ref-file"):
        evaluate.wav_references(files, "one text", None)
    with pytest.raises(FileNotFoundError, match="no reference"):
        wav = tmp_path / "x.wav"
        wav.write_bytes(b"")
        evaluate.wav_references([wav], None, None)


# --- parity ----------------------------------------------------------------------------------------------------------


def test_first_difference_and_compare_turns():
    assert evaluate.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert evaluate.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert evaluate.first_difference([1, 2], [1, 2, 3]) == 2  # one ended (EOS) where the other went on
    ref = {"s": evaluate.StreamOutput(turns=[[1, 2], [3], [4, 5]])}
    cand = {"s": evaluate.StreamOutput(turns=[[1, 2], [3, 9], [4, 6]])}
    margins = {"s": [[5.0, 4.0, 3.0], [2.0, 0.05], [1.0, 0.7, 0.2]]}
    out = evaluate.compare_turns(cand, ref, margins)
    assert out["turns"] == 3 and out["identical_turns"] == 1 and out["differing_turns"] == 2
    assert out["differences"][0] == {"stream": "s", "turn": 1, "step": 1, "ref_margin": 0.05, "first_in_stream": True}
    assert out["differences"][1]["ref_margin"] == 0.7 and not out["differences"][1]["first_in_stream"]
    assert out["max_ref_margin_at_first_differing_turns"] == 0.05 and out["criterion_met"]


def test_parity_smoke_on_cpu(checkpoint, corpus_file, tmp_path):
    """On CPU both engines use torch attention: every turn identical, and the recorded margins line up with the
    turns (one per step: the emitted ids plus the ending step)."""
    out = tmp_path / "parity"
    argv = ["--checkpoint", str(checkpoint), "--corpus", str(corpus_file), "--parity", "--languages", "es", "--m", "1"]
    argv += ["--n", "1", "--device", "cpu", "--dtype", "float64", *HELDOUT_ARGS, "--out", str(out)]
    assert evaluate.main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    parity = report["parity"]
    assert report["smoke"] and parity["turns"] >= 1 and parity["turn_identical_fraction"] == 1.0
    assert parity["criterion_met"] and parity["differences"] == []

    model, tokenizer, model_cfg = load_checkpoint(checkpoint, dtype="float64")
    engine = Engine(model, tokenizer, model_cfg, evaluate.server_engine_config(checkpoint, "cpu", "float64"))
    recorder = evaluate.MarginRecorder(engine)
    (utt,) = heldout_set(corpus_file, n=1, **HELDOUT)
    outputs = evaluate.stream_all(engine, [evaluate.StreamJob("a", utt.audio, "es", 1)], 1)
    turns = outputs["a"].turns
    assert [len(m) for m in recorder.turns["a"]] == [len(t) + 1 for t in turns]
    assert all(m >= 0 for ms in recorder.turns["a"] for m in ms)


def test_clear_errors(checkpoint, corpus_file, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--checkpoint", str(tmp_path / "none"), "--corpus", str(corpus_file)])
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--checkpoint", str(checkpoint), "--corpus", str(tmp_path / "none.jsonl.xz")])
    assert "no corpus file" in capsys.readouterr().err
    argv = ["--checkpoint", str(checkpoint), "--wav", str(tmp_path / "missing.wav"), "--languages", "en"]
    assert evaluate.main([*argv, "--out", str(tmp_path / "x")]) == 1
    assert "no such audio file" in capsys.readouterr().err
