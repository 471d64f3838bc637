"""Streaming speech encoder: streaming == offline reference, CNN == transformers, counts, bounded cache, validation."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from infinisst_backend.config import SAMPLES_PER_UNIT, SpeechEncoderConfig
from infinisst_backend.model import speech_encoder, speech_frontend
from infinisst_backend.model.speech_cache import SpeechCache
from infinisst_backend.model.speech_encoder import HalfRotary, InterleavedRotary, chunk_attention_bias
from infinisst_backend.model.speech_frontend import SpeechFrontend
from infinisst_backend.presets import tiny_speech_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LLM_HIDDEN = 24


def tiny_config(**overrides) -> SpeechEncoderConfig:
    """The tiny test model's speech encoder with a 100-frame window."""
    return tiny_speech_config(**({"max_cache_frames": 100} | overrides))


CONV = tiny_config().conv_layers


def build(cfg: SpeechEncoderConfig | None = None, seed: int = 0, dtype=torch.float64) -> SpeechFrontend:
    """Random weights, LayerNorm affines included, so every parameter matters."""
    torch.manual_seed(seed)
    model = SpeechFrontend(cfg or tiny_config(), LLM_HIDDEN)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("rotary_emb.freqs"):
                continue
            is_norm = "norm" in name or ".2.1." in name or ".2.weight" in name
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p) / max(1, p[0].numel()) ** 0.5)
    return model.to(dtype).eval()


def audio(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(n, generator=g, dtype=torch.float32)


def stream(model: SpeechFrontend, samples: torch.Tensor, m: int, cache: SpeechCache | None = None):
    """Encode ``samples`` chunk by chunk (15360*m, last one partial); returns (outputs per chunk, cache)."""
    cache = cache or model.new_cache(m)
    size = SAMPLES_PER_UNIT * m
    outs = [model.encode_chunk(cache, samples[i : i + size]) for i in range(0, samples.numel(), size)]
    return outs, cache


def snapshot(cache: SpeechCache) -> dict:
    return {
        "m": cache.m,
        "frames": cache.frames_encoded,
        "tail": None if cache.audio_tail is None else cache.audio_tail.clone(),
        "keys": [k.clone() for k in cache.keys],
        "values": [v.clone() for v in cache.values],
    }


def assert_same_state(cache: SpeechCache, snap: dict) -> None:
    assert cache.m == snap["m"] and cache.frames_encoded == snap["frames"]
    assert (cache.audio_tail is None) == (snap["tail"] is None)
    if snap["tail"] is not None:
        assert torch.equal(cache.audio_tail, snap["tail"])
    assert len(cache.keys) == len(snap["keys"]) and len(cache.values) == len(snap["values"])
    for a, b in zip(cache.keys + cache.values, snap["keys"] + snap["values"]):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["interleaved", "half"])
