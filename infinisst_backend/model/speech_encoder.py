"""The streaming speech encoder: wav2vec 2.0 CNN feature extractor + RoPE transformer with a chunk-causal window.

The encoder part of the data path for one chunk (docs/model.md §3):

    [raw tail | new samples]  --CNN--> keep the 48*k new frames
      --> layer_norm --> post_extract_proj --> pre-LN layers (attend to <= max_cache_frames cached frames + the chunk)
      --> encoder.layer_norm  ==>  [S, 48*k, E]

Each layer reads its cached window from a :class:`~.speech_cache.SpeechCachePool` (:class:`~.speech_cache.RingWindow`)
and returns the chunk's own keys and values, un-rotated, for the cache. RoPE is applied on every chunk with compact
positions (the oldest cached frame is position 0), as the reference does; attention scores only depend on position
differences, so this equals the offline computation with absolute positions.

Attention mask rule (shared by the streaming and the offline path): frame ``t`` (absolute index in the stream) sees
frame ``j`` iff ``t - max_cache_frames <= j < end_of_block(t)``, blocks being ``48*m`` frames aligned to frame 0.
The frontend that ties encoder, cache, adapter and projection together is :mod:`.speech_frontend`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infinisst_backend.config import SpeechEncoderConfig
from infinisst_backend.kernels import window_kernel
from infinisst_backend.model.speech_cache import RingWindow


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the dtype itself for fp32/fp64 (\"computed in fp32\" must not downcast fp64 tests)."""
    return torch.promote_types(dtype, torch.float32)


def conv_geometry(conv_layers: list[tuple[int, int, int]]) -> tuple[int, int]:
    """(receptive field, hop) in samples of a stack of valid Conv1d layers: (400, 320) for wav2vec 2.0."""
    receptive, hop = 1, 1
    for _, kernel, stride in conv_layers:
        receptive += (kernel - 1) * hop
        hop *= stride
    return receptive, hop


def check_multiplier(m: int) -> None:
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"invalid latency multiplier m={m!r}: expected an int >= 1")


