"""The speech encoder's window kernel (:mod:`infinisst_backend.kernels.window_kernel`), run by Triton's CPU interpreter.

On a GPU the same kernel is compiled; ``tests/test_gpu.py`` checks it there bit for bit in bf16. The interpreter rounds
fp32 -> bf16 by truncation where the GPU rounds to nearest even, so on CPU bf16 results may differ from the reference
by a few units in the last place; fp32 is checked exactly.
"""

from __future__ import annotations

import pytest
import torch

from infinisst_backend.config import SAMPLES_PER_UNIT
from infinisst_backend.kernels import window_kernel
from infinisst_backend.model import speech_encoder
from infinisst_backend.model.speech_encoder import HalfRotary, InterleavedRotary
from tests.test_speech_encoder import audio, build, tiny_config

pytest.importorskip("triton")


@pytest.fixture
def interpreted(monkeypatch):
    """Kernels built from here on run in Triton's interpreter (on CPU tensors)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    window_kernel._kernel.cache_clear()
    window_kernel._attention_kernel.cache_clear()
    yield
    window_kernel._kernel.cache_clear()
    window_kernel._attention_kernel.cache_clear()


def reference(pool_k, pool_v, rows, new_k, new_v, rotary, key_offset):
    """The reference path's arithmetic: gather, concatenate, RoPE on every key."""
    k = torch.cat((pool_k[rows].transpose(1, 2), new_k.transpose(1, 2)), dim=2)
    v = torch.cat((pool_v[rows].transpose(1, 2), new_v.transpose(1, 2)), dim=2)
    return rotary(k, key_offset), v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_cls", [InterleavedRotary, HalfRotary])
@pytest.mark.parametrize("per_stream", [False, True])
def test_kernel_equals_the_reference_arithmetic(interpreted, dtype, rotary_cls, per_stream):
    """Rotated keys and values over ring rows in any order plus the chunk's frames, with one rotary table for all
    streams or one per stream (young streams' negative key offsets), for both RoPE layouts."""
    gen = torch.Generator().manual_seed(0)
    streams, heads, dim, cached, new, slots = 3, 2, 16, 20, 6, 5
    rotary = rotary_cls(dim, 10_000.0).to(dtype)
    pool_k, pool_v = (torch.randn(slots * cached, heads, dim, generator=gen).to(dtype) for _ in range(2))
    rows = torch.stack([torch.randperm(slots * cached, generator=gen)[:cached] for _ in range(streams)])
    new_k, new_v = (torch.randn(streams, new, heads, dim, generator=gen).to(dtype) for _ in range(2))
    offset = torch.tensor([[-3], [0], [-17]]) if per_stream else 0
    cos, sin = rotary.tables(offset, cached + new, new_k)  # [S, 1, L, D/2] per stream (k [S, H, L, D]) or [L, D/2]

    k, v = window_kernel.window_keys_values(pool_k, pool_v, rows, new_k, new_v, cos, sin, rotary.interleaved)
    want_k, want_v = reference(pool_k, pool_v, rows, new_k, new_v, rotary, offset)
    assert k.shape == v.shape == (streams, heads, cached + new, dim) and k.is_contiguous() and v.is_contiguous()
    assert torch.equal(v, want_v)
    if dtype == torch.float32:
        assert torch.equal(k, want_k)
    else:  # the interpreter truncates where the GPU rounds to nearest: a few units in the last place at most
        torch.testing.assert_close(k.float(), want_k.float(), rtol=2**-6, atol=2**-5)


def reference_attention(q, pool_k, pool_v, rows, new_k, new_v, rotary, q_offset, k_offset, bias):
    """SelfAttention's reference ops on queries [S, T, H, D]: output [S, T, H, D]."""
    k, v = reference(pool_k, pool_v, rows, new_k, new_v, rotary, k_offset)
    q = rotary(q.transpose(1, 2), q_offset)
    scores = q @ k.transpose(-1, -2) + bias
    return (torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v).transpose(1, 2)