@pytest.mark.parametrize(
    ("m", "num_samples"),
    [(1, 7 * SAMPLES_PER_UNIT + 5000), (2, 4 * 2 * SAMPLES_PER_UNIT + 5000)],
)
def test_streaming_equals_full(variant, m, num_samples):
    model = build(tiny_config(rope_variant=variant))
    samples = audio(num_samples)
    outs, cache = stream(model, samples, m)
    full = model.encode_full(samples, m)

    units = -(-num_samples // SAMPLES_PER_UNIT)
    assert full.shape == (12 * units, LLM_HIDDEN) and full.dtype == torch.float64
    assert cache.frames_encoded == 48 * units > 3 * model.cfg.max_cache_frames  # the window trimmed several times
    assert [o.shape[0] for o in outs] == [12 * m] * (len(outs) - 1) + [12]  # ends with a 5000-sample chunk
    torch.testing.assert_close(torch.cat(outs), full, rtol=0, atol=1e-10)
    assert full.std() > 0.1  # not a degenerate (constant) output


def reference_encode(model: SpeechFrontend, samples: torch.Tensor, m: int) -> torch.Tensor:
    """An independent functional transcription of docs/model.md §3.4-§4 from the state dict (RoPE as complex rotation,
    the mask from its definition), on top of the CNN that is checked against transformers separately."""
    cfg, sd = model.cfg, model.state_dict()
    heads, d, window, block = cfg.num_heads, cfg.head_dim, cfg.max_cache_frames, cfg.block_size * m
    units = -(-samples.numel() // SAMPLES_PER_UNIT)
    padded = torch.zeros(399 + units * SAMPLES_PER_UNIT, dtype=torch.float64)
    padded[399 : 399 + samples.numel()] = samples
    with torch.no_grad():
        feats = model.speech_encoder.feature_extractor(padded[None])[0].T  # [F, C]
    n = feats.shape[0]

    def lin(x, name):
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def norm(x, name):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)

    def gelu(x):
        return 0.5 * x * (1 + torch.erf(x / 2**0.5))

    def rotate(x, prefix):  # x [H, F, D], absolute positions 0..F-1
        pos = torch.arange(n, dtype=torch.float64)[:, None]
        if cfg.rope_variant == "interleaved":
            turn = torch.polar(torch.ones(n, d // 2, dtype=torch.float64), pos * sd[f"{prefix}.rotary_emb.freqs"])
            return torch.view_as_real(torch.view_as_complex(x.reshape(heads, n, d // 2, 2)) * turn).flatten(-2)
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        z = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * torch.polar(torch.ones(n, d // 2).double(), pos * inv)
        return torch.cat([z.real, z.imag], dim=-1)

    allowed = torch.zeros(n, n, dtype=torch.bool)
    for t in range(n):
        allowed[t, max(0, t - window) : (t // block + 1) * block] = True

    x = lin(norm(feats, "speech_encoder.layer_norm"), "speech_encoder.post_extract_proj")
    for i in range(cfg.num_layers):
        p = f"speech_encoder.encoder.layers.{i}"
        a = norm(x, f"{p}.self_attn_layer_norm")
        q, k, v = (lin(a, f"{p}.self_attn.{w}_proj").view(n, heads, d).transpose(0, 1) for w in "qkv")
        scores = rotate(q * d**-0.5, f"{p}.self_attn") @ rotate(k, f"{p}.self_attn").transpose(1, 2)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        x = x + lin((probs @ v).transpose(0, 1).reshape(n, -1), f"{p}.self_attn.out_proj")
        x = x + lin(gelu(lin(norm(x, f"{p}.final_layer_norm"), f"{p}.fc1")), f"{p}.fc2")
    x = norm(x, "speech_encoder.encoder.layer_norm")
    for i in range(cfg.adapter_layers):
        w = sd[f"length_shrink.conv_layers.{i}.0.weight"]  # [out, in, 2]
        x = torch.einsum("tkc,ock->to", x.view(-1, 2, x.shape[-1]), w)
        x = gelu(norm(x, f"length_shrink.conv_layers.{i}.2.1"))
    return lin(x, "proj")


@pytest.mark.parametrize("variant", ["interleaved", "half"])
def test_full_matches_independent_reference(variant):
    model = build(tiny_config(rope_variant=variant, max_cache_frames=60))
    samples = audio(4 * SAMPLES_PER_UNIT + 3000)
    torch.testing.assert_close(model.encode_full(samples, 2), reference_encode(model, samples, 2), rtol=0, atol=1e-10)


def test_window_limits_attention():
    """Outputs of frames whose blocks lie inside the window match an unwindowed encoder; later ones do not."""
    samples = audio(6 * SAMPLES_PER_UNIT)
    windowed = build(tiny_config(max_cache_frames=100)).encode_full(samples, 1)
    unwindowed = build(tiny_config(max_cache_frames=10_000)).encode_full(samples, 1)
    # Blocks [0, 48) and [48, 96) end before frame 100: embeddings 0..23 see no window cut, even through 2 layers.
    torch.testing.assert_close(windowed[:24], unwindowed[:24], rtol=0, atol=1e-12)
    assert (windowed[30:] - unwindowed[30:]).abs().amax(dim=1).min() > 1e-6


def test_full_is_block_causal():
    """Changing audio in the last chunk leaves every earlier chunk's embeddings unchanged (CNN + blocks)."""
    model = build()
    a = audio(4 * SAMPLES_PER_UNIT)
    b = a.clone()
    b[3 * SAMPLES_PER_UNIT :] = audio(SAMPLES_PER_UNIT, seed=7)
    out_a, out_b = model.encode_full(a, 1), model.encode_full(b, 1)
    torch.testing.assert_close(out_a[:36], out_b[:36], rtol=0, atol=0)
    assert (out_a[36:] - out_b[36:]).abs().max() > 1e-3


def test_attention_bias_rule():
    """Block 2, window 2, 5 frames: t sees j iff t-2 <= j < end of t's block."""
    frames = torch.arange(5)
    visible = chunk_attention_bias(frames, frames, block_size=2, window=2, dtype=torch.float64) == 0
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0],
            [0, 1, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(visible, expected)
    # A streaming chunk (block 48) after 576 cached frames: the first frame sees all 576, the last 576-47.
    start = 1000
    q = torch.arange(start, start + 48)
    k = torch.arange(start - 576, start + 48)
    seen = (chunk_attention_bias(q, k, 48, 576, torch.float32) == 0)[:, :576].sum(dim=1)
    assert seen[0] == 576 and seen[-1] == 576 - 47


def test_feature_extractor_matches_transformers():
    from transformers import Wav2Vec2Config
    from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2FeatureEncoder

    ours = build().speech_encoder.feature_extractor
    hf_cfg = Wav2Vec2Config(
        conv_dim=[c for c, _, _ in CONV],
        conv_kernel=[k for _, k, _ in CONV],
        conv_stride=[s for _, _, s in CONV],
        feat_extract_norm="layer",
        conv_bias=True,
        feat_extract_activation="gelu",
    )
    hf = Wav2Vec2FeatureEncoder(hf_cfg).to(torch.float64).eval()
    renamed = {
        k.replace(".0.weight", ".conv.weight")
        .replace(".0.bias", ".conv.bias")
        .replace(".2.1.weight", ".layer_norm.weight")
        .replace(".2.1.bias", ".layer_norm.bias"): v
        for k, v in ours.state_dict().items()
    }
    hf.load_state_dict(renamed, strict=True)
    x = audio(2 * (8000 + 399)).to(torch.float64).view(2, -1)
    with torch.no_grad():
        expected = hf(x)
        got = ours(x)
    assert got.shape == expected.shape == (2, 16, 25)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, SAMPLES_PER_UNIT - 1, SAMPLES_PER_UNIT, SAMPLES_PER_UNIT + 1, 2 * SAMPLES_PER_UNIT])
def test_embedding_counts(n):
    model = build()
    cache = model.new_cache(2)
    out = model.encode_chunk(cache, audio(n))
    units = -(-n // SAMPLES_PER_UNIT)
    assert out.shape == (12 * units, LLM_HIDDEN)
    assert cache.frames_encoded == cache.frames_cached == 48 * units
    # The same partial length after a full chunk.
    full_chunk = model.encode_chunk(cache, audio(2 * SAMPLES_PER_UNIT, seed=3))
    assert full_chunk.shape == (24, LLM_HIDDEN)
    assert model.encode_chunk(cache, audio(n, seed=4)).shape == (12 * units, LLM_HIDDEN)
    assert cache.frames_encoded == 48 * (2 * units + 2)


def test_cache_bounded_on_long_stream():
    cfg = tiny_config()
    model = build(cfg)
    cache = model.new_cache(1)
    sizes = []
    for i in range(12):
        model.encode_chunk(cache, audio(SAMPLES_PER_UNIT, seed=10 + i))
        assert cache.frames_cached == min(48 * (i + 1), cfg.max_cache_frames)
        sizes.append(cache.nbytes())
    kv = 2 * cfg.num_layers * cfg.embed_dim * cfg.max_cache_frames * 8
    tail = model.tail_samples(1) * 8  # layer_norm extractor: only the 399-sample receptive overlap
    assert model.tail_samples(1) == 399
    assert sizes[2:] == [kv + tail] * 10
    assert all(k.shape == (cfg.num_heads, cfg.max_cache_frames, cfg.head_dim) for k in cache.keys + cache.values)


def test_bad_input_raises_and_leaves_cache_unchanged():
    model = build()
    cache = model.new_cache(1)
    other = model.new_cache(1)
    for i in range(3):
        model.encode_chunk(cache, audio(SAMPLES_PER_UNIT, seed=20 + i))
    before = snapshot(cache)
    bad_calls = [
        lambda: model.encode_chunk(cache, torch.zeros(0)),
        lambda: model.encode_chunk(cache, torch.zeros(SAMPLES_PER_UNIT + 1)),
        lambda: model.encode_chunk(cache, torch.zeros(2, 100)),
        lambda: model.encode_chunk(cache, torch.zeros((), dtype=torch.float32)),
        lambda: model.encode_chunk(cache, torch.zeros(100, dtype=torch.int16)),
        lambda: model.encode_chunk(cache, [0.0] * 100),
        lambda: model.encode_chunks([cache, other], [audio(100)]),
        lambda: model.encode_chunks([cache, cache], [audio(100), audio(100)]),
        # One good and one bad stream: neither changes.
        lambda: model.encode_chunks([cache, other], [audio(100), torch.zeros(0)]),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()
        assert_same_state(cache, before)
    assert other.audio_tail is None and other.frames_encoded == 0 and other.nbytes() == other.pool.slot_nbytes
    for bad_m in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            model.new_cache(bad_m)
        with pytest.raises(ValueError):
            model.encode_full(audio(100), bad_m)
    with pytest.raises(ValueError):
        model.encode_full(torch.zeros(0), 1)

    # The stream continues as if the bad calls never came.
    next_chunk = audio(SAMPLES_PER_UNIT, seed=99)
    replay, _ = stream(model, torch.cat([audio(SAMPLES_PER_UNIT, seed=20 + i) for i in range(3)] + [next_chunk]), 1)
    torch.testing.assert_close(model.encode_chunk(cache, next_chunk), replay[-1], rtol=0, atol=0)


@pytest.mark.parametrize("max_eager_batch, max_cnn_batch", [(64, 16), (64, 1), (1, 16)])
def test_encode_chunks_equals_one_by_one(monkeypatch, max_eager_batch, max_cnn_batch):
    """Several streams in one call (two share a batch, or are split when batches hold one stream; the CNN in pieces
    of one stream or not) give the same outputs and caches as separate calls."""
    monkeypatch.setattr(speech_frontend, "MAX_EAGER_BATCH", max_eager_batch)
    monkeypatch.setattr(speech_encoder, "MAX_CNN_BATCH", max_cnn_batch)
    model = build()
    histories = [(1, 3, 30), (1, 3, 40), (2, 1, 50), (1, 0, 60)]  # (m, chunks already encoded, seed)

    def prepared():
        caches = []
        for m, chunks, seed in histories:
            history = audio(chunks * SAMPLES_PER_UNIT * m, seed=seed) if chunks else None
            caches.append(stream(model, history, m)[1] if chunks else model.new_cache(m))
        return caches

    nexts = [audio(SAMPLES_PER_UNIT * m - 777, seed=seed + 1) for m, _, seed in histories]
    separate = prepared()
    expected = [model.encode_chunk(c, x) for c, x in zip(separate, nexts)]
    batched = prepared()
    got = model.encode_chunks(batched, nexts)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for c, s in zip(batched, separate):
        assert c.frames_encoded == s.frames_encoded and torch.equal(c.audio_tail, s.audio_tail)
        for a, b in zip(c.keys + c.values, s.keys + s.values):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_rope_variants():
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    offset, theta = 7, 10_000.0
    pos = torch.arange(offset, offset + 5, dtype=torch.float64)[:, None]
    freqs = 1.0 / theta ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)  # [4]
    cos, sin = torch.cos(pos * freqs), torch.sin(pos * freqs)  # [5, 4]

    rot = InterleavedRotary(8, theta).to(torch.float64)
    out = rot(x, offset)
    # Pair (2i, 2i+1) turns by pos * freqs[i].
    torch.testing.assert_close(out[..., 0::2], x[..., 0::2] * cos - x[..., 1::2] * sin, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[..., 1::2], x[..., 1::2] * cos + x[..., 0::2] * sin, rtol=0, atol=1e-6)

    half = HalfRotary(8, theta)(x, offset)
    # Dim i pairs with dim i + D/2.
    torch.testing.assert_close(half[..., :4], x[..., :4] * cos - x[..., 4:] * sin, rtol=0, atol=1e-12)
    torch.testing.assert_close(half[..., 4:], x[..., 4:] * cos + x[..., :4] * sin, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rotary", [InterleavedRotary, HalfRotary])
def test_rope_per_stream_offsets_keep_compact_positions(rotary, dtype):
    """A batch with a padded window gives each stream [S, 1] offsets: queries from its C frames cached, keys from
    C - W. The real keys and the queries then turn exactly as in the unpadded compact layout (int offsets C and 0), bit
    for bit, bf16 included (the interleaved variant builds positions in the input dtype, which rounds above 256)."""
    window, length = 576, 48
    rot = rotary(64, 10_000.0).to(dtype)
    held = [48, 96, 288, 528, 576]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(len(held), 2, length, 64, generator=gen).to(dtype)
    k = torch.randn(len(held), 2, window + length, 64, generator=gen).to(dtype)
    offsets = torch.tensor(held)[:, None]
    q_rot, k_rot = rot(q, offsets), rot(k, offsets - window)
    for s, c in enumerate(held):
        assert torch.equal(q_rot[s], rot(q[s], c))
        assert torch.equal(k_rot[s, :, window - c :], rot(k[s, :, window - c :], 0))


def test_state_dict_names():
    cfg = tiny_config(num_layers=1)
    keys = set(SpeechFrontend(cfg, LLM_HIDDEN).state_dict())
    enc = "speech_encoder."
    expected = {f"{enc}feature_extractor.conv_layers.{i}.{p}" for i in range(7) for p in ("0.weight", "0.bias")}
    expected |= {f"{enc}feature_extractor.conv_layers.{i}.2.1.{p}" for i in range(7) for p in ("weight", "bias")}
    expected |= {
        f"{enc}{n}.{p}" for n in ("layer_norm", "post_extract_proj", "encoder.layer_norm") for p in ("weight", "bias")
    }
    layer = f"{enc}encoder.layers.0."
    modules = [f"self_attn.{n}_proj" for n in ("q", "k", "v", "out")]
    modules += ["self_attn_layer_norm", "fc1", "fc2", "final_layer_norm"]
    expected |= {f"{layer}{n}.{p}" for n in modules for p in ("weight", "bias")}
    expected.add(f"{layer}self_attn.rotary_emb.freqs")
    expected |= {f"length_shrink.conv_layers.{i}.0.weight" for i in range(2)}
    expected |= {f"length_shrink.conv_layers.{i}.2.1.{p}" for i in range(2) for p in ("weight", "bias")}
    expected |= {"proj.weight", "proj.bias"}
    assert keys == expected

    group_half = set(
        SpeechFrontend(dataclasses.replace(cfg, extractor_mode="group_norm", rope_variant="half"), 8).state_dict()
    )
    norm_keys = {k for k in expected if ".2.1." in k and "feature_extractor" in k}
    assert group_half == (expected - norm_keys - {f"{layer}self_attn.rotary_emb.freqs"}) | {
        f"{enc}feature_extractor.conv_layers.0.2.weight",
        f"{enc}feature_extractor.conv_layers.0.2.bias",
    }
    freqs = SpeechFrontend(cfg, 8).state_dict()[f"{layer}self_attn.rotary_emb.freqs"]
    assert freqs.shape == (cfg.head_dim // 2,)


def test_bfloat16_close_to_float64():
    """The bf16 path (reference numerics: fp32 norms/softmax/GELU) stays close to the fp64 result."""
    samples = audio(3 * SAMPLES_PER_UNIT)
    exact = torch.cat(stream(build(), samples, 1)[0])
    low = torch.cat(stream(build(dtype=torch.bfloat16), samples, 1)[0])
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.double() - exact).norm() / exact.norm() < 0.05


def test_cnn_tail_is_the_receptive_overlap_for_layer_norm_only():
    """layer_norm: each frame depends on its 400 samples only, so 399 samples of tail reproduce the full pass (the
    streaming-equals-encode_full tests check the outputs); group_norm normalizes over time: the reference's block."""
    cfg = tiny_config()
    assert build(cfg).tail_samples(2) == 399
    grouped = build(dataclasses.replace(cfg, extractor_mode="group_norm"))
    assert grouped.tail_samples(1) == 399 + 320 * 48 and grouped.tail_samples(2) == 399 + 2 * 320 * 48
    cache = grouped.new_cache(1)
    for seed in range(3):
        grouped.encode_chunk(cache, audio(SAMPLES_PER_UNIT, seed=seed))
        assert cache.audio_tail.numel() == 399 + 320 * 48
