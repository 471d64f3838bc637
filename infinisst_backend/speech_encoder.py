"""Streaming speech frontend: wav2vec 2.0 CNN + RoPE transformer with a chunk-causal window, length adapter, projection.

The data path for one chunk of one stream (model doc §3, §4):

    new samples (1..15360*m) --pad to k*15360--> [raw tail | new]  --CNN--> keep the 48*k new frames
      --> layer_norm --> post_extract_proj --> pre-LN layers (attend to <= max_cache_frames cached frames + the chunk)
      --> encoder.layer_norm --> length adapter (4x down) --> proj  ==>  [12*k, llm_hidden]

Per stream, :class:`SpeechCache` carries the raw-audio tail the CNN re-runs on and, per layer, the *un-rotated* keys
and values of the last ``max_cache_frames`` frames. RoPE is applied on every chunk with compact positions (the oldest
cached frame is position 0), as the reference does; attention scores only depend on position differences, so this
equals the offline computation with absolute positions (:meth:`SpeechFrontend.encode_full`).

Attention mask rule (shared by the streaming and the offline path): frame ``t`` (absolute index in the stream) sees
frame ``j`` iff ``t - max_cache_frames <= j < end_of_block(t)``, blocks being ``48*m`` frames aligned to frame 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SAMPLES_PER_UNIT, SpeechEncoderConfig


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the dtype itself for fp32/fp64 (\"computed in fp32\" must not downcast fp64 tests)."""
    return torch.promote_types(dtype, torch.float32)


def conv_geometry(conv_layers: list[tuple[int, int, int]]) -> tuple[int, int]:
    """(receptive field, hop) in samples of a stack of valid Conv1d layers: (400, 320) for wav2vec 2.0."""
    receptive, hop = 1, 1
    for _, kernel, stride in conv_layers:
        receptive += (kernel - 1) * hop
        hop *= stride
    return receptive, hop


def _check_multiplier(m: int) -> None:
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"invalid latency multiplier m={m!r}: expected an int >= 1")


