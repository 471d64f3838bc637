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
    assert "not supported yet" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.parse_args([*base, "--concurrency", "1,x"])
    assert evaluate.parse_args([*base, "--concurrency", "1,8,32"]).concurrency == [1, 8, 32]
