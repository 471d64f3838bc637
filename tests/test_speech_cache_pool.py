"""Speech cache pool: ring-buffer slots shared by many streams, batched reads/writes, release and reuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from infinisst_backend.config import SAMPLES_PER_UNIT, DecodingConfig
from infinisst_backend.errors import CapacityError

from .support import build_tiny_model, collect, make_engine, random_audio
from .test_speech_encoder import audio, build, tiny_config


def chunk_plan(rng: np.random.Generator, m: int) -> list[int]:
    """Sample counts of a stream's chunks: mostly full, some partial ones mid-stream (they shift the block phase),
    often a partial last one; long enough streams wrap the ring several times."""
    full = SAMPLES_PER_UNIT * m
    sizes = [full if rng.random() < 0.9 else int(rng.integers(1, full)) for _ in range(int(rng.integers(1, 12)))]
    if rng.random() < 0.5:
        sizes.append(int(rng.integers(1, full)))
    return sizes


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equality of float64 storage bit for bit (unwritten pool rows may hold NaN patterns)."""
    return torch.equal(a.view(torch.int64), b.view(torch.int64))


@pytest.mark.parametrize(("window", "variant"), [(100, "interleaved"), (192, "half")])
def test_random_interleavings_match_alone_and_full(monkeypatch, window, variant):
    """Streams of every m, phase and length share a pool with fewer slots than streams, in random batches: each one
    matches the same stream encoded alone (outputs and cache) and the offline reference."""
    model = build(tiny_config(max_cache_frames=window, rope_variant=variant))
    rng = np.random.default_rng(window)
    groups = []
    encode_group = model.encode_group
    monkeypatch.setattr(
        model,
        "encode_group",
        lambda caches, chunks: (
            groups.append(([c.frames_encoded for c in caches], caches[0].frames_cached)),
            encode_group(caches, chunks),
        )[1],
    )
    pool = model.new_pool(5)
    waiting = []
    for i in range(16):
        m = int(rng.choice([1, 1, 1, 2, 2, 3, 4]))
        sizes = chunk_plan(rng, m)
        waiting.append(
            {"id": i, "m": m, "chunks": [audio(n, seed=100 * window + 20 * i + j) for j, n in enumerate(sizes)]}
        )
    active, slots_used, checked_full = [], [], 0
    while waiting or active:
        while waiting and pool.num_free and (not active or rng.random() < 0.6):
            s = waiting.pop(0)
            s.update(cache=model.new_cache(s["m"], pool), alone=model.new_cache(s["m"]), outs=[], next=0)
            slots_used.append(s["cache"].slot)
            active.append(s)
        batch = [s for s in active if rng.random() < 0.7] or [active[0]]
        rng.shuffle(batch)
        outs = model.encode_chunks([s["cache"] for s in batch], [s["chunks"][s["next"]] for s in batch])
        for s, out in zip(batch, outs):
            alone = model.encode_chunk(s["alone"], s["chunks"][s["next"]])
            torch.testing.assert_close(out, alone, rtol=0, atol=1e-12)
            s["outs"].append(out)
            s["next"] += 1
        for s in [s for s in batch if s["next"] == len(s["chunks"])]:
            cache, alone = s["cache"], s["alone"]
            assert cache.frames_encoded == alone.frames_encoded and cache.frames_cached == alone.frames_cached
            assert cache.frames_cached == min(cache.frames_encoded, window)
            assert torch.equal(cache.audio_tail, alone.audio_tail)
            for a, b in zip(cache.keys + cache.values, alone.keys + alone.values):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
            # The offline reference when every chunk but the last is full (after a shorter one, the next chunk
            # joins a block whose first frames were encoded without it, which only streaming does).
            if all(c.numel() == SAMPLES_PER_UNIT * s["m"] for c in s["chunks"][:-1]):
                full = model.encode_full(torch.cat(s["chunks"]), s["m"])
                torch.testing.assert_close(torch.cat(s["outs"]), full, rtol=0, atol=1e-10)
                checked_full += 1
            cache.release()
            active.remove(s)

    assert pool.num_free == pool.num_slots == 5 and len(slots_used) == 16  # every slot reused several times
    assert checked_full >= 4
    wraps = max(frames for encoded, _ in groups for frames in encoded) / window
    assert wraps > 3  # the ring wrapped several times
    # Some batches held streams with a full window at different ring offsets.
    assert any(len(set(encoded)) > 1 and cached == window for encoded, cached in groups)