@pytest.mark.parametrize("rotary_cls", [InterleavedRotary, HalfRotary])
@pytest.mark.parametrize("cached, new, per_stream", [(20, 6, False), (70, 20, True), (0, 9, False)])
def test_window_attention_equals_the_reference_ops(interpreted, rotary_cls, cached, new, per_stream):
    """The one-kernel chunk attention against the reference ops in fp32: ring rows in any order, per-stream positions
    and masks (some keys hidden, as before a young stream's start), a window longer than one key tile, no cache."""
    gen = torch.Generator().manual_seed(cached + new)
    streams, heads, dim, slots = 3, 2, 16, 5
    rotary = rotary_cls(dim, 10_000.0)
    pool_k, pool_v = (torch.randn(slots * max(cached, 1), heads, dim, generator=gen) for _ in range(2))
    rows = torch.stack([torch.randperm(slots * max(cached, 1), generator=gen)[:cached] for _ in range(streams)])
    q, new_k, new_v = (torch.randn(streams, new, heads, dim, generator=gen) for _ in range(3))
    if per_stream:
        k_offset = torch.tensor([[-3], [0], [-17]])
        q_offset = k_offset + cached
        bias = torch.zeros(streams, 1, new, cached + new)
        bias[0, :, :, :3] = float("-inf")  # frames before the stream's start
        bias[2, :, :, :17] = float("-inf")
        bias[1, :, : new // 2, -new // 2 :] = float("-inf")  # a later block's frames
    else:
        k_offset, q_offset = 0, cached
        bias = torch.zeros(new, cached + new)
    want = reference_attention(q, pool_k, pool_v, rows, new_k, new_v, rotary, q_offset, k_offset, bias)
    got = window_kernel.window_attention(
        q,
        pool_k,
        pool_v,
        rows,
        new_k,
        new_v,
        rotary.tables(q_offset, new, q),
        rotary.tables(k_offset, cached + new, new_k),
        bias,
        rotary.interleaved,
        block_n=32,
    )
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # only the additions' order differs


@pytest.mark.parametrize("variant", ["interleaved", "half"])
def test_streaming_encoder_through_window_attention(interpreted, monkeypatch, variant):
    """A streaming run through the one-kernel attention (head dim 16) stays within fp32 rounding of the reference
    path; with ``WINDOW_ATTENTION`` off, the same passes are the reference's bits."""
    model = build(tiny_config(rope_variant=variant, embed_dim=64), dtype=torch.float32)
    chunk = audio(SAMPLES_PER_UNIT * 5, seed=8)
    calls = []
    monkeypatch.setattr(window_kernel, "window_attention", _counting(window_kernel.window_attention, calls))

    def run() -> list[torch.Tensor]:
        cache = model.new_cache(1)
        return [
            model.encode_chunk(cache, chunk[i : i + SAMPLES_PER_UNIT])
            for i in range(0, chunk.numel(), SAMPLES_PER_UNIT)
        ]

    want = run()
    with speech_encoder.window_kernel_passes():
        got = run()
    assert len(calls) == 2 * 5  # every layer of every chunk
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(speech_encoder, "WINDOW_ATTENTION", False)
    calls.clear()
    with speech_encoder.window_kernel_passes():
        off = run()
    assert not calls and all(torch.equal(a, b) for a, b in zip(off, want))


def test_kernel_rejects_mismatched_shapes(interpreted):
    pool = torch.zeros(40, 2, 8)
    rows = torch.zeros(2, 10, dtype=torch.long)
    new = torch.zeros(2, 4, 2, 8)
    cos = torch.zeros(14, 4)
    with pytest.raises(ValueError, match="rotary tables"):
        window_kernel.window_keys_values(pool, pool, rows, new, new, cos[:13], cos[:13], True)
    with pytest.raises(ValueError, match="shapes"):
        window_kernel.window_keys_values(pool, pool, rows[:1], new, new, cos, cos, True)


def test_usable_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not window_kernel.usable(torch.zeros(2), 64)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert window_kernel.usable(torch.zeros(2), 64)
    assert not window_kernel.usable(torch.zeros(2), 48)  # not a power of two
    assert not window_kernel.usable(torch.zeros(2, dtype=torch.float64), 64)


@pytest.mark.parametrize("variant", ["interleaved", "half"])
def test_streaming_encoder_through_the_kernel_equals_the_reference(interpreted, monkeypatch, variant):
    """A whole streaming run in fp32 through the kernel (as the encoder graphs' passes use it) equals the reference
    path bit for bit: young streams batched with old ones (per-stream positions), full windows, a partial last
    chunk. Eager passes outside :func:`window_kernel_passes` keep the reference ops."""
    model = build(tiny_config(rope_variant=variant), dtype=torch.float32)
    chunks = [audio(SAMPLES_PER_UNIT * 7 + 555, seed=s) for s in (3, 4)]

    def run() -> tuple[list[torch.Tensor], list]:
        caches = [model.new_cache(1) for _ in chunks]
        outs = []
        for i in range(0, chunks[0].numel(), SAMPLES_PER_UNIT):
            # stream 1 starts three chunks late: its young windows share a batch with stream 0's full ones
            live = [c for c, start in zip(range(2), (0, 3 * SAMPLES_PER_UNIT)) if i >= start]
            got = model.encode_chunks(
                [caches[c] for c in live],
                [chunks[c][i - (3 * SAMPLES_PER_UNIT if c else 0) :][:SAMPLES_PER_UNIT] for c in live],
            )
            outs.extend(got)
        return outs, caches

    calls = []
    monkeypatch.setattr(window_kernel, "window_keys_values", _counting(window_kernel.window_keys_values, calls))
    slow, slow_caches = run()  # eager passes outside window_kernel_passes(): the reference ops
    assert not calls
    with speech_encoder.window_kernel_passes():
        fast, fast_caches = run()
    assert calls, "the kernel did not run"
    monkeypatch.setattr(speech_encoder, "WINDOW_KERNEL", False)  # the switch turns it off everywhere
    calls.clear()
    with speech_encoder.window_kernel_passes():
        off, _ = run()
    assert not calls and all(torch.equal(a, b) for a, b in zip(off, slow))
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)
    for a, b in zip(fast_caches, slow_caches):
        for x, y in zip(a.keys + a.values, b.keys + b.values):
            assert torch.equal(x, y)