def chunk_attention_bias(
    q_frames: Tensor, k_frames: Tensor, block_size: int, window: int, dtype: torch.dtype
) -> Tensor:
    """Additive mask [..., Tq, Tk] (0 or -inf) from absolute frame indices of queries [..., Tq] and keys [..., Tk]
    (leading dims broadcast: one mask per stream from [S, Tq] and [S, Tk]).

    Frame t sees frame j iff ``t - window <= j < (t // block_size + 1) * block_size``: full attention inside its
    block, a per-frame sliding window into the past, nothing from later blocks. Keys before the stream's start
    (negative indices: the unwritten part of a padded cache window) are never seen.
    """
    q, k = q_frames[..., :, None], k_frames[..., None, :]
    block_end = (q // block_size + 1) * block_size
    visible = (k >= q - window) & (k < block_end) & (k >= 0)
    bias = torch.zeros(visible.shape, dtype=dtype, device=q_frames.device)
    return bias.masked_fill_(~visible, float("-inf"))


# ----------------------------------------------------------------------------------------------------------------
# CNN feature extractor


class TransposeLast(nn.Module):
    """[B, C, T] <-> [B, T, C]; parameter-free, it only fixes the ``.2.1`` index of the norm in the key names."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(-2, -1)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in (at least) fp32 and cast back, as fairseq's extractor does."""

    def forward(self, x: Tensor) -> Tensor:
        acc = accumulate_dtype(x.dtype)
        weight = self.weight.to(acc) if self.weight is not None else None
        bias = self.bias.to(acc) if self.bias is not None else None
        return F.layer_norm(x.to(acc), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in (at least) fp32 and cast back (extractor_mode "group_norm", layer 0 only)."""

    def forward(self, x: Tensor) -> Tensor:
        acc = accumulate_dtype(x.dtype)
        weight = self.weight.to(acc) if self.weight is not None else None
        bias = self.bias.to(acc) if self.bias is not None else None
        return F.group_norm(x.to(acc), self.num_groups, weight, bias, self.eps).to(x.dtype)


def conv_block(in_ch: int, out_ch: int, kernel: int, stride: int, bias: bool, norm: nn.Module | None) -> nn.Sequential:
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
                norm = nn.Sequential(TransposeLast(), Fp32LayerNorm(out_ch, eps=cfg.layer_norm_eps), TransposeLast())
            elif i == 0:  # group_norm: per-channel statistics over time, first layer only
                norm = Fp32GroupNorm(out_ch, out_ch, eps=cfg.layer_norm_eps)
            layers.append(conv_block(in_ch, out_ch, kernel, stride, cfg.conv_bias, norm))
            in_ch = out_ch
        self.conv_layers = nn.ModuleList(layers)

    def forward(self, audio: Tensor) -> Tensor:
        x = audio.unsqueeze(1)  # [B, 1, L]
        for layer in self.conv_layers:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------------------------
# Rotary embeddings


def _rope_positions(offset: Tensor, length: int) -> Tensor:
    """Integer positions ``offset[..., None] + 0..length-1``: per-row offsets (e.g. [S, 1] for x [S, H, T, D]).

    Exact integers, rounded once to the rotary's dtype by the caller. They equal the int path's values (``arange``
    in that dtype ``+ offset``) in fp32/fp64, and in bf16 for offset 0 (keys) and for offsets bf16 holds exactly
    (frames cached: multiples of 48 below 4096) with length <= 256 (queries of m <= 5): there the int path only
    rounds the exact sum too.
    """
    return offset[..., None] + torch.arange(length, device=offset.device)


class InterleavedRotary(nn.Module):
    """rotary-embedding-torch semantics: feature pair (2i, 2i+1) turns by angle pos * freqs[i].

    ``freqs`` [head_dim/2] is a frozen parameter so that it appears in the state dict (``...rotary_emb.freqs``).
    Positions are built in the input's dtype and angles in the freqs' dtype, as the library does (bf16 in the
    reference, which rounds positions above 256).
    """

    interleaved = True

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        exponents = torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim
        self.freqs = nn.Parameter(1.0 / theta**exponents, requires_grad=False)

    def tables(self, offset: int | Tensor, length: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin) [..., length, D/2] of positions offset..offset+length-1 for inputs like ``like``, in the dtype
        that multiplies them (the freqs')."""
        if isinstance(offset, Tensor):
            positions = _rope_positions(offset, length).to(like.dtype)
        else:
            positions = torch.arange(length, device=like.device, dtype=like.dtype) + offset
        angles = positions.to(self.freqs.dtype)[..., None] * self.freqs  # [..., T, D/2]
        return angles.cos(), angles.sin()

    def forward(self, x: Tensor, offset: int | Tensor) -> Tensor:
        """x [..., T, D] -> rotated x, positions offset..offset+T-1 (a tensor offset: :func:`_rope_positions`)."""
        # f0 f0 f1 f1 ...: repeat_interleave's values, by expand (pure device ops, as a CUDA graph needs).
        cos, sin = (t[..., None].expand(*t.shape, 2).flatten(-2) for t in self.tables(offset, x.shape[-2], x))
        pairs = x.unflatten(-1, (-1, 2))
        turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (a, b) -> (-b, a)
        return (x * cos + turned * sin).to(x.dtype)


class HalfRotary(nn.Module):
    """HF ``rotate_half`` semantics: dim i pairs with dim i + D/2, angle pos * theta^(-2i/D); cos/sin in >= fp32."""

    interleaved = False

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def tables(self, offset: int | Tensor, length: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin) [..., length, D/2] of positions offset..offset+length-1 for inputs like ``like``, computed in
        >= fp32 and rounded to the inputs' dtype, which multiplies them."""
        acc = accumulate_dtype(like.dtype)
        exponents = torch.arange(0, self.head_dim, 2, device=like.device, dtype=acc) / self.head_dim
        inv_freq = 1.0 / self.theta**exponents
        if isinstance(offset, Tensor):
            positions = _rope_positions(offset, length).to(acc)
        else:
            positions = torch.arange(offset, offset + length, device=like.device, dtype=acc)
        angles = positions[..., None] * inv_freq  # [..., T, D/2]
        return angles.cos().to(like.dtype), angles.sin().to(like.dtype)

    def forward(self, x: Tensor, offset: int | Tensor) -> Tensor:
        """x [..., T, D] -> rotated x, positions offset..offset+T-1 (a tensor offset: :func:`_rope_positions`)."""
        cos, sin = (torch.cat((t, t), dim=-1) for t in self.tables(offset, x.shape[-2], x))  # [..., T, D]
        first, second = x.chunk(2, dim=-1)
        turned = torch.cat((-second, first), dim=-1)
        return x * cos + turned * sin


# ----------------------------------------------------------------------------------------------------------------
# Transformer

# RoPE positions of (the first query, the first key): ints, or per-stream [S, 1] tensors.
Positions = tuple[int | Tensor, int | Tensor]

# Streams per CNN pass inside a batch, eager or captured. The CNN's first layers hold [streams, 512, 3100 m]
# activations with an fp32 copy for the layer norm, which a CUDA graph's pool keeps for good: at the memory limit
# the KV pool leaves too little room for that (docs/benchmarks/notes.md). The transformer layers, whose activations
# are small, still run the whole batch at once.
MAX_CNN_BATCH = 8

# The cached window's keys and values built by one Triton kernel (gather, concatenation and key RoPE in one pass,
# :mod:`.window_kernel`; bit for bit the reference arithmetic below) in the passes captured into CUDA graphs
# (:mod:`.encoder_graphs` enters :func:`window_kernel_passes`), where only GPU time counts, on CUDA with Triton
# installed. Eager passes keep the separate ops: there the kernel's launch from Python costs more host time than it
# saves GPU time (docs/benchmarks/notes.md).
WINDOW_KERNEL = True
# In those passes, the whole chunk attention as one Triton kernel (window_kernel.window_attention: RoPE on queries and
# keys, scores, softmax and the weighted sum, the window's keys and the scores never stored): the reference arithmetic
# with the dot products' and the softmax sum's additions in another order, so rare elements differ by one unit of the
# model dtype. Off: the window kernel builds K/V and the reference ops do the rest (bit for bit the reference).
WINDOW_ATTENTION = True
_WINDOW_KERNEL_PASSES: ContextVar[bool] = ContextVar("window_kernel_passes", default=False)


@contextmanager
def window_kernel_passes() -> Iterator[None]:
    """Encoder passes run inside use the window kernel where it runs (graph warm-up and capture; tests)."""
    token = _WINDOW_KERNEL_PASSES.set(True)
    try:
        yield
    finally:
        _WINDOW_KERNEL_PASSES.reset(token)


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

    def forward(self, x: Tensor, past: RingWindow | None, bias: Tensor, positions: Positions | None = None):
        """x [S, T, E]; past: the :class:`RingWindow` of C cached frames (un-rotated), or None; bias [T, C+T] or
        [S, 1, T, C+T].

        ``positions`` (query offset, key offset), each an int or a per-stream [S, 1] tensor, are the RoPE positions
        of the first query and the first key; by default (C, 0): compact positions, the oldest key at 0.

        Returns (out [S, T, E], k [S, T, H, D], v [S, T, H, D]): the chunk's own keys and values, un-rotated, for
        the cache.
        """
        batch, length, dim = x.shape
        q = self.q_proj(x) * self.scaling
        new_k, new_v = (p(x).view(batch, length, self.num_heads, self.head_dim) for p in (self.k_proj, self.v_proj))
        cached = 0 if past is None else past.rows.shape[1]
        # Compact positions by default: keys 0..C+T-1, queries C..C+T-1 (rotate_queries_with_cached_keys).
        q_pos, k_pos = positions if positions is not None else (cached, 0)
        k = None
        fast = WINDOW_KERNEL and _WINDOW_KERNEL_PASSES.get() and window_kernel.usable(new_k, self.head_dim)
        if fast and WINDOW_ATTENTION and window_kernel.attention_usable(q, self.head_dim):
            pool_k, pool_v = past.layer_kv() if past is not None else (new_k, new_v)
            rows = past.rows if past is not None else new_k.new_zeros((batch, 0), dtype=torch.long)
            try:
                out = window_kernel.window_attention(
                    q.view(batch, length, self.num_heads, self.head_dim),
                    pool_k,
                    pool_v,
                    rows,
                    new_k,
                    new_v,
                    self.rotary_emb.tables(q_pos, length, q),
                    self.rotary_emb.tables(k_pos, cached + length, new_k),
                    bias,
                    self.rotary_emb.interleaved,
                )
                return self.out_proj(out.view(batch, length, dim)), new_k, new_v
            except Exception as e:  # compiled at graph warm-up, outside capture; if that fails, the ops below serve
                window_kernel.disable(f"{type(e).__name__}: {e}")
        if past is not None and fast:
            cos, sin = self.rotary_emb.tables(k_pos, cached + length, new_k)
            try:  # the first call compiles it (graph warm-up, outside capture); if that fails, the ops below serve
                k, v = window_kernel.window_keys_values(
                    *past.layer_kv(), past.rows, new_k, new_v, cos, sin, self.rotary_emb.interleaved
                )
            except Exception as e:
                window_kernel.disable(f"{type(e).__name__}: {e}")
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        if k is None:
            k, v = new_k.transpose(1, 2), new_v.transpose(1, 2)
            if past is not None:
                past_k, past_v = past.gather()
                k = torch.cat((past_k, k), dim=2)
                v = torch.cat((past_v, v), dim=2)
            k = self.rotary_emb(k, k_pos)
        q = self.rotary_emb(q, q_pos)
        scores = q @ k.transpose(-1, -2) + bias  # [S, H, T, C+T]
        out = torch.softmax(scores.to(accumulate_dtype(scores.dtype)), dim=-1).to(v.dtype) @ v
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim)), new_k, new_v