def test_failed_call_leaves_every_cache_unchanged(monkeypatch):
    model = build()
    pool = model.new_pool(4)
    caches = [model.new_cache(m, pool) for m in (1, 1, 2, 4)]
    twins = [model.new_cache(m) for m in (1, 1, 2, 4)]
    for i, (cache, twin, chunks) in enumerate(zip(caches, twins, (5, 3, 2, 0))):
        for j in range(chunks):  # different lengths: some rings wrapped, one stream not started
            x = audio(SAMPLES_PER_UNIT * cache.m, seed=10 * i + j)
            model.encode_chunk(cache, x)
            model.encode_chunk(twin, x)

    def state():
        tails = [None if c.audio_tail is None else c.audio_tail.clone() for c in caches]
        return pool.data.clone(), [c.frames_encoded for c in caches], tails

    def assert_unchanged(before):
        data, frames, tails = before
        assert same_bits(pool.data, data) and [c.frames_encoded for c in caches] == frames
        for cache, tail in zip(caches, tails):
            assert (cache.audio_tail is None) == (tail is None)
            assert tail is None or torch.equal(cache.audio_tail, tail)

    before = state()
    good = [audio(SAMPLES_PER_UNIT * c.m - 5, seed=90 + i) for i, c in enumerate(caches)]
    released = model.new_cache(1)
    released.release()
    foreign = build(dtype=torch.float32).new_cache(1)
    bad_calls = [
        (caches, good[:3] + [torch.zeros(0)]),
        (caches, [torch.zeros(2, 10)] + good[1:]),
        (caches, good[:3] + [torch.zeros(4 * SAMPLES_PER_UNIT + 1)]),
        (caches + [released], good + [audio(100)]),
        (caches + [foreign], good + [audio(100)]),
    ]
    for call_caches, samples in bad_calls:
        with pytest.raises(ValueError):
            model.encode_chunks(call_caches, samples)
        assert_unchanged(before)

    # A failure after some groups were encoded: their results were not written yet.
    encoded = []
    encode_group = model.encode_group

    def fail_third(group, chunks):
        encoded.append(len(group))
        if len(encoded) == 3:
            raise RuntimeError("injected")
        return encode_group(group, chunks)

    monkeypatch.setattr(model, "encode_group", fail_third)
    with pytest.raises(RuntimeError, match="injected"):
        model.encode_chunks(caches, good)
    assert len(encoded) == 3
    assert_unchanged(before)
    monkeypatch.undo()

    # The streams go on as if the failed calls never came.
    for out, twin, x in zip(model.encode_chunks(caches, good), twins, good):
        torch.testing.assert_close(out, model.encode_chunk(twin, x), rtol=0, atol=1e-12)


def test_slots_are_released_and_reused():
    model = build()
    pool = model.new_pool(3)
    caches = [model.new_cache(1, pool) for _ in range(3)]
    assert sorted(c.slot for c in caches) == [0, 1, 2] and pool.num_free == 0
    with pytest.raises(CapacityError):
        model.new_cache(1, pool)
    for k in range(4):
        model.encode_chunks(caches, [audio(SAMPLES_PER_UNIT, seed=10 * k + i) for i in range(3)])

    slot = caches[1].slot
    caches[1].release()
    caches[1].release()  # a second release does nothing
    assert pool.num_free == 1 and caches[1].released
    with pytest.raises(ValueError, match="released"):
        model.encode_chunk(caches[1], audio(100))

    # A new stream in the reused slot sees none of the old stream's frames.
    fresh = model.new_cache(2, pool)
    assert fresh.slot == slot and fresh.frames_cached == 0 and fresh.audio_tail is None
    x = audio(3 * SAMPLES_PER_UNIT + 77, seed=5)
    outs = [
        model.encode_chunk(fresh, x[i : i + 2 * SAMPLES_PER_UNIT]) for i in range(0, x.numel(), 2 * SAMPLES_PER_UNIT)
    ]
    torch.testing.assert_close(torch.cat(outs), model.encode_full(x, 2), rtol=0, atol=1e-10)
    assert fresh.nbytes() == pool.slot_nbytes + model.tail_samples(2) * 8

    # Dropping the last reference gives the slot back too.
    del caches, fresh
    assert pool.num_free == 3

    # Open/close cycles on the frontend's default pool: it does not grow.
    for i in range(20):
        cache = model.new_cache(1 + i % 4)
        model.encode_chunk(cache, audio(1000, seed=i))
        cache.release()
    assert cache.pool.num_slots == 1 and cache.pool.num_free == 1


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_cache_ops_are_per_batch_not_per_stream():
    """Adding streams to a batch adds a few audio ops per stream, none per stream and layer."""
    layers = 12
    model = build(tiny_config(num_layers=layers))

    def ops(streams: int) -> int:
        caches = [model.new_cache(1) for _ in range(streams)]
        for k in range(3):  # 144 frames: the 100-frame window is full
            model.encode_chunks(caches, [audio(SAMPLES_PER_UNIT, seed=k)] * streams)
        with _CountOps() as counter:
            model.encode_chunks(caches, [audio(SAMPLES_PER_UNIT, seed=9)] * streams)
        return counter.count

    per_stream = (ops(6) - ops(2)) / 4
    assert per_stream < layers  # 7 today; copying each stream's K and V per layer made it 6 * layers + 7