def chunk_attention_bias(
    q_frames: Tensor, k_frames: Tensor, block_size: int, window: int, dtype: torch.dtype
) -> Tensor:
    """Additive mask [Tq, Tk] (0 or -inf) from absolute frame indices of queries [Tq] and keys [Tk].

    Frame t sees frame j iff ``t - window <= j < (t // block_size + 1) * block_size``: full attention inside its
    block, a per-frame sliding window into the past, nothing from later blocks.
    """
    block_end = (q_frames // block_size + 1) * block_size
    visible = (k_frames[None, :] >= q_frames[:, None] - window) & (k_frames[None, :] < block_end[:, None])
    bias = torch.zeros(visible.shape, dtype=dtype, device=q_frames.device)
    return bias.masked_fill_(~visible, float("-inf"))


# ----------------------------------------------------------------------------------------------------------------
# CNN feature extractor


class _TransposeLast(nn.Module):
    """[B, C, T] <-> [B, T, C]; parameter-free, it only fixes the ``.2.1`` index of the norm in the key names."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(-2, -1)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in (at least) fp32 and cast back, as fairseq's extractor does."""

    def forward(self, x: Tensor) -> Tensor:
        acc = _accumulate_dtype(x.dtype)
        weight = self.weight.to(acc) if self.weight is not None else None
        bias = self.bias.to(acc) if self.bias is not None else None
        return F.layer_norm(x.to(acc), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in (at least) fp32 and cast back (extractor_mode "group_norm", layer 0 only)."""

    def forward(self, x: Tensor) -> Tensor:
        acc = _accumulate_dtype(x.dtype)
        weight = self.weight.to(acc) if self.weight is not None else None
        bias = self.bias.to(acc) if self.bias is not None else None
        return F.group_norm(x.to(acc), self.num_groups, weight, bias, self.eps).to(x.dtype)


def _conv_block(in_ch: int, out_ch: int, kernel: int, stride: int, bias: bool, norm: nn.Module | None) -> nn.Sequential:
    """conv (.0), dropout slot (.1, identity at inference), optional norm (.2), GELU: fairseq's indices."""
    parts: list[nn.Module] = [nn.Conv1d(in_ch, out_ch, kernel, stride=stride, bias=bias), nn.Identity()]
    if norm is not None:
        parts.append(norm)
    parts.append(nn.GELU())
    return nn.Sequential(*parts)


class FeatureExtractor(nn.Module):
    """The 7-layer CNN: raw audio [B, L] -> features [B, C, frames], frame j covering samples [320j, 320j+400)."""

    def __init__(self, cfg: SpeechEncoderConfig):
        super().__init__()
        layers = []
        in_ch = 1
        for i, (out_ch, kernel, stride) in enumerate(cfg.conv_layers):
            norm: nn.Module | None = None
            if cfg.extractor_mode == "layer_norm":
                norm = nn.Sequential(_TransposeLast(), Fp32LayerNorm(out_ch, eps=cfg.layer_norm_eps), _TransposeLast())
            elif i == 0:  # group_norm: per-channel statistics over time, first layer only
                norm = Fp32GroupNorm(out_ch, out_ch, eps=cfg.layer_norm_eps)
            layers.append(_conv_block(in_ch, out_ch, kernel, stride, cfg.conv_bias, norm))
            in_ch = out_ch
        self.conv_layers = nn.ModuleList(layers)

    def forward(self, audio: Tensor) -> Tensor:
        x = audio.unsqueeze(1)  # [B, 1, L]
        for layer in self.conv_layers:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------------------------
# Rotary embeddings


class InterleavedRotary(nn.Module):
    """rotary-embedding-torch semantics: feature pair (2i, 2i+1) turns by angle pos * freqs[i].

    ``freqs`` [head_dim/2] is a frozen parameter so that it appears in the state dict (``...rotary_emb.freqs``).
    Positions are built in the input's dtype and angles in the freqs' dtype, as the library does (bf16 in the
    reference, which rounds positions above 256).
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        exponents = torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim
        self.freqs = nn.Parameter(1.0 / theta**exponents, requires_grad=False)

    def forward(self, x: Tensor, offset: int) -> Tensor:
        """x [..., T, D] -> rotated x, positions offset..offset+T-1."""
        positions = torch.arange(x.shape[-2], device=x.device, dtype=x.dtype) + offset
        angles = positions.to(self.freqs.dtype)[:, None] * self.freqs  # [T, D/2]
        angles = angles.repeat_interleave(2, dim=-1)  # [T, D]: f0 f0 f1 f1 ...
        pairs = x.unflatten(-1, (-1, 2))
        turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (a, b) -> (-b, a)
        return (x * angles.cos() + turned * angles.sin()).to(x.dtype)


class HalfRotary(nn.Module):
    """HF ``rotate_half`` semantics: dim i pairs with dim i + D/2, angle pos * theta^(-2i/D); cos/sin in >= fp32."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, x: Tensor, offset: int) -> Tensor:
        """x [..., T, D] -> rotated x, positions offset..offset+T-1."""
        acc = _accumulate_dtype(x.dtype)
        inv_freq = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, device=x.device, dtype=acc) / self.head_dim)
        positions = torch.arange(offset, offset + x.shape[-2], device=x.device, dtype=acc)
        angles = positions[:, None] * inv_freq  # [T, D/2]
        angles = torch.cat((angles, angles), dim=-1)  # [T, D]
        first, second = x.chunk(2, dim=-1)
        turned = torch.cat((-second, first), dim=-1)
        return x * angles.cos().to(x.dtype) + turned * angles.sin().to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Transformer


class SelfAttention(nn.Module):
    """fairseq MultiheadAttention names; RoPE on q (after scaling) and on all keys, per call."""

    def __init__(self, cfg: SpeechEncoderConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        rotary = InterleavedRotary if cfg.rope_variant == "interleaved" else HalfRotary
        self.rotary_emb = rotary(self.head_dim, cfg.rope_theta)

    def forward(self, x: Tensor, past_k: Tensor | None, past_v: Tensor | None, bias: Tensor):
        """x [S, T, E]; past_k/v [S, H, C, D] un-rotated or None; bias [T, C+T].

        Returns (out [S, T, E], k [S, H, C+T, D], v [S, H, C+T, D]) with k/v un-rotated, for the cache.
        """
        batch, length, dim = x.shape
        q = self.q_proj(x) * self.scaling
        k, v = self.k_proj(x), self.v_proj(x)
        q, k, v = (t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if past_k is not None:
            k = torch.cat((past_k, k), dim=2)
            v = torch.cat((past_v, v), dim=2)
        cached = k.shape[2] - length
        # Compact positions: keys 0..C+T-1, queries C..C+T-1 (rotate_queries_with_cached_keys).
        scores = self.rotary_emb(q, cached) @ self.rotary_emb(k, 0).transpose(-1, -2)  # [S, H, T, C+T]
        scores = scores + bias
        probs = torch.softmax(scores.to(_accumulate_dtype(scores.dtype)), dim=-1).to(v.dtype)
        out = (probs @ v).transpose(1, 2).reshape(batch, length, dim)
        return self.out_proj(out), k, v


class EncoderLayer(nn.Module):
    """Pre-LN layer: x + attn(LN1 x), then x + fc2(gelu_fp32(fc1(LN2 x)))."""

    def __init__(self, cfg: SpeechEncoderConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.embed_dim)
        self.final_layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, past_k: Tensor | None, past_v: Tensor | None, bias: Tensor):
        attn, k, v = self.self_attn(self.self_attn_layer_norm(x), past_k, past_v, bias)
        x = x + attn
        hidden = self.fc1(self.final_layer_norm(x))
        hidden = F.gelu(hidden.to(_accumulate_dtype(hidden.dtype))).to(hidden.dtype)
        return x + self.fc2(hidden), k, v


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: SpeechEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, past: list[tuple[Tensor, Tensor]] | None, bias: Tensor):
        """x [S, T, E]; past: per layer (k, v) [S, H, C, D] or None. Returns (x, per-layer (k, v) [S, H, C+T, D])."""
        present = []
        for i, layer in enumerate(self.layers):
            past_k, past_v = past[i] if past is not None else (None, None)
            x, k, v = layer(x, past_k, past_v, bias)
            present.append((k, v))
        return self.layer_norm(x), present


