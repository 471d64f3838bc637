"""client.evaluate and client.instances without a server: the plan, the send schedule, per-word timestamps, the
inputs' checks, and scoring a hand-made instances.log with OmniSTEval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client import evaluate, instances
from client.api import RequestRecord, StreamResult, TextPiece
from client.audio import sample_file


def test_plan_covers_every_file_and_fills_every_slot():
    plans = evaluate.plan_streams([3.0, 2.0, 1.0], concurrency=1, chunk_s=0.96)
    assert [(p.file_index, p.repeat, p.slot) for p in plans] == [(0, 0, 0), (1, 0, 0), (2, 0, 0)]
    assert plans[1].start_s == pytest.approx(plans[0].start_s + 3.0 + evaluate.SLOT_GAP_S)
    plans = evaluate.plan_streams([3.0, 2.0, 1.0], concurrency=5, chunk_s=0.96, seed=1)
    assert [(p.file_index, p.repeat, p.slot) for p in plans] == [(0, 0, 0), (1, 0, 1), (2, 0, 2), (0, 1, 3), (1, 1, 4)]
    assert all(0 <= p.start_s < 0.96 for p in plans) and len({p.start_s for p in plans}) == 5
    assert plans == evaluate.plan_streams([3.0, 2.0, 1.0], concurrency=5, chunk_s=0.96, seed=1)


def test_send_schedule_is_real_time_and_ordered():
    plans = evaluate.plan_streams([1.0, 0.5], concurrency=2, chunk_s=0.96)
    pieces = [[np.zeros(5120)] * 3 + [np.zeros(640)], [np.zeros(5120)] * 2]  # 1.0 s and 0.64 s cut in 0.32 s
    plans[1] = evaluate.PlannedStream(1, 1, 0, 1, plans[1].start_s, 0.5)
    sends = list(evaluate.send_schedule(plans, pieces, 0.32))
    assert [d for d, *_ in sends] == sorted(d for d, *_ in sends)
    first = [(d - plans[0].start_s, i, last) for d, j, i, last in sends if j == 0]
    assert first == [(pytest.approx(0.32), 0, False), (pytest.approx(0.64), 1, False),
                     (pytest.approx(0.96), 2, False), (pytest.approx(1.0), 3, True)]  # fmt: skip
    assert [last for _, j, _, last in sends if j == 1] == [False, True]


def _result() -> StreamResult:
    requests = [RequestRecord(16_000, 16_000, False, sent=10.0, done=10.5),
                RequestRecord(16_000, 32_000, True, sent=11.0, done=12.0)]  # fmt: skip
    pieces = [TextPiece(" Hal", 0, 0.96, 10.2, 0), TextPiece("lo Welt", 1, 0.96, 10.4, 0),
              TextPiece("en", 2, 2.0, 11.5, 1)]  # fmt: skip
    return StreamResult(1, "".join(p.text for p in pieces), pieces, requests, [], 10.0, 15_360)


def test_word_times_take_the_piece_of_the_last_character():
    units = instances.word_times(_result(), speech_start=9.0)
    assert [u.word for u in units] == ["Hallo", "Welten"]
    assert [u.cu_ms for u in units] == [1000.0, 2000.0]
    assert [u.ca_ms for u in units] == [pytest.approx(1400.0), pytest.approx(2500.0)]
    assert [u.wall_ms for u in units] == [pytest.approx(1400.0), pytest.approx(2500.0)]
    # lag at FINALs: 10.5-9-1 = 0.5 s at 1 s of audio, 12-9-2 = 1 s at 2 s: drift 0.5 s per s
    assert instances.lag_drift(_result(), speech_start=9.0) == pytest.approx(0.5)


def test_instances_log_scores_with_omnisteval(tmp_path):
    pytest.importorskip("omnisteval")
    record = instances.instance_record(0, "a.wav", "Hallo Welten", _result(), 9.0, file_index=0)
    assert record["prediction"] == "Hallo Welten" and record["source_length"] == 2000.0
    log = tmp_path / "instances.log"
    instances.write_instances(log, [record])
    assert instances.read_instances(log) == [json.loads(json.dumps(record))]
    scores = instances.omnisteval_scores(log)
    assert scores["chrf"] == pytest.approx(100.0)
    # gamma = 2 words / 2000 ms: YAAL = mean(1000 - 0, 2000 - 1000) = 1000 ms; CA: mean(1400, 2500 - 1000)
    assert scores["long_yaal"] == pytest.approx(1000.0)
    assert scores["ca_long_yaal"] == pytest.approx(1450.0)


def test_missing_audio_file_is_named(tmp_path):
    (tmp_path / "src.txt").write_text("nowhere.wav\n")
    (tmp_path / "ref.txt").write_text("Hallo.\n")
    with pytest.raises(evaluate.EvaluationError, match="nowhere.wav"):
        evaluate.read_inputs(tmp_path / "src.txt", tmp_path / "ref.txt")
    with pytest.raises(evaluate.EvaluationError, match="no such file"):
        evaluate.read_inputs(tmp_path / "missing.txt", tmp_path / "ref.txt")


def test_inputs_relative_to_the_source_list_and_counted(tmp_path):
    (tmp_path / "a.wav").write_bytes(Path(sample_file("en/hello_world.wav")).read_bytes())
    (tmp_path / "src.txt").write_text("a.wav\n")
    (tmp_path / "ref.txt").write_text("Hallo.\n\n")
    files, refs = evaluate.read_inputs(tmp_path / "src.txt", tmp_path / "ref.txt")
    assert files == [tmp_path / "a.wav"] and refs == ["Hallo."]
    (tmp_path / "ref.txt").write_text("Hallo.\nWelt.\n")
    with pytest.raises(evaluate.EvaluationError, match="1 files but .* 2 references"):
        evaluate.read_inputs(tmp_path / "src.txt", tmp_path / "ref.txt")


def test_other_sample_rates_are_resampled_with_a_note(tmp_path, caplog):
    import soundfile as sf

    sf.write(tmp_path / "a.wav", np.zeros(8000, np.float32), 8000)
    with caplog.at_level("WARNING"):
        (audio,) = evaluate.load_sources([tmp_path / "a.wav"])
    assert audio.shape == (16_000,) and "8000 Hz, resampled" in caplog.text


def test_cli_errors(tmp_path, capsys):
    base = ["--source", "s.txt", "--target", "r.txt", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        evaluate.parse_args([*base, "--segments", "talks.yaml"])
    assert "exactly one of --source" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.parse_args([*base, "--wav-dir", "wavs"])
    assert "--wav-dir goes with --segments" in capsys.readouterr().err
    args = evaluate.parse_args(["--segments", "t.yaml", "--wav-dir", "w", "--target", "r.txt", "--out", "o"])
    assert args.segments == Path("t.yaml") and args.wav_dir == Path("w") and args.source is None
    with pytest.raises(SystemExit):
        evaluate.parse_args([*base, "--concurrency", "1,x"])
    assert evaluate.parse_args([*base, "--concurrency", "1,8,32"]).concurrency == [1, 8, 32]


def _talks_yaml(folder: Path, body: str, references: list[str]) -> tuple[Path, Path]:
    (folder / "talks.yaml").write_text(body)
    (folder / "ref.txt").write_text("".join(f"{r}\n" for r in references))
    return folder / "talks.yaml", folder / "ref.txt"


TALKS_YAML = """\
- {duration: 1.5, offset: 2.0, speaker_id: spk.1, wav: a.wav}
- {duration: 0.5, offset: 0.25, speaker_id: spk.1, wav: a.wav}
- {duration: 1.0, offset: 0.0, speaker_id: spk.2, wav: b.wav}
"""


def test_segments_are_grouped_by_wav_and_sorted(tmp_path):
    wavs = tmp_path / "wav"
    wavs.mkdir()
    for name in ("a.wav", "b.wav"):
        (wavs / name).write_bytes(b"")
    yaml_path, ref = _talks_yaml(tmp_path, TALKS_YAML, ["A zwei.", "A eins.", "B eins.", ""])
    talks = evaluate.read_segments(yaml_path, ref, wav_dir=wavs)
    assert [t.wav for t in talks] == [wavs / "a.wav", wavs / "b.wav"]
    assert [(s.offset_s, s.duration_s, s.reference) for s in talks[0].segments] == [
        (0.25, 0.5, "A eins."),
        (2.0, 1.5, "A zwei."),
    ]
    assert talks[0].end_s == 3.5 and talks[0].reference == "A eins. A zwei." and talks[1].reference == "B eins."
    assert talks[0].segments[0].speaker_id == "spk.1"
    assert talks[1].scoring_segments() == [(0.0, 1.0, "B eins.")]


def test_segment_errors(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    yaml_path, ref = _talks_yaml(tmp_path, TALKS_YAML, ["1", "2", "3"])
    with pytest.raises(evaluate.EvaluationError, match="missing audio file.*b.wav"):
        evaluate.read_segments(yaml_path, ref)  # relative to the YAML's folder: a.wav is there, b.wav is not
    (tmp_path / "b.wav").write_bytes(b"")
    assert len(evaluate.read_segments(yaml_path, ref)) == 2
    yaml_path, ref = _talks_yaml(tmp_path, TALKS_YAML, ["1", "2"])
    with pytest.raises(evaluate.EvaluationError, match="3 segments but .* 2 references"):
        evaluate.read_segments(yaml_path, ref)
    for body, match in [
        ("- {duration: 1.0, offset: [0\n", "not valid YAML"),
        ("duration: 1.0\n", "non-empty YAML list"),
        ("- {duration: 1.0, wav: a.wav}\n", "segment 1 must be a mapping with duration, offset and wav"),
        ("- {duration: x, offset: 0, wav: a.wav}\n", "must be numbers"),
        ("- {duration: 0, offset: 0, wav: a.wav}\n", "duration > 0"),
    ]:
        yaml_path, ref = _talks_yaml(tmp_path, body, ["1"])
        with pytest.raises(evaluate.EvaluationError, match=match):
            evaluate.read_segments(yaml_path, ref)
    with pytest.raises(evaluate.EvaluationError, match="no such file"):
        evaluate.read_segments(tmp_path / "none.yaml", ref)


def test_longform_log_scores_like_omnisteval_longform(tmp_path):
    pytest.importorskip("omnisteval")
    from omnisteval import evaluate_instances
    from omnisteval.io import load_resegmentation_inputs
    from omnisteval.resegment import resegment

    # one talk of two segments (0-2 s, 2.5-4 s), played twice (two streams); made-up word timings
    talk = [(0.0, 2.0, "Hallo Welt ."), (2.5, 1.5, "Wie geht es ?")]
    words = "Hallo Welt . Wie geht es ?".split()
    delays = [640.0, 1280.0, 1920.0, 2880.0, 3200.0, 3840.0, 4000.0]
    records = [
        {"index": j, "prediction": " ".join(words), "delays": delays, "elapsed": [d + 100.0 * (j + 1) for d in delays],
         "wall_clock": [d + 300.0 for d in delays], "source_length": 4000.0, "reference": "Hallo Welt . Wie geht es ?",
         "source": ["talk.wav"], "file_index": 0, "text": " ".join(words), "chunk_latencies_s": [0.1],
         "lag_drift": None, "errors": []}
        for j in range(2)
    ]  # fmt: skip
    log = tmp_path / "instances.log"
    instances.write_instances(log, records)
    scores = instances.omnisteval_scores(log, [talk])
    assert scores["bleu"] == pytest.approx(100.0) and scores["chrf"] == pytest.approx(100.0)

    # OmniSTEval's own long-form path on the first stream, with the files its CLI takes
    (tmp_path / "talk.yaml").write_text(
        "- {duration: 2.0, offset: 0.0, speaker_id: s, wav: talk.wav}\n"
        "- {duration: 1.5, offset: 2.5, speaker_id: s, wav: talk.wav}\n"
    )
    (tmp_path / "ref.txt").write_text("Hallo Welt .\nWie geht es ?\n")
    instances.write_instances(tmp_path / "one.log", records[:1])
    ref_words, hyp_words, segmentation, refs = load_resegmentation_inputs(
        str(tmp_path / "talk.yaml"), None, str(tmp_path / "ref.txt"), str(tmp_path / "one.log")
    )
    direct, _ = resegment(ref_words, hyp_words, segmentation, refs)
    assert [i.prediction for i in direct] == ["Hallo Welt .", "Wie geht es ?"]
    assert direct[1].emission_cu == [380.0, 700.0, 1340.0, 1500.0]  # relative to the segment's offset
    expected, _, _ = evaluate_instances(direct, is_longform=True, fix_emission_ca_flag=True)
    ours = instances.resegment_longform(records[:1], [talk])
    assert [(i.prediction, i.reference, i.emission_cu, i.emission_ca) for i in ours] == [
        (i.prediction, i.reference, i.emission_cu, i.emission_ca) for i in direct
    ]
    one = instances.omnisteval_scores(tmp_path / "one.log", [talk])
    for key in ("bleu", "chrf", "long_yaal", "ca_long_yaal", "long_laal", "ca_long_laal"):
        assert one[key] == pytest.approx(expected[key]), key
    assert scores["long_yaal"] == pytest.approx(one["long_yaal"])  # both streams have the same CU timings
    assert scores["ca_long_yaal"] > one["ca_long_yaal"]  # the second stream's CA times are later
    wall = instances.omnisteval_scores(log, [talk], "wall_clock")["ca_long_yaal"]
    assert scores["long_yaal"] < wall <= scores["long_yaal"] + 300.0  # every word 300 ms later on the wall clock

    run = evaluate.score_run(log, 1, "de", records, [evaluate.Talk(Path("talk.wav"), tuple(
        evaluate.Segment(o, d, r) for o, d, r in talk))])  # fmt: skip
    assert run["streams"] == 2 and run["bleu"] == pytest.approx(100.0) and run["identical_to_n1"] == 1.0
    assert run["longyaal_cu_ms"] == pytest.approx(scores["long_yaal"]) and run["bleu_delta_vs_n1"] == 0.0