def test_engine_returns_slots_to_its_pool():
    engine = make_engine(build_tiny_model(), max_streams=2)
    pool = engine.runner.speech_pool
    assert pool.num_slots == 2 and pool.num_free == 2 and not pool.growable
    rng = np.random.default_rng(0)
    for round_ in range(3):
        ended, cancelled = f"ended{round_}", f"cancelled{round_}"
        engine.open_stream(ended, "German", 1 + round_, DecodingConfig(beam_size=1))
        engine.open_stream(cancelled, "German", 1, DecodingConfig(beam_size=1))
        engine.add_audio(ended, random_audio(rng, 1.5), end=True)
        engine.add_audio(cancelled, random_audio(rng, 1.5))
        engine.step()
        assert pool.num_free == 0
        engine.cancel_stream(cancelled)
        engine.run_until_idle()
        assert collect(engine.events, ended)["finished"] == "end"
        assert collect(engine.events, cancelled)["finished"] == "cancelled"
        assert pool.num_free == 2


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("variant", ["interleaved", "half"])
def test_streams_of_any_age_form_one_group(monkeypatch, variant):
    """Streams past their first chunk batch together whatever their age (window partly or fully filled) and block
    phase: one group per (m, tail, chunk length), each stream as if encoded alone (float64, 1e-10 relative)."""
    window = 192  # 4 chunks at m=1: ages 1..3 have a partly filled window
    model = build(tiny_config(max_cache_frames=window, rope_variant=variant))
    pool = model.new_pool(24)
    full1, full2 = SAMPLES_PER_UNIT, 2 * SAMPLES_PER_UNIT
    plans = [(1, [full1] * age) for age in range(16)]  # age 0: its first chunk (a group of its own)
    # m=2 streams with a partial chunk somewhere: they are 48 frames out of block phase, at several ages.
    plans += [
        (2, [full2]),
        (2, [full1, full2]),
        (2, [full2, full1, full2]),
        (2, [full1] + [full2] * 5),
        (2, [full2] * 4),
    ]
    streams = []
    for i, (m, sizes) in enumerate(plans):
        chunks = [audio(n, seed=1000 * i + j) for j, n in enumerate(sizes)] + [audio(full1 * m, seed=1000 * i + 99)]
        cache, twin = model.new_cache(m, pool), model.new_cache(m)
        for x in chunks[:-1]:
            model.encode_chunk(cache, x)
            model.encode_chunk(twin, x)
        streams.append((m, chunks, cache, twin))
    assert {c.frames_cached for _, _, c, _ in streams} >= {0, 48, 96, 144, window}
    assert {c.frames_encoded % 96 for m, _, c, _ in streams if m == 2} == {0, 48}

    groups = []
    encode_group = model.encode_group
    monkeypatch.setattr(model, "encode_group", lambda c, x: (groups.append(len(c)), encode_group(c, x))[1])
    outs = model.encode_chunks([c for _, _, c, _ in streams], [chunks[-1] for _, chunks, _, _ in streams])
    assert sorted(groups) == [1, 5, 15]  # m=1 first chunk, m=2 (two phases, four ages), m=1 ages 1..15
    monkeypatch.undo()

    checked_full = 0
    for (m, chunks, cache, twin), out in zip(streams, outs):
        assert _rel_err(out, model.encode_chunk(twin, chunks[-1])) <= 1e-10
        assert cache.frames_encoded == twin.frames_encoded and torch.equal(cache.audio_tail, twin.audio_tail)
        for a, b in zip(cache.keys + cache.values, twin.keys + twin.values):
            assert _rel_err(a, b) <= 1e-10
        if all(x.numel() == SAMPLES_PER_UNIT * m for x in chunks):  # the offline reference (see the interleaving test)
            assert _rel_err(out, model.encode_full(torch.cat(chunks), m)[-12 * m :]) <= 1e-10
            checked_full += 1
    assert checked_full == 18


