"""Engine tests on CPU: scheduling invariance, scheduler properties, admission, bounded memory, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infinisst_backend.config import SAMPLES_PER_UNIT, DecodingConfig
from infinisst_backend.engine.admission import worst_case_pages
from infinisst_backend.engine.scheduler import DECODE, PREFILL
from infinisst_backend.errors import CapacityError, InvalidArgument, UnknownStream
from infinisst_backend.model.kv_cache import OutOfPages

from .support import build_tiny_model, collect, make_engine, random_audio, run_alone, split_randomly

LANGUAGES = ["German", "Chinese", "es", "fr"]
GREEDY = DecodingConfig(beam_size=1)
BEAM4 = DecodingConfig(beam_size=4)


@pytest.fixture(scope="module")
def bundle():
    return build_tiny_model("chatml", torch.float64)


@pytest.fixture(scope="module")
def llama_bundle():
    return build_tiny_model("llama3", torch.float64, seed=1)


def _interleaved_run(engine, streams, rng):
    """Feed every stream's pieces in a random global order, stepping the engine at random moments."""
    cursors = {sid: 0 for sid in streams}
    pending = list(streams)
    opened = set()
    while pending:
        sid = pending[int(rng.integers(len(pending)))]
        pieces, language, m, decoding = streams[sid]
        if sid not in opened:
            engine.open_stream(sid, language, m, decoding)
            opened.add(sid)
        k = cursors[sid]
        engine.add_audio(sid, pieces[k], tag=(sid, k), end=k == len(pieces) - 1)
        cursors[sid] += 1
        if cursors[sid] == len(pieces):
            pending.remove(sid)
        for _ in range(int(rng.integers(0, 4))):
            engine.step()
    engine.run_until_idle()


