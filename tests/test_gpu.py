"""GPU tests: FlashInfer attention against the torch reference. Skipped without CUDA or flashinfer.

Run on a GPU machine with ``python -m pytest -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infinisst_backend.config import (
    SAMPLES_PER_UNIT,
    DecodingConfig,
    EngineConfig,
    LLMConfig,
    SpeechEncoderConfig,
)
from infinisst_backend.kernels.attention import AttentionBatch, TorchAttention
from infinisst_backend.kernels.availability import installed
from infinisst_backend.model.kv_cache import PagedKVCache
from infinisst_backend.presets import gpu_test_model_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not installed("flashinfer"), reason="needs flashinfer"),
]

PAGE = 16


def _cfg(**overrides) -> EngineConfig:
    base = dict(device="cuda", dtype="bfloat16", attention_backend="flashinfer", page_size=PAGE, num_pages=512)
    base.update(overrides)
    return EngineConfig(**base)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _random_batch(gen: torch.Generator, qo_lens: list[int], ctx_lens: list[int], num_pages: int):
    """Page tables drawn from a shuffled pool (so pages are scattered), kv_len = ctx + q."""
    order = torch.randperm(num_pages, generator=gen).tolist()
    tables, kv_lens = [], []
    for q, c in zip(qo_lens, ctx_lens):
        kv = q + c
        n = -(-kv // PAGE)
        tables.append(order[:n])
        order = order[n:]
        kv_lens.append(kv)
    return AttentionBatch.build(qo_lens, tables, kv_lens, PAGE, device="cuda")


@pytest.mark.parametrize(
    "qo_lens, ctx_lens",
    [
        ([22, 1, 40, 7, 16], [0, 300, 1000, 15, 33]),  # prefill: mixed prompt lengths, empty and long caches
        ([1, 1, 1, 1, 1, 1], [0, 1, 15, 16, 517, 1040]),  # decode: every page-boundary case
    ],
    ids=["prefill", "decode"],
)
# head_dim 128 only: every other head size is one more FlashInfer kernel to compile (about a minute each).
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(8, 2, 128), (4, 4, 128)])
def test_flashinfer_matches_torch_attention(qo_lens, ctx_lens, num_heads, num_kv_heads, head_dim):
    from infinisst_backend.kernels.flashinfer_attention import FlashInferAttention

    gen = torch.Generator().manual_seed(sum(qo_lens) + head_dim)
    num_pages = 256
    batch = _random_batch(gen, qo_lens, ctx_lens, num_pages)
    assert batch.is_decode == all(q == 1 for q in qo_lens)
    cache = PagedKVCache(1, num_pages, PAGE, num_kv_heads, head_dim, torch.bfloat16, "cuda")
    cache.data.normal_(generator=None)
    kv_ref, kv_fi = cache.kv_layers[0].clone(), cache.kv_layers[0].clone()
    t = batch.num_tokens
    q = torch.randn(t, num_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(t, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(t, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)

    ref = TorchAttention()
    ref.plan(batch)
    out_ref = ref.forward(0, q, k, v, kv_ref)
    fi = FlashInferAttention(_cfg())
    fi.plan(batch)
    out_fi = fi.forward(0, q, k, v, kv_fi)

    assert torch.equal(kv_fi, kv_ref), "K/V must be written at exactly the same slots"
    assert torch.isfinite(out_fi).all()
    assert _rel(out_fi, out_ref) < 1e-2
    # Against float64 on the same bf16 inputs: FlashInfer is as close as the float32 torch path.
    ref64 = TorchAttention()
    ref64.plan(batch)
    out64 = ref64.forward(0, q.double(), k.double(), v.double(), kv_ref.double())
    assert _rel(out_fi, out64) < 1e-2

    # A second layer reuses the plan: same metadata, new data.
    q2 = torch.randn_like(q)
    assert _rel(fi.forward(1, q2, k, v, kv_fi), ref.forward(1, q2, k, v, kv_ref)) < 1e-2


def test_flashinfer_rejects_cpu():
    from infinisst_backend.kernels.flashinfer_attention import FlashInferAttention

    with pytest.raises(ValueError, match="CUDA"):
        FlashInferAttention(_cfg(device="cpu"))


# ------------------------------------------------------------------ a small model end to end


def _tiny_tokenizer():
    """A word-level chatml tokenizer with InfiniSST's tokens (no files): 512 ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<sp_patch>", "<sp_start>", "<sp_end>"]
    vocab = {"<unk>": 0, **{tok: i + 1 for i, tok in enumerate(specials)}}
    vocab.update({f"w{i}": i for i in range(len(vocab), 512)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+"), behavior="merged_with_next")
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer


def _tiny_model():
    from infinisst_backend.model.infinisst import InfiniSSTModel

    cfg = gpu_test_model_config()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = InfiniSSTModel(cfg)
    model.llm.rope.inv_freq = model.llm.rope.inv_freq.cpu()  # a plain CPU tensor, which the context moved
    return model.to(torch.bfloat16).eval(), cfg


@pytest.mark.parametrize("kv_cache_dtype, tensor_cores", [("auto", False), ("float16", False), ("auto", True)])
def test_runner_flashinfer_matches_torch_with_eviction(kv_cache_dtype, tensor_cores):
    """Prefill, decode steps and a turn-aligned compaction through both backends; the same tokens are fed. With a
    float16 cache under the bf16 model, FlashInfer runs in float16 and returns bf16; with ``decode_tensor_cores``
    its decode steps run the tensor-core kernels."""
    from infinisst_backend.runtime.model_runner import ModelRunner

    model, _ = _tiny_model()
    ref = ModelRunner(model, _cfg(attention_backend="torch"), 512)
    fi = ModelRunner(model, _cfg(kv_cache_dtype=kv_cache_dtype, decode_tensor_cores=tensor_cores), 512)
    assert fi.kv.data.dtype == (torch.float16 if kv_cache_dtype == "float16" else torch.bfloat16)
    rng = np.random.default_rng(0)
    seqs = [(ref.new_sequence(), fi.new_sequence()) for _ in range(3)]
    agree, errors = [], []
    for turn in range(4):
        speech = torch.randn(3, 12, 256, device="cuda", dtype=torch.bfloat16)
        parts = [([1, 7, 8], speech[i], [2, 9, 1, 10]) for i in range(3)]
        lr = ref.prefill([s[0] for s in seqs], parts)
        lf = fi.prefill([s[1] for s in seqs], parts)
        for _ in range(int(rng.integers(2, 6))):
            errors.append(_rel(lf, lr))
            agree += (lf.argmax(-1) == lr.argmax(-1)).tolist()
            tokens = lr.argmax(-1).tolist()
            lr = ref.decode([s[0] for s in seqs], tokens)
            lf = fi.decode([s[1] for s in seqs], tokens)
        if turn == 2:  # drop the middle of every sequence, keep a 5-token "system prompt"
            for sr, sf in seqs:
                cut = sr.num_tokens - 10
                ref.compact(sr, 5, cut)
                fi.compact(sf, 5, cut)
    assert max(errors) < 2e-2
    assert np.mean(agree) >= 0.9
    for sr, sf in seqs:
        sr.release()
        sf.release()
    assert fi.pool.num_free == fi.pool.num_pages


def test_engine_flashinfer_greedy_and_beam_no_leak():
    from infinisst_backend.engine.engine import Engine
    from infinisst_backend.engine.events import StreamError, StreamFinished, TurnEnded

    model, cfg = _tiny_model()
    engine = Engine(model, _tiny_tokenizer(), cfg, _cfg(max_llm_cache_tokens=120, batch_timeout_s=0.0))
    rng = np.random.default_rng(1)
    streams = {0: DecodingConfig(beam_size=1), 1: DecodingConfig(beam_size=4), 2: DecodingConfig(beam_size=1)}
    for sid, decoding in streams.items():
        engine.open_stream(sid, "German", 1 + sid % 2, decoding)
    audio = {sid: (0.1 * rng.standard_normal(6 * SAMPLES_PER_UNIT)).astype(np.float32) for sid in streams}
    for sid, samples in audio.items():
        engine.add_audio(sid, samples, tag="all", end=True)
    engine.run_until_idle()
    events = list(engine.events)
    assert not [e for e in events if isinstance(e, StreamError)]
    assert {e.stream_id for e in events if isinstance(e, StreamFinished)} == set(streams)
    turns = [e for e in events if isinstance(e, TurnEnded)]
    assert len(turns) == 6 + 3 + 6  # m=1: 6 chunks, m=2: 3 chunks
    pool = engine.runner.pool
    assert pool.num_free == pool.num_pages, "every page must be back in the pool"


@pytest.mark.parametrize(
    "batch, kv_cache_dtype, tensor_cores",
    [
        (1, "auto", False),
        (3, "auto", False),
        (8, "auto", False),
        (11, "auto", False),
        (3, "float16", False),
        (3, "auto", True),
        (11, "auto", True),
    ],
)
def test_cuda_graphs_match_eager(batch, kv_cache_dtype, tensor_cores):
    """Graph replays of prefills (equal prompt lengths) and decodes, padded up to a bucket (11 > max_batch_size
    runs eagerly), == the eager FlashInfer path; scratch pages sit outside the pool; nothing leaks."""
    from infinisst_backend.runtime.model_runner import ModelRunner

    model, _ = _tiny_model()
    opts = dict(max_batch_size=8, kv_cache_dtype=kv_cache_dtype, decode_tensor_cores=tensor_cores)
    eager = ModelRunner(model, _cfg(cuda_graphs=False, **opts), 512)
    graphs = ModelRunner(model, _cfg(**opts), 512)
    assert eager.graphs is None and graphs.graphs.decode_buckets == [1, 2, 4, 8]
    assert graphs.graphs.fused_kernels, "the graphs capture the fused LLM kernels by default"
    assert graphs.graphs.scratch_pages == [512, 513, 514] and graphs.kv.data.shape[1] == 515  # 34 tokens (m=2)
    rng = np.random.default_rng(batch)
    seqs = [(eager.new_sequence(), graphs.new_sequence()) for _ in range(batch)]
    for turn in range(3):
        speech = torch.randn(batch, 12, 256, device="cuda", dtype=torch.bfloat16)
        if turn == 0:  # different prompt lengths: eager in both; page boundaries vary per sequence
            parts = [([1] * int(rng.integers(1, 40)), speech[i], [2, 9]) for i in range(batch)]
        else:  # equal lengths (a steady-state turn): a prefill graph replay
            parts = [([1, 7, 8, 3, 4], speech[i], [2, 9, 1, 10, 5]) for i in range(batch)]
        le = eager.prefill([s[0] for s in seqs], parts)
        lg = graphs.prefill([s[1] for s in seqs], parts)
        assert lg.shape == le.shape == (batch, 512) and lg.dtype == torch.float32
        assert _rel(lg, le) < 1e-2
        for _ in range(6):
            tokens = le.argmax(-1).tolist()
            le = eager.decode([s[0] for s in seqs], tokens)
            lg = graphs.decode([s[1] for s in seqs], tokens)
            assert lg.shape == le.shape == (batch, 512)
            assert _rel(lg, le) < 1e-2
    replayed = graphs.graphs.replays
    assert replayed.get(22, 0) == (2 if batch <= 8 else 0), "the steady-state prefills replay (11 > max: eager)"
    assert replayed.get(1, 0) == (18 if batch <= 8 else 0)
    assert (lg.argmax(-1) == le.argmax(-1)).float().mean() >= 0.75
    pages = torch.tensor([p for _, s in seqs for p in s.pages], device="cuda")
    assert _rel(graphs.kv.data[:, pages], eager.kv.data[:, pages]) < 1e-2
    for se, sg in seqs:
        assert se.num_tokens == sg.num_tokens and se.pages == sg.pages
        se.release()
        sg.release()
    assert graphs.pool.num_free == graphs.pool.num_pages


# ------------------------------------------------------------------ speech encoder CUDA graphs


def _small_encoder_config(**overrides) -> SpeechEncoderConfig:
    """A small speech encoder with a 96-frame window (the CNN of wav2vec 2.0 with 64 channels)."""
    conv = [(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2
    return SpeechEncoderConfig(**({"conv_layers": conv, "ffn_dim": 256, "max_cache_frames": 96} | overrides))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)  # bf16 storage: equality bit for bit, NaN patterns of unwritten rows included


def test_encoder_cuda_graphs_match_eager():
    """Steady-state speech encoder calls replayed from CUDA graphs == the eager path in bf16: batches of 3 and 11
    streams padded up to buckets 4 and 16, two m (two replays) in one call, a stream out of block phase, host samples
    as the engine passes them. The real slots' pool rows match; no other slot (an idle stream's, free ones) changes."""
    from infinisst_backend.model.speech_frontend import SpeechFrontend
    from infinisst_backend.runtime.encoder_graphs import EncoderGraphs, encode_chunks

    cfg = _small_encoder_config(embed_dim=128, num_layers=3, num_heads=2)  # head_dim 64
    torch.manual_seed(0)
    frontend = SpeechFrontend(cfg, 256).to("cuda", torch.bfloat16).eval()
    eager_pool, graph_pool = frontend.new_pool(16), frontend.new_pool(16)
    graphs = EncoderGraphs(frontend, graph_pool, max_batch=16, multipliers=[1, 2])
    assert graphs.buckets == [1, 2, 4, 8, 16] and graphs.multipliers == [1, 2]

    ms = [1] * 11 + [2, 2, 1]  # stream 13: idle during the checked calls
    eager = [frontend.new_cache(m, eager_pool) for m in ms]
    graph = [frontend.new_cache(m, graph_pool) for m in ms]
    assert [c.slot for c in eager] == [c.slot for c in graph]
    gen = torch.Generator().manual_seed(0)

    def chunk(m: int, n: int | None = None) -> torch.Tensor:
        return 0.1 * torch.randn(n or SAMPLES_PER_UNIT * m, generator=gen)  # float32 on the host

    # History, eagerly (m=1: 144 frames > the 96-frame window; m=2: 240 or 288), then the same state in both pools.
    # Stream 12 (m=2) gets a one-unit second chunk: 48 frames out of block phase afterwards.
    for k in range(3):
        frontend.encode_chunks(
            eager, [chunk(m, SAMPLES_PER_UNIT if (i, k) == (12, 1) else None) for i, m in enumerate(ms)]
        )
    graph_pool.data.copy_(eager_pool.data)
    for e, g in zip(eager, graph):
        g.audio_tail, g.frames_encoded = e.audio_tail.clone(), e.frames_encoded
    assert eager[12].frames_encoded % 96 == 48 and all(c.frames_encoded >= 96 for c in eager)

    window = cfg.max_cache_frames

    def step(members: list[int]) -> int:
        xs = [chunk(ms[i]) for i in members]
        before = graph_pool.data.clone()
        replays = graphs.replays
        got = encode_chunks(frontend, [graph[i] for i in members], xs, graphs)
        want = frontend.encode_chunks([eager[i] for i in members], xs)
        for i, g, w in zip(members, got, want):
            assert g.shape == w.shape == (12 * ms[i], 256) and torch.isfinite(g).all()
            assert _rel(g, w) < 2e-2, i
            assert graph[i].frames_encoded == eager[i].frames_encoded
            assert torch.equal(graph[i].audio_tail, eager[i].audio_tail)
            rows = slice(graph[i].slot * window, (graph[i].slot + 1) * window)
            assert _rel(graph_pool.data[:, :, rows], eager_pool.data[:, :, rows]) < 2e-2, i
        touched = {graph[i].slot for i in members}
        for slot in set(range(graph_pool.num_slots)) - touched:
            rows = slice(slot * window, (slot + 1) * window)
            assert torch.equal(_bits(graph_pool.data[:, :, rows]), _bits(before[:, :, rows])), f"slot {slot} changed"
        return graphs.replays - replays

    assert step([0, 4, 7]) == 1  # bucket 4
    assert step(list(range(13))) == 2  # m=1: 11 streams in bucket 16; m=2: 2 streams (one out of phase)
    assert step([12, 3, 11]) == 2  # m=2: bucket 2; m=1: bucket 1
    torch.cuda.synchronize()


def _young_and_old_streams(frontend, chunks: list, ms: list[int], graphed: bool):
    """Six chunks of each stream, stream 2 starting two chunks late (its young windows batched with full ones), eagerly
    or through encoder graphs of ``ms``'s multipliers. Returns (embeddings, every stream's cache K/V stacked)."""
    from infinisst_backend.runtime.encoder_graphs import EncoderGraphs, encode_chunks

    pool = frontend.new_pool(4)
    graphs = EncoderGraphs(frontend, pool, max_batch=4, multipliers=sorted(set(ms))) if graphed else None
    caches = [frontend.new_cache(m, pool) for m in ms]
    outs = []
    for k in range(6):
        live = [i for i in range(3) if k >= 2 * (i == 2)]
        size = [SAMPLES_PER_UNIT * ms[i] for i in live]
        xs = [chunks[i][(k - 2 * (i == 2)) * n :][:n] for i, n in zip(live, size)]
        outs.extend(encode_chunks(frontend, [caches[i] for i in live], xs, graphs))
    torch.cuda.synchronize()
    return outs, torch.cat([torch.stack(c.keys + c.values) for c in caches])


@pytest.mark.parametrize("variant", ["interleaved", "half"])
def test_window_kernel_is_bit_exact_in_bf16(monkeypatch, variant):
    """The speech encoder's window kernel (gather + concatenation + key RoPE in one Triton kernel, which the encoder
    graphs capture) gives the reference path's bits in bf16 on the GPU: embeddings and caches of a streaming run where
    a young stream shares batches with full windows, eagerly (forced) and through the encoder's CUDA graphs."""
    pytest.importorskip("triton")
    from infinisst_backend.kernels import window_kernel
    from infinisst_backend.model import speech_encoder
    from infinisst_backend.model.speech_frontend import SpeechFrontend

    monkeypatch.setattr(speech_encoder, "WINDOW_ATTENTION", False)  # the K/V kernel alone (the next test: both)
    cfg = _small_encoder_config(embed_dim=256, num_layers=2, num_heads=4, rope_variant=variant)  # head_dim 64
    torch.manual_seed(0)
    frontend = SpeechFrontend(cfg, 128).to("cuda", torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(1)
    chunks = [0.1 * torch.randn(SAMPLES_PER_UNIT * 6, generator=gen) for _ in range(3)]
    calls = []
    real = window_kernel.window_keys_values

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(window_kernel, "window_keys_values", counting)

    def run(graphed: bool):
        return _young_and_old_streams(frontend, chunks, [1, 1, 1], graphed)

    with speech_encoder.window_kernel_passes():
        fast = run(False)
    assert calls
    calls.clear()
    fast_graphed = run(True)  # the graphs' capture enters window_kernel_passes() itself
    assert calls
    monkeypatch.setattr(speech_encoder, "WINDOW_KERNEL", False)
    calls.clear()
    slow, slow_graphed = run(False), run(True)
    assert not calls
    for (outs, cache), (ref_outs, ref_cache) in ((fast, slow), (fast_graphed, slow_graphed)):
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(outs, ref_outs))
        assert torch.equal(_bits(cache), _bits(ref_cache))


@pytest.mark.parametrize("variant", ["interleaved", "half"])
def test_window_attention_kernel_close_to_reference_in_bf16(monkeypatch, variant):
    """The one-kernel chunk attention (``speech_encoder.WINDOW_ATTENTION``) in bf16 on the GPU, eagerly (forced) and
    through the encoder's CUDA graphs, against the reference ops: a young stream batched with full windows, m=1 and
    m=2. Only the additions' order and the one-pass softmax differ, so outputs and caches stay within bf16 rounding."""
    pytest.importorskip("triton")
    from infinisst_backend.kernels import window_kernel
    from infinisst_backend.model import speech_encoder
    from infinisst_backend.model.speech_frontend import SpeechFrontend

    cfg = _small_encoder_config(embed_dim=256, num_layers=2, num_heads=4, rope_variant=variant)  # head_dim 64
    torch.manual_seed(0)
    frontend = SpeechFrontend(cfg, 128).to("cuda", torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(1)
    ms = [1, 2, 1]
    chunks = [0.1 * torch.randn(SAMPLES_PER_UNIT * 6 * m, generator=gen) for m in ms]
    calls = []
    real = window_kernel.window_attention
    monkeypatch.setattr(window_kernel, "window_attention", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(graphed: bool):
        return _young_and_old_streams(frontend, chunks, ms, graphed)

    with speech_encoder.window_kernel_passes():
        fast = run(False)
    assert calls
    calls.clear()
    fast_graphed = run(True)
    assert calls
    monkeypatch.setattr(speech_encoder, "WINDOW_ATTENTION", False)
    calls.clear()
    with speech_encoder.window_kernel_passes():
        slow = run(False)
    assert not calls
    for outs, cache in (fast, fast_graphed):
        errors = [_rel(a, b) for a, b in zip(outs, slow[0])]
        assert max(errors) < 2e-2, errors
        assert _rel(cache, slow[1]) < 2e-2, _rel(cache, slow[1])


def test_runner_encodes_speech_through_graphs():
    """ModelRunner captures the encoder graphs on CUDA and encode_speech (numpy chunks) replays them for every full
    chunk, a stream's first one included (layer-norm CNN: its tail is the zero prefix); the embeddings match the
    eager path."""
    from infinisst_backend.runtime.model_runner import ModelRunner

    model, _ = _tiny_model()
    runner = ModelRunner(model, _cfg(attention_backend="torch", max_batch_size=4, max_streams=8), 64)
    graphs = runner.speech_graphs
    assert graphs is not None and graphs.buckets == [1, 2, 4] and graphs.multipliers == [1, 2]  # window 96
    frontend = model.speech
    twins_pool = frontend.new_pool(8)
    ms = [1, 1, 2]
    caches = [frontend.new_cache(m, runner.speech_pool) for m in ms]
    twins = [frontend.new_cache(m, twins_pool) for m in ms]
    rng = np.random.default_rng(0)
    replays = []
    for _ in range(4):
        samples = [(0.1 * rng.standard_normal(SAMPLES_PER_UNIT * m)).astype(np.float32) for m in ms]
        count = graphs.replays
        got = runner.encode_speech(caches, samples)
        replays.append(graphs.replays - count)
        want = frontend.encode_chunks(twins, [torch.from_numpy(s) for s in samples])
        for g, w in zip(got, want):
            assert g.shape == w.shape and _rel(g, w) < 2e-2
    assert replays == [2, 2, 2, 2]  # every full chunk replays, first chunks too (one graph per m)


def test_llm_kernels_bitwise_on_gpu():
    """The fused LLM kernels in bf16 on the GPU: RoPE with the K/V write, SwiGLU and the residual add bit for bit the
    torch ops; RMSNorm within one bf16 unit in rare elements (the sum's order)."""
    import torch.nn.functional as F

    from infinisst_backend.kernels import llm_kernels
    from infinisst_backend.kernels.attention import write_kv
    from infinisst_backend.model.llm import RMSNorm
    from infinisst_backend.model.rope import RotaryEmbedding, apply_rotary

    assert llm_kernels.ready("cuda", torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    tokens, heads, kv_heads, dim, page_size, pages = 37, 32, 8, 128, 16, 40
    rope = RotaryEmbedding(LLMConfig(head_dim=dim, hidden_size=4096, num_attention_heads=heads, rope_theta=5e5))
    positions = torch.randint(0, 1100, (tokens,), device="cuda", generator=gen)
    cos, sin = rope.cos_sin(positions, torch.bfloat16)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen, **bf16)
    slots = torch.randperm(pages * page_size, device="cuda", generator=gen)[:tokens]
    page, offset = slots // page_size, slots % page_size
    kv = torch.randn(pages, 2, page_size, kv_heads, dim, generator=gen, **bf16)
    want_kv = kv.clone()
    q = llm_kernels.rope_write_kv(qkv, cos, sin, page, offset, kv, heads, kv_heads)
    q_ref, k_ref, v_ref = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q_ref = apply_rotary(q_ref.view(tokens, heads, dim), cos, sin)
    write_kv(
        want_kv,
        page,
        offset,
        apply_rotary(k_ref.view(tokens, kv_heads, dim), cos, sin),
        v_ref.view(tokens, kv_heads, dim),
    )
    assert torch.equal(q, q_ref) and torch.equal(kv, want_kv)

    gate_up = 3 * torch.randn(tokens, 2 * 14336, generator=gen, **bf16)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(llm_kernels.silu_mul(gate_up), F.silu(gate) * up)

    norm = RMSNorm(4096, 1e-5).to(**bf16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=gen)
    x, a = (2 * torch.randn(tokens, 4096, generator=gen, **bf16) for _ in range(2))
    got, h = llm_kernels.rms_norm(x, norm.weight.detach(), norm.eps, residual=a)
    assert torch.equal(h, x + a)
    want = norm(x + a)
    off = (got != want).float().mean().item()
    assert off < 1e-3, f"{off:.2%} of RMSNorm outputs differ"
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=0)


@pytest.mark.parametrize("drop", [1, 5, 27, 40, 300])  # shorter than the kernel's block of tokens (its hazard), longer
def test_eviction_kernel_bitwise_on_gpu(drop):
    """compact_many through the in-place move kernel equals the gather/scatter path bit for bit in bf16, at Llama's
    head shape, for sequences of several lengths evicted together (the drop, the kept prefix and page offsets vary)."""
    from infinisst_backend.kernels import llm_kernels
    from infinisst_backend.model.rope import inv_freq

    assert llm_kernels.ready("cuda", torch.bfloat16)
    cfg = LLMConfig(head_dim=128, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, rope_theta=5e5)
    freq = inv_freq(cfg).cuda()
    caches = [PagedKVCache(4, 1000, PAGE, 8, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    gen = torch.Generator(device="cuda").manual_seed(drop)
    caches[0].data.normal_(generator=gen)
    caches[1].data.copy_(caches[0].data)
    rng = np.random.default_rng(drop)
    lengths = [int(n) for n in rng.integers(drop + 30, 1100, 12)]
    keeps = [int(k) for k in rng.integers(0, 30, 12)]
    order = rng.permutation(len(lengths))
    work = []
    for kv in caches:
        seqs = [kv.new_sequence() for _ in lengths]
        for start in range(0, max(lengths), 100):  # in rounds, so that the sequences' pages interleave
            for n, seq in zip(lengths, seqs):
                if n > start:
                    seq.reserve(min(100, n - start))
        work.append([(seqs[i], keeps[i], keeps[i] + drop) for i in order])
    caches[1].move_kernel = True
    for kv, items in zip(caches, work):
        kv.compact_many(items, freq)
    torch.cuda.synchronize()
    assert [s.pages for s, _, _ in work[0]] == [s.pages for s, _, _ in work[1]]
    assert torch.equal(caches[0].data.view(torch.int16), caches[1].data.view(torch.int16))