class EncoderLayer(nn.Module):
    """Pre-LN layer: x + attn(LN1 x), then x + fc2(gelu_fp32(fc1(LN2 x)))."""

    def __init__(self, cfg: SpeechEncoderConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.embed_dim)
        self.final_layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, past: RingWindow | None, bias: Tensor, positions: Positions | None = None):
        attn, k, v = self.self_attn(self.self_attn_layer_norm(x), past, bias, positions)
        x = x + attn
        hidden = self.fc1(self.final_layer_norm(x))
        hidden = F.gelu(hidden.to(accumulate_dtype(hidden.dtype))).to(hidden.dtype)
        return x + self.fc2(hidden), k, v


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: SpeechEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)

    def forward(
        self,
        x: Tensor,
        bias: Tensor,
        past: Callable[[int], RingWindow] | None = None,
        positions: Positions | None = None,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """x [S, T, E]; ``past(i)`` gives layer i's cached window (:class:`RingWindow`), or None for no cache: it is
        called layer by layer, and a window is copied out of the pool only inside its layer, so at most one layer's
        copy is alive at a time. ``positions``: see :meth:`SelfAttention.forward`.

        Returns (x, per layer the chunk's (k, v) [S, T, H, D]).
        """
        present = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, past(i) if past is not None else None, bias, positions)
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
        if audio.shape[0] > MAX_CNN_BATCH:
            pieces = audio.split(MAX_CNN_BATCH)
            features = torch.cat([self.feature_extractor(x)[..., -num_frames:] for x in pieces])  # [S, C, T]
        else:
            features = self.feature_extractor(audio)[..., -num_frames:]
        return self.post_extract_proj(self.layer_norm(features.transpose(1, 2)))