def test_encoder_graph_buffers_match_eager():
    """The CUDA-graph path's static buffers, run without graphs (capture=False, CPU float64): full chunks take it,
    first ones included, padded up to a bucket and split above the largest, next to eager groups in the same call;
    the outputs and caches equal the eager path's, and no slot outside the batch changes."""
    from infinisst_backend.runtime.encoder_graphs import EncoderGraphs, encode_chunks, encoder_buckets

    assert encoder_buckets(1) == [1] and encoder_buckets(30) == [1, 2, 4, 8, 16, 24, 30]
    assert encoder_buckets(300)[-4:] == [128, 192, 256, 300]
    model = build()  # window 100: full from the 3rd chunk at m=1, the 2nd at m=2
    pool, twins = model.new_pool(20), model.new_pool(20)
    graphs = EncoderGraphs(model, pool, max_batch=8, multipliers=[1, 2, 3], capture=False)
    assert graphs.buckets == [1, 2, 4, 8] and graphs.multipliers == [1, 2]  # 48*3 frames > the window
    with pytest.raises(ValueError, match="growable"):
        EncoderGraphs(model, model.new_cache(1).pool, max_batch=8, capture=False)

    pool.data.fill_(float("nan"))  # memory is not initialized: a stream's first chunk must clear what it reads
    ms = [1] * 12 + [2] * 4 + [3]
    caches = [model.new_cache(m, pool) for m in ms]
    eager = [model.new_cache(m, twins) for m in ms]
    idle = model.new_cache(1, pool)  # holds frames, never in a batch
    for k in range(3):
        model.encode_chunk(idle, audio(SAMPLES_PER_UNIT, seed=500 + k))

    def step(members, sizes, seed, replays):
        before = pool.data.clone()
        xs = [audio(n, seed=seed + i) for i, n in zip(members, sizes)]
        count = graphs.replays
        got = encode_chunks(model, [caches[i] for i in members], xs, graphs)
        expected = model.encode_chunks([eager[i] for i in members], xs)
        assert graphs.replays - count == replays
        for a, b in zip(got, expected):
            assert a.shape == b.shape and _rel_err(a, b) <= 1e-10
        for i in members:
            c, e = caches[i], eager[i]
            assert c.frames_encoded == e.frames_encoded and torch.equal(c.audio_tail, e.audio_tail)
            for a, b in zip(c.keys + c.values, e.keys + e.values):
                assert _rel_err(a, b) <= 1e-10
        touched = {caches[i].slot for i in members}
        for slot in set(range(pool.num_slots)) - touched:
            rows = slice(slot * pool.window, (slot + 1) * pool.window)
            assert same_bits(pool.data[:, :, rows], before[:, :, rows]), f"slot {slot} changed"

    full = {i: SAMPLES_PER_UNIT * m for i, m in enumerate(ms)}
    everyone = list(range(len(ms)))
    # First chunks replay too (the zero prefix is the CNN tail, every cached row masked): m=1 12 streams (buckets 8 +
    # 4), m=2 4 streams (bucket 4); m=3 has no graph.
    step(everyone, [full[i] for i in everyone], 0, replays=3)
    # Later chunks replay also while the window is still filling (48 and 96 frames of 100: rows before the stream's
    # start masked, its own compact positions): m=1 12 streams (buckets 8 + 4), m=2 4 streams (bucket 4).
    step(everyone, [full[i] for i in everyone], 100, replays=3)
    step(everyone, [full[i] for i in everyone], 200, replays=3)
    # m=1: stream 0 with a partial chunk (eager), 11 steady ones (8 + 3 in a bucket of 4); m=2: stream 12 with a
    # partial chunk (eager, out of block phase afterwards), 3 steady ones; m=3 eager. Three replays in one call.
    sizes = [full[i] for i in everyone]
    sizes[0], sizes[12] = 5000, SAMPLES_PER_UNIT - 7
    step(everyone, sizes, 300, replays=3)
    assert caches[12].frames_encoded % 96 == 48
    step([5, 12, 2, 14, 9], [full[i] for i in (5, 12, 2, 14, 9)], 400, replays=2)  # buckets 4 (3 streams) and 2
    step([13], [full[13]], 500, replays=1)