@pytest.mark.parametrize("decodings", [(GREEDY,), (BEAM4, GREEDY)], ids=["greedy", "beam4+greedy"])
def test_scheduling_invariance(bundle, decodings):
    """16 concurrent streams, mixed languages and m, random pieces and arrival order -> same ids as alone."""
    rng = np.random.default_rng(1234 + len(decodings))
    streams, audios = {}, {}
    for i in range(16):
        m = int(rng.integers(1, 4))
        seconds = float(rng.uniform(0.5, 8.0 if decodings[0] is GREEDY else 5.0))
        audio = random_audio(rng, seconds)
        decoding = decodings[i % len(decodings)]
        streams[f"s{i}"] = (split_randomly(rng, audio), LANGUAGES[i % len(LANGUAGES)], m, decoding)
        audios[f"s{i}"] = audio
    engine = make_engine(bundle, max_batch_size=6, max_llm_cache_tokens=100)
    evictions, batches = [], []  # evicted cuts; streams evicted together at each step's end
    compact_many = engine.runner.compact_many
    engine.runner.compact_many = lambda items: (
        evictions.extend(cut for _, _, cut in items),
        batches.append(len(items)),
        compact_many(items),
    )
    _interleaved_run(engine, streams, rng)
    assert max(r.num_rows for r in engine.step_records) > 1, "the run never batched"
    assert sum(len(collect(engine.events, sid)["turns"]) for sid in streams) > 30
    assert len(evictions) >= 3, "the LLM window never slid"
    if decodings == (GREEDY,):  # (the beam run evicts only a few times)
        assert max(batches) > 1, "no step evicted several streams together"
    for sid, (pieces, language, m, decoding) in streams.items():
        got = collect(engine.events, sid)
        alone = run_alone(bundle, audios[sid], language, m, decoding, max_llm_cache_tokens=100)
        assert got["errors"] == []
        assert got["finished"] == "end"
        assert len(got["turns"]) == -(-audios[sid].size // (SAMPLES_PER_UNIT * m))
        assert got["turns"] == alone["turns"], sid
        assert got["text"] == alone["text"]
        assert got["done"] == [(sid, k) for k in range(len(pieces))]
    assert engine.runner.pool.num_free == engine.runner.pool.num_pages
    # Most streams started on the pages of a live stream's system prompt (share_system_prompt); run_alone never can.
    assert engine.counters["shared_system_prompts"] >= 8


def test_shared_first_turns_prefill_the_later_turn_shape(bundle):
    """A first turn on a live stream's system-prompt pages prefills exactly as many tokens as a later turn (the shape
    CUDA graphs cover), and still gives the ids of the stream run alone."""
    rng = np.random.default_rng(5)
    engine = make_engine(bundle)
    lengths = []  # new tokens per sequence of every prefill
    prefill = engine.runner.prefill
    engine.runner.prefill = lambda seqs, parts: (
        lengths.extend(len(pre) + emb.shape[0] + len(suf) for pre, emb, suf in parts),
        prefill(seqs, parts),
    )[1]
    audio = {f"s{i}": random_audio(rng, 2.0) for i in range(4)}
    engine.open_stream("s0", "German", 1, GREEDY)
    engine.add_audio("s0", audio["s0"], end=True)
    engine.step()  # s0's first turn: the whole prompt
    for i, sid in enumerate(list(audio)[1:]):
        engine.open_stream(sid, "German", 1 + i % 2, GREEDY)
        engine.add_audio(sid, audio[sid], end=True)
    engine.run_until_idle()
    prompts = engine.prompts
    assert lengths[0] == prompts.first_turn("German", 1).num_tokens
    assert set(lengths[1:]) <= {prompts.next_turn(1).num_tokens, prompts.next_turn(2).num_tokens}, lengths
    assert engine.counters["shared_system_prompts"] == 3
    for sid in list(audio)[1:]:
        m = 1 + (int(sid[1:]) - 1) % 2
        assert collect(engine.events, sid)["turns"] == run_alone(bundle, audio[sid], "German", m, GREEDY)["turns"]
    assert engine.runner.pool.num_free == engine.runner.pool.num_pages


def test_llama3_template_streams(llama_bundle):
    """The llama3 template with a llama model runs the same engine (two streams, beam and greedy)."""
    rng = np.random.default_rng(7)
    engine = make_engine(llama_bundle)
    audio = {sid: random_audio(rng, 2.5) for sid in ("a", "b")}
    engine.open_stream("a", "de", 1, GREEDY)
    engine.open_stream("b", "zh", 2, BEAM4)
    for sid in audio:
        engine.add_audio(sid, audio[sid], end=True)
    engine.run_until_idle()
    for sid, m, dec, lang in (("a", 1, GREEDY, "de"), ("b", 2, BEAM4, "zh")):
        got = collect(engine.events, sid)
        assert got["turns"] == run_alone(llama_bundle, audio[sid], lang, m, dec)["turns"]
        assert all(len(t) <= 10 * m - 1 for t in got["turns"])


def test_scheduler_properties(bundle):
    """Prefill before decode, one phase per batch, batch <= max, every stream progresses, budget respected."""
    rng = np.random.default_rng(5)
    engine = make_engine(bundle, max_batch_size=4, max_prefill_tokens=120)
    checked = {"prefill": 0, "decode": 0}
    original = engine.scheduler.schedule

    def checking_schedule(streams, hint, now):
        step = original(streams, hint, now)
        if step is None:
            return None
        if step.phase == DECODE:
            assert not any(s.ready_for_prefill for s in streams), "decode ran while a prefill was ready"
            assert all(s.turn is not None for s in step.streams)
            assert step.num_rows <= 4
        else:
            assert step.phase == PREFILL
            assert all(s.turn is None and s.chunks for s in step.streams)
            assert len(step.streams) <= 4
            assert len(step.streams) == 1 or step.num_tokens <= 120
        checked[step.phase] += 1
        return step

    engine.scheduler.schedule = checking_schedule
    for i in range(10):
        engine.open_stream(i, LANGUAGES[i % 4], 1 + i % 2, BEAM4 if i % 3 == 0 else GREEDY)
    for _ in range(3):  # three chunks for everyone, arriving in bursts while others decode
        for i in range(10):
            engine.add_audio(i, random_audio(rng, 0.96 * (1 + i % 2)))
            if i % 5 == 4:
                for _ in range(4):
                    engine.step()
    for i in range(10):
        engine.add_audio(i, np.zeros(0, np.float32), end=True)
    engine.run_until_idle()
    assert checked["prefill"] > 3 and checked["decode"] > 3
    for i in range(10):
        got = collect(engine.events, i)
        assert len(got["turns"]) == 3 and got["finished"] == "end"
    assert max(r.num_rows for r in engine.step_records if r.phase == PREFILL) > 1


def test_admission_refuses_beyond_capacity(bundle):
    engine = make_engine(bundle, num_pages=400, max_llm_cache_tokens=160)
    opened = 0
    with pytest.raises(CapacityError, match="capacity") as info:
        for i in range(100):
            engine.open_stream(i, "German", 1, GREEDY)
            opened += 1
    assert info.value.code == "UNAVAILABLE"
    assert 1 <= opened < 100
    # The streams already admitted run normally to the end.
    rng = np.random.default_rng(0)
    for i in range(opened):
        engine.add_audio(i, random_audio(rng, 2.0), end=True)
    engine.run_until_idle()
    for i in range(opened):
        assert collect(engine.events, i)["finished"] == "end"
    engine.open_stream("late", "German", 1, GREEDY)  # room again once they have ended
    limited = make_engine(bundle, max_streams=2)
    limited.open_stream(1)
    limited.open_stream(2)
    with pytest.raises(CapacityError, match="max_streams"):
        limited.open_stream(3)


def test_ten_minute_stream_has_bounded_memory():
    """A 10-minute stream keeps its pages bounded (sliding window) and returns them all at the end."""
    # float32 and short turns (EOS likely) keep this under half a minute on 2 cores.
    fast = build_tiny_model("chatml", torch.float32, seed=4, eos_boost=8.0)
    engine = make_engine(fast, dtype="float32", max_llm_cache_tokens=150)
    engine.open_stream("long", "German", 4, GREEDY)
    rng = np.random.default_rng(3)
    peak, evictions = 0, []
    compact_many = engine.runner.compact_many
    engine.runner.compact_many = lambda items: (evictions.extend(c - k for _, k, c in items), compact_many(items))
    for _ in range(600 // 30):
        for _ in range(8):  # 30 s of audio in pieces, translated as it comes
            engine.add_audio("long", random_audio(rng, 30.0 / 8))
            while engine.step():
                stream = engine._streams["long"]
                peak = max(peak, engine.runner.pool.num_pages - engine.runner.pool.num_free)
                if stream.turn is None:
                    assert stream.kv.num_tokens <= stream.system_len + 150  # the window, after each turn
    assert stream.turns_done == int(600 / 3.84)
    assert len(evictions) > 50 and stream.kv.num_tokens > 100  # the window was in use and slid many times
    prompt_tokens = (engine.prompts.first_turn("German", 4).num_tokens, engine.prompts.next_turn(4).num_tokens)
    assert 0 < peak <= worst_case_pages(engine.cfg, 4, 1, stream.system_len, prompt_tokens)  # what admission uses
    assert stream.speech_cache.frames_cached <= fast[2].speech_encoder.max_cache_frames
    engine.add_audio("long", np.zeros(0, np.float32), end=True)
    engine.run_until_idle()
    assert collect(engine.events, "long")["finished"] == "end"
    assert engine.runner.pool.num_free == engine.runner.pool.num_pages


@pytest.mark.parametrize("m", [1, 2])
def test_full_length_turns_stay_within_the_admitted_pages(m):
    """Every turn as long as it may be (10m tokens, the last never fed) over a sliding window: a stream's pages
    never exceed what admission reserved for it (``worst_case_pages`` with the prompts' real lengths)."""
    bundle = build_tiny_model("chatml", torch.float32, seed=5, eos_boost=0.0)
    engine = make_engine(bundle, dtype="float32", max_llm_cache_tokens=120)
    engine.turn_length_hook = lambda m, max_new: max_new
    engine.open_stream("s", "German", m, GREEDY)
    reserved = engine.admission.reserved_pages  # the one open stream's reservation
    rng = np.random.default_rng(m)
    peak, lengths = 0, []
    for _ in range(int(24 / m)):
        engine.add_audio("s", random_audio(rng, 0.96 * m))
        while engine.step():
            peak = max(peak, engine.runner.pool.num_pages - engine.runner.pool.num_free)
    got = collect(engine.events, "s")
    lengths = [len(ids) for ids in got["turns"]]
    assert engine._streams["s"].turns_done == int(24 / m) and got["errors"] == []
    assert max(lengths) == 10 * m - 1  # full turns (the last token is never emitted)
    assert 0 < peak <= reserved


def test_a_failed_eviction_fails_only_its_stream(bundle):
    """Evictions run batched at the end of a step; one that fails (out of pages) fails its stream only."""
    rng = np.random.default_rng(21)
    audio = {sid: random_audio(rng, 6.0) for sid in ("a", "b", "bad")}
    engine = make_engine(bundle, max_llm_cache_tokens=60)
    failed = []  # sizes of the batches that held the bad stream's cache
    compact_many = engine.runner.compact_many

    def failing_compact_many(items):
        bad = engine._streams.get("bad")
        if bad is not None and any(seq is bad.kv for seq, _, _ in items):
            failed.append(len(items))
            raise OutOfPages("injected: no page for copy-on-write")
        compact_many(items)

    engine.runner.compact_many = failing_compact_many
    for sid in audio:
        engine.open_stream(sid, "German", 1, GREEDY)
        engine.add_audio(sid, audio[sid], tag=0, end=True)
    engine.run_until_idle()
    assert failed[0] > 1 and failed[1:] == [1]  # batched with others, then retried alone
    bad = collect(engine.events, "bad")
    assert bad["finished"] == "error" and [code for _, code, _ in bad["errors"]] == ["UNAVAILABLE"]
    for sid in ("a", "b"):
        got = collect(engine.events, sid)
        assert got["finished"] == "end" and got["errors"] == []
        assert got["turns"] == run_alone(bundle, audio[sid], "German", 1, GREEDY, max_llm_cache_tokens=60)["turns"]
    assert engine.runner.pool.num_free == engine.runner.pool.num_pages


def test_cancel_and_errors_leave_no_leak_and_no_damage(bundle):
    rng = np.random.default_rng(11)
    engine = make_engine(bundle)
    healthy_audio = random_audio(rng, 3.0)
    engine.open_stream("healthy", "German", 1, GREEDY)
    engine.open_stream("victim", "German", 1, BEAM4)
    engine.open_stream("bad", "German", 1, GREEDY)
    engine.add_audio("victim", random_audio(rng, 3.0))
    engine.add_audio("healthy", healthy_audio[:20000], tag=0)
    for _ in range(3):
        engine.step()
    engine.cancel_stream("victim")
    # Bad requests raise at once and change nothing.
    with pytest.raises(InvalidArgument, match="NaN"):
        engine.add_audio("bad", np.array([0.1, np.nan], np.float32))
    with pytest.raises(InvalidArgument, match="maximum per request"):
        engine.add_audio("bad", np.zeros(16000 * 61, np.float32))
    with pytest.raises(InvalidArgument, match="1-D"):
        engine.add_audio("bad", np.zeros((2, 3), np.float32))
    with pytest.raises(InvalidArgument, match="real numbers"):
        engine.add_audio("bad", np.array(["a"]))
    with pytest.raises(UnknownStream, match="start a new sequence"):
        engine.add_audio("never-opened", np.zeros(10, np.float32))
    with pytest.raises(InvalidArgument, match="already open"):
        engine.open_stream("healthy")
    with pytest.raises(InvalidArgument, match="Klingon"):
        engine.open_stream("x", "Klingon")
    with pytest.raises(InvalidArgument, match="latency multiplier"):
        engine.open_stream("y", "German", 5)
    engine.add_audio("healthy", healthy_audio[20000:], tag=1, end=True)
    engine.add_audio("bad", np.zeros(0, np.float32), end=True)
    engine.run_until_idle()
    victim = collect(engine.events, "victim")
    assert victim["finished"] == "cancelled"
    assert [code for _, code, _ in victim["errors"]] == ["CANCELLED"]
    with pytest.raises(UnknownStream):
        engine.add_audio("victim", np.zeros(10, np.float32))
    healthy = collect(engine.events, "healthy")
    assert healthy["turns"] == run_alone(bundle, healthy_audio, "German", 1, GREEDY)["turns"]
    assert healthy["done"] == [0, 1]
    assert collect(engine.events, "bad")["finished"] == "end"
    assert engine.runner.pool.num_free == engine.runner.pool.num_pages
    assert engine.admission.reserved_pages == 0 and engine.admission.open_streams == 0


def test_engine_thread_and_shutdown(bundle):
    """The background thread serves streams; shutdown gives every open request an error and frees all."""
    rng = np.random.default_rng(2)
    engine = make_engine(bundle)
    engine.start()
    engine.open_stream("a", "German", 1, GREEDY)
    audio = random_audio(rng, 2.0)
    engine.add_audio("a", audio, tag="a0", end=True)
    engine.open_stream("b", "German", 1, GREEDY)
    engine.add_audio("b", random_audio(rng, 0.5), tag="b0")  # no END: still open at shutdown
    import time

    deadline = time.monotonic() + 30
    while collect(list(engine.events), "a")["finished"] is None and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.shutdown()
    a, b = collect(engine.events, "a"), collect(engine.events, "b")
    assert a["finished"] == "end" and a["done"] == ["a0"]
    assert a["turns"] == run_alone(bundle, audio, "German", 1, GREEDY)["turns"]
    assert b["finished"] == "shutdown" and b["done"] == ["b0"] and b["errors"] == []
    assert engine.runner.pool.num_free == engine.runner.pool.num_pages
    # Requests still in flight at shutdown get an error (so the server can send their FINAL).
    idle = make_engine(bundle)
    idle.open_stream("c", "German", 1, GREEDY)
    idle.add_audio("c", random_audio(rng, 2.0), tag="c0")
    idle.step()  # the first chunk's turn is now running
    idle.shutdown()
    c = collect(idle.events, "c")
    assert c["finished"] == "shutdown" and [(t, code) for t, code, _ in c["errors"]] == [("c0", "UNAVAILABLE")]
    assert idle.runner.pool.num_free == idle.runner.pool.num_pages


def test_fault_in_one_stream_fails_only_that_stream(bundle):
    rng = np.random.default_rng(21)
    engine = make_engine(bundle)
    audio = {sid: random_audio(rng, 3.0) for sid in ("ok", "doomed")}

    def hook(stream_id):
        if stream_id == "doomed":
            raise RuntimeError("injected fault")

    engine.fault_hook = hook
    for sid in audio:
        engine.open_stream(sid, "German", 1, GREEDY)
        engine.add_audio(sid, audio[sid], tag=sid, end=True)
    engine.run_until_idle()
    doomed, ok = collect(engine.events, "doomed"), collect(engine.events, "ok")
    assert doomed["finished"] == "error" and [t for t, _, m in doomed["errors"] if "injected fault" in m] == ["doomed"]
    assert ok["finished"] == "end" and ok["errors"] == []
    assert ok["turns"] == run_alone(bundle, audio["ok"], "German", 1, GREEDY)["turns"]
    assert engine.runner.pool.num_free == engine.runner.pool.num_pages


def test_prefill_waits_for_a_fuller_batch_while_decodes_run(bundle):
    """A ready prefill is due when full or when its oldest chunk has waited batch_timeout_s; decodes run until."""
    rng = np.random.default_rng(11)
    engine = make_engine(bundle, batch_timeout_s=10.0, max_batch_size=3)
    hint = engine._system_len_hint
    for i in range(4):
        engine.open_stream(i, "German", 1, GREEDY)
    engine.add_audio(0, random_audio(rng, 0.96))
    engine._apply_inbox()
    streams = lambda: list(engine._streams.values())  # noqa: E731
    arrival = engine._streams[0].chunks[0].arrival
    assert engine.scheduler.schedule(streams(), hint, arrival + 1.0) is None  # idle and not due: wait
    assert 0 < engine.scheduler.wait_hint(streams(), arrival + 1.0) <= 9.0
    step = engine.scheduler.schedule(streams(), hint, arrival + 10.0)
    assert step.phase == PREFILL and [s.id for s in step.streams] == [0]
    engine._run(step, 0.0)
    if engine._streams[0].turn is None:
        pytest.skip("the turn ended at its first token; nothing to decode")
    for i in (1, 2):
        engine.add_audio(i, random_audio(rng, 0.96))
    engine._apply_inbox()
    later = engine._streams[1].chunks[0].arrival + 0.5
    step = engine.scheduler.schedule(streams(), hint, later)  # not due, not full: decode
    assert step.phase == DECODE and [s.id for s in step.streams] == [0]
    engine.add_audio(3, random_audio(rng, 0.96))
    engine._apply_inbox()
    step = engine.scheduler.schedule(streams(), hint, later)  # full (max_batch_size 3): at once
    assert step.phase == PREFILL and [s.id for s in step.streams] == [1, 2, 3]
    engine.run_until_idle()


def test_a_step_decodes_its_greedy_and_its_beam_streams_in_two_batches(bundle, monkeypatch):
    """After a prefill, the greedy streams' first tokens come from one batched greedy_step and the beam streams'
    (widths 2 and 3) from one batched beam_step, one device-to-host transfer each; later decode steps batch the
    beams too; every stream's output is what it gets alone."""
    import infinisst_backend.engine.step as step_module

    rng = np.random.default_rng(12)
    beam2, beam3 = DecodingConfig(beam_size=2), DecodingConfig(beam_size=3)
    decodings = {0: GREEDY, 1: beam2, 2: GREEDY, 3: GREEDY, 4: beam3, 5: beam2}
    audio = {i: random_audio(rng, 1.92) for i in decodings}
    engine = make_engine(bundle, batch_timeout_s=0.0, max_batch_size=32)
    for i, decoding in decodings.items():
        engine.open_stream(i, "German", 1, decoding)
        engine.add_audio(i, audio[i], tag="a", end=True)
    engine._apply_inbox()
    step = engine.scheduler.schedule(list(engine._streams.values()), engine._system_len_hint, 1e9)
    assert step.phase == PREFILL and sorted(s.id for s in step.streams) == list(decodings)
    batches = {"greedy_step": [], "beam_step": []}
    for name, batch in batches.items():
        real = getattr(step_module, name)
        monkeypatch.setattr(
            step_module,
            name,
            lambda turns, logits, real=real, batch=batch: (batch.append(len(turns)), real(turns, logits))[1],
        )
    engine._run(step, 0.0)
    assert batches == {"greedy_step": [3], "beam_step": [3]}
    engine.run_until_idle()
    assert max(batches["beam_step"]) == 3  # decode steps stepped the beam streams together
    for i, decoding in decodings.items():
        got, alone = collect(engine.events, i), run_alone(bundle, audio[i], "German", 1, decoding)
        assert got["turns"] == alone["turns"] and got["text"] == alone["text"] and not got["errors"], i


@pytest.mark.parametrize("where", ["_current", "_select"])
def test_a_failing_beam_step_fails_only_its_stream(bundle, monkeypatch, where):
    """One beam stream's decoder fails inside the batched beam step: before any turn stepped (``_current``: the
    engine then steps each stream alone) or while the turns walk their candidates (``_select``: the turns that
    stepped keep their steps and are not stepped twice). Only that stream ends with an error; the other beam stream
    still writes what it writes alone."""
    from infinisst_backend.text.decoding import BeamTurn

    real = getattr(BeamTurn, where)

    def failing(self, *args):
        if self.processors.penalty == 1.31:
            raise RuntimeError("injected beam fault")
        return real(self, *args)

    monkeypatch.setattr(BeamTurn, where, failing)
    rng = np.random.default_rng(13)
    decodings = {"doomed": DecodingConfig(beam_size=2, repetition_penalty=1.31), "ok": DecodingConfig(beam_size=2)}
    audio = {sid: random_audio(rng, 1.92) for sid in decodings}
    engine = make_engine(bundle, batch_timeout_s=0.0)
    for sid, decoding in decodings.items():
        engine.open_stream(sid, "German", 1, decoding)
        engine.add_audio(sid, audio[sid], tag=sid, end=True)
    engine.run_until_idle()
    doomed, ok = collect(engine.events, "doomed"), collect(engine.events, "ok")
    assert doomed["finished"] == "error" and any("injected beam fault" in m for _, _, m in doomed["errors"])
    assert ok["finished"] == "end" and ok["errors"] == [] and len(ok["turns"]) >= 1
    assert ok["turns"] == run_alone(bundle, audio["ok"], "German", 1, decodings["ok"])["turns"]
    assert engine.runner.pool.num_free == engine.runner.pool.num_pages


def test_kv_cache_dtype_other_than_the_compute_dtype(bundle):
    """kv_cache_dtype stores the LLM cache in another dtype (keys and values converted on write, attention in the
    compute dtype): a float64 model with a float32 cache writes the same turns, and a bad name is refused."""
    rng = np.random.default_rng(7)
    audio = random_audio(rng, 6.0)
    want = run_alone(bundle, audio, "German", 1, GREEDY)
    engine = make_engine(bundle, kv_cache_dtype="float32")
    assert engine.runner.kv.data.dtype == torch.float32 and engine.runner.model.dtype == torch.float64
    got = run_alone(bundle, audio, "German", 1, GREEDY, kv_cache_dtype="float32")
    assert got["turns"] == want["turns"] and len(want["turns"]) > 3 and not got["errors"]
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        make_engine(bundle, kv_cache_dtype="int8")