def _counting(fn, calls: list):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapper


def test_a_kernel_that_cannot_build_falls_back_to_the_reference(interpreted, monkeypatch, caplog):
    """If Triton cannot compile or launch the kernel here (no compiler, no writable cache), the encoder logs it once,
    keeps serving with the separate ops (the same outputs) and stops trying."""
    monkeypatch.setattr(window_kernel._switch, "reason", None)

    def broken():
        raise RuntimeError("no C compiler found")

    broken.cache_clear = lambda: None  # the fixture clears the real one's cache after the test
    monkeypatch.setattr(window_kernel, "_kernel", broken)
    model = build(tiny_config(), dtype=torch.float32)
    samples = audio(SAMPLES_PER_UNIT * 4, seed=5)
    chunks = [samples[i : i + SAMPLES_PER_UNIT] for i in range(0, samples.numel(), SAMPLES_PER_UNIT)]
    reference_cache, cache = model.new_cache(1), model.new_cache(1)
    want = [model.encode_chunk(reference_cache, c) for c in chunks]
    with speech_encoder.window_kernel_passes(), caplog.at_level("WARNING"):
        got = [model.encode_chunk(cache, c) for c in chunks]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not window_kernel.usable(torch.zeros(2), 8)
    assert [r.message for r in caplog.records].count(
        "speech encoder window kernel disabled, using the separate torch ops: RuntimeError: no C compiler found"
    ) == 1


def test_graph_pass_of_first_chunks_through_window_attention(interpreted, monkeypatch):
    """The encoder graphs' pass (run without capture) takes first chunks as well: a zero CNN tail and a window that is
    all masked (its rows hold NaN before the pass, as uninitialized memory may). Through the one-kernel attention it
    stays within fp32 rounding of the eager reference, chunk after chunk, for m=1 and m=2 streams together."""
    from infinisst_backend.runtime.encoder_graphs import EncoderGraphs, encode_chunks

    model = build(tiny_config(embed_dim=64), dtype=torch.float32)
    calls = []
    monkeypatch.setattr(window_kernel, "window_attention", _counting(window_kernel.window_attention, calls))
    pool, twins = model.new_pool(4), model.new_pool(4)
    pool.data.fill_(float("nan"))
    graphs = EncoderGraphs(model, pool, max_batch=4, multipliers=[1, 2], capture=False)
    ms = [1, 1, 2]
    caches = [model.new_cache(m, pool) for m in ms]
    eager = [model.new_cache(m, twins) for m in ms]
    for k in range(3):
        xs = [audio(SAMPLES_PER_UNIT * m, seed=10 * k + i) for i, m in enumerate(ms)]
        before = graphs.replays
        with speech_encoder.window_kernel_passes():
            got = encode_chunks(model, caches, xs, graphs)
        want = model.encode_chunks(eager, xs)  # eager passes: the reference ops
        assert graphs.replays - before == 2  # one per m, first chunks included
        for a, b in zip(got, want):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert calls, "the kernel did not run"