class SpeechEncoder(nn.Module):
    """fairseq ``Wav2Vec2Model`` names, without mask_emb / pos_conv (unused with RoPE)."""

    def __init__(self, cfg: SpeechEncoderConfig):
        super().__init__()
        channels = cfg.conv_layers[-1][0]
        self.feature_extractor = FeatureExtractor(cfg)
        self.layer_norm = nn.LayerNorm(channels, eps=cfg.layer_norm_eps)
        self.post_extract_proj = nn.Linear(channels, cfg.embed_dim)
        self.encoder = TransformerEncoder(cfg)

    def frames(self, audio: Tensor, num_frames: int) -> Tensor:
        """audio [S, L] -> the last ``num_frames`` frames projected to the model width, [S, num_frames, E]."""
        features = self.feature_extractor(audio)[..., -num_frames:]  # [S, C, T]
        return self.post_extract_proj(self.layer_norm(features.transpose(1, 2)))


class LengthAdapter(nn.Module):
    """Conv1d(k=2, s=2, no bias) -> LayerNorm over channels -> GELU, per block: [S, T, E] -> [S, T / 2^n, E]."""

    def __init__(self, cfg: SpeechEncoderConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.conv_layers = nn.ModuleList(
            _conv_block(
                dim, dim, 2, 2, False, nn.Sequential(_TransposeLast(), nn.LayerNorm(dim, eps=1e-5), _TransposeLast())
            )
            for _ in range(cfg.adapter_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(1, 2)  # [S, E, T]
        for layer in self.conv_layers:
            x = layer(x)
        return x.transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------
# Per-stream cache and the frontend


@dataclass(slots=True)
class SpeechCache:
    """One stream's encoder state. Memory is bounded: the tail holds at most prefix + 320*48*m samples and each
    layer at most ``max_cache_frames`` frames of K/V, whatever the stream length."""

    m: int  # latency multiplier: block size 48*m frames
    audio_tail: Tensor | None = None  # [N] raw samples (module dtype) the CNN re-runs on; None before the first chunk
    frames_encoded: int = 0  # frames of the stream encoded so far (absolute index of the next frame)
    keys: list[Tensor] = field(default_factory=list)  # per layer [H, C, D], un-rotated, C <= max_cache_frames
    values: list[Tensor] = field(default_factory=list)  # per layer [H, C, D]

    @property
    def frames_cached(self) -> int:
        """Frames of K/V held per layer."""
        return self.keys[0].shape[1] if self.keys else 0

    def nbytes(self) -> int:
        """Bytes of tensor storage this cache holds."""
        tensors = [*self.keys, *self.values] + ([self.audio_tail] if self.audio_tail is not None else [])
        return sum(t.untyped_storage().nbytes() for t in tensors)


@dataclass(slots=True)
class _CacheUpdate:
    """A computed new state, applied to its cache only once every stream of the call has been encoded."""

    audio_tail: Tensor
    frames_encoded: int
    keys: list[Tensor]
    values: list[Tensor]


class SpeechFrontend(nn.Module):
    """Streaming encoder + length adapter + projection into the LLM embedding space (model doc §3, §4).

    ``state_dict()`` keys are the released names without the ``model.speech_encoder.`` prefix.
    """

    def __init__(self, cfg: SpeechEncoderConfig, llm_hidden_size: int):
        super().__init__()
        cfg.validate()
        if llm_hidden_size <= 0:
            raise ValueError(f"invalid llm_hidden_size={llm_hidden_size!r}: expected > 0")
        receptive, hop = conv_geometry(cfg.conv_layers)
        if SAMPLES_PER_UNIT % hop or SAMPLES_PER_UNIT // hop != cfg.block_size:
            raise ValueError(
                f"invalid speech_encoder.conv_layers: hop {hop} samples gives {SAMPLES_PER_UNIT / hop} frames per "
                f"{SAMPLES_PER_UNIT} samples, block_size is {cfg.block_size}"
            )
        if cfg.block_size % 2**cfg.adapter_layers:
            raise ValueError(f"invalid speech_encoder.adapter_layers={cfg.adapter_layers}: must divide block_size")
        self.cfg = cfg
        self.hop = hop
        # 399 zeros before the stream: receptive - 1 makes 15360*k samples give exactly 48*k frames.
        self.prefix_samples = receptive - 1
        self.speech_encoder = SpeechEncoder(cfg)
        self.length_shrink = LengthAdapter(cfg)
        self.proj = nn.Linear(cfg.embed_dim, llm_hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    # -- public API ------------------------------------------------------------------------------------------------

    def new_cache(self, m: int) -> SpeechCache:
        """An empty cache for a stream with latency multiplier m (chunks of 15360*m samples)."""
        _check_multiplier(m)
        return SpeechCache(m=m)

    def encode_chunk(self, cache: SpeechCache, samples: Tensor) -> Tensor:
        """Encode a stream's next chunk: 1..15360*m new samples (a full chunk, or the final partial one).

        Returns [12*k, llm_hidden] in the module dtype, k = ceil(len/15360), and updates ``cache`` in place.
        Raises ValueError (cache untouched) for empty, too long, non-1-D or non-float samples. A partial chunk
        followed by more chunks is accepted: its zero padding stays part of the stream and blocks stay aligned to
        frame 0, as in the reference's inference mask.
        """
        return self.encode_chunks([cache], [samples])[0]

    @torch.inference_mode()
    def encode_chunks(self, caches: list[SpeechCache], samples_list: list[Tensor]) -> list[Tensor]:
        """:meth:`encode_chunk` for several streams at once; streams in the same state shape run as one batch.

        Every input is validated before any cache changes, and caches are updated only after all are encoded.
        """
        if len(caches) != len(samples_list):
            raise ValueError(f"got {len(caches)} caches but {len(samples_list)} sample tensors")
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("the same SpeechCache appears twice in one call")
        chunks = [self._prepare_chunk(cache, samples) for cache, samples in zip(caches, samples_list)]

        groups: dict[tuple, list[int]] = {}
        for i, (cache, chunk) in enumerate(zip(caches, chunks)):
            block = self.cfg.block_size * cache.m
            tail = 0 if cache.audio_tail is None else cache.audio_tail.numel()
            key = (cache.m, tail, chunk.numel(), cache.frames_cached, cache.frames_encoded % block)
            groups.setdefault(key, []).append(i)

        outputs: list[Tensor | None] = [None] * len(caches)
        updates: list[_CacheUpdate | None] = [None] * len(caches)
        for members in groups.values():
            embeds, group_updates = self._encode_group([caches[i] for i in members], [chunks[i] for i in members])
            for j, i in enumerate(members):
                outputs[i], updates[i] = embeds[j], group_updates[j]

        for cache, update in zip(caches, updates):
            cache.audio_tail, cache.frames_encoded = update.audio_tail, update.frames_encoded
            cache.keys, cache.values = update.keys, update.values
        return outputs

    @torch.inference_mode()
    def encode_full(self, samples: Tensor, m: int) -> Tensor:
        """Non-incremental reference: the whole zero-prefixed stream in one pass, absolute positions, full mask.

        The stream is padded to a multiple of 15360 samples, which is what chunk-by-chunk encoding with a partial
        last chunk does, so the outputs match :meth:`encode_chunk` row for row (for extractor_mode "group_norm"
        they do not: its CNN normalizes over time, so streaming depends on the re-run tail, as in the reference).
        Memory grows with the square of the stream length: for tests and checks only.
        """
        _check_multiplier(m)
        self._check_samples(samples, None)
        units = math.ceil(samples.numel() / SAMPLES_PER_UNIT)
        audio = self._pad(samples, units * SAMPLES_PER_UNIT, prefix=True)
        num_frames = units * self.cfg.block_size
        x = self.speech_encoder.frames(audio[None], num_frames)  # [1, F, E]
        frames = torch.arange(num_frames, device=self.device)
        bias = chunk_attention_bias(frames, frames, self.cfg.block_size * m, self.cfg.max_cache_frames, self.dtype)
        x, _ = self.speech_encoder.encoder(x, None, bias)
        return self.proj(self.length_shrink(x))[0]

    # -- internals -------------------------------------------------------------------------------------------------

    def _check_samples(self, samples: Tensor, max_len: int | None) -> None:
        if not isinstance(samples, Tensor):
            raise ValueError(f"samples must be a torch.Tensor, got {type(samples).__name__}")
        if samples.ndim != 1:
            raise ValueError(f"samples must be 1-D, got shape {tuple(samples.shape)}")
        if not samples.is_floating_point():
            raise ValueError(f"samples must be floating point, got {samples.dtype}")
        if samples.numel() == 0:
            raise ValueError("samples is empty")
        if max_len is not None and samples.numel() > max_len:
            raise ValueError(f"got {samples.numel()} samples, at most {max_len} (15360*m) fit one chunk")

    def _pad(self, samples: Tensor, length: int, prefix: bool) -> Tensor:
        """Cast to the module dtype/device, zero-pad the end to ``length``, optionally prepend the 399 zeros."""
        samples = samples.to(device=self.device, dtype=self.dtype)
        before = self.prefix_samples if prefix else 0
        return F.pad(samples, (before, length - samples.numel()))

    def _prepare_chunk(self, cache: SpeechCache, samples: Tensor) -> Tensor:
        """Validate one stream's input and return its new audio [k*15360 (+399 on the first call)]."""
        if not isinstance(cache, SpeechCache):
            raise ValueError(f"expected a SpeechCache, got {type(cache).__name__}")
        if cache.keys and len(cache.keys) != self.cfg.num_layers:
            raise ValueError(f"cache has {len(cache.keys)} layers, the encoder {self.cfg.num_layers}")
        self._check_samples(samples, SAMPLES_PER_UNIT * cache.m)
        units = math.ceil(samples.numel() / SAMPLES_PER_UNIT)
        return self._pad(samples, units * SAMPLES_PER_UNIT, prefix=cache.audio_tail is None)

    def _encode_group(self, caches: list[SpeechCache], chunks: list[Tensor]) -> tuple[Tensor, list[_CacheUpdate]]:
        """Encode streams whose tail length, chunk length, cached frames and block phase all match.

        Returns embeddings [S, 12*k, llm_hidden] and each stream's new state.
        """
        first = caches[0]
        num_new = (chunks[0].numel() // SAMPLES_PER_UNIT) * self.cfg.block_size  # 48*k
        audio = torch.stack(
            [chunk if c.audio_tail is None else torch.cat((c.audio_tail, chunk)) for c, chunk in zip(caches, chunks)]
        )  # [S, tail + new]
        x = self.speech_encoder.frames(audio, num_new)  # [S, T, E]

        # Cached keys hold absolute frames P-C .. P-1, the chunk P .. P+T-1.
        start, cached = first.frames_encoded, first.frames_cached
        q_frames = torch.arange(start, start + num_new, device=self.device)
        k_frames = torch.arange(start - cached, start + num_new, device=self.device)
        bias = chunk_attention_bias(
            q_frames, k_frames, self.cfg.block_size * first.m, self.cfg.max_cache_frames, self.dtype
        )
        past = None
        if cached:
            past = [
                (torch.stack([c.keys[i] for c in caches]), torch.stack([c.values[i] for c in caches]))
                for i in range(self.cfg.num_layers)
            ]
        x, present = self.speech_encoder.encoder(x, past, bias)
        embeds = self.proj(self.length_shrink(x))

        # Keep the last max_cache_frames frames per layer and the CNN tail of prefix + 320*48*m samples; clone so
        # no cache pins the batch's storage.
        keep = self.cfg.max_cache_frames
        tail_len = self.prefix_samples + self.hop * self.cfg.block_size * first.m
        updates = [
            _CacheUpdate(
                audio_tail=audio[s, -tail_len:].clone(),
                frames_encoded=start + num_new,
                keys=[k[s, :, -keep:].clone() for k, _ in present],
                values=[v[s, :, -keep:].clone() for _, v in present],
            )
            for s in range(len(caches))
        ]
        return embeds, updates
