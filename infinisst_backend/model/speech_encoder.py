"""Streaming speech frontend: wav2vec 2.0 CNN + RoPE transformer with a chunk-causal window, length adapter, projection.

The data path for one chunk of one stream (docs/model.md §3, §4):

    new samples (1..15360*m) --pad to k*15360--> [raw tail | new]  --CNN--> keep the 48*k new frames
      --> layer_norm --> post_extract_proj --> pre-LN layers (attend to <= max_cache_frames cached frames + the chunk)
      --> encoder.layer_norm --> length adapter (4x down) --> proj  ==>  [12*k, llm_hidden]

Per stream, :class:`SpeechCache` carries the raw-audio tail the CNN re-runs on and a slot of a
:class:`SpeechCachePool`, a ring buffer holding, per layer, the *un-rotated* keys and values of the last
``max_cache_frames`` frames. RoPE is applied on every chunk with compact positions (the oldest cached frame is
position 0), as the reference does; attention scores only depend on position differences, so this equals the offline
computation with absolute positions (:meth:`SpeechFrontend.encode_full`).

A batch reads every stream's whole ring window (W = ``max_cache_frames`` rows) whatever the stream's age, and a
per-stream mask hides the rows a young stream has not written yet (each keeps its own compact positions), so streams
past their first chunk batch together at any age and block phase. In the steady state (full tail, chunk and window)
the whole batch can be a CUDA-graph replay instead (:mod:`.encoder_graphs`).

Attention mask rule (shared by the streaming and the offline path): frame ``t`` (absolute index in the stream) sees
frame ``j`` iff ``t - max_cache_frames <= j < end_of_block(t)``, blocks being ``48*m`` frames aligned to frame 0.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infinisst_backend.config import SAMPLES_PER_UNIT, SpeechEncoderConfig
from infinisst_backend.errors import CapacityError
from infinisst_backend.kernels import window_kernel

if TYPE_CHECKING:
    from infinisst_backend.runtime.encoder_graphs import EncoderGraphs


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
        acc = _accumulate_dtype(like.dtype)
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
_Positions = tuple[int | Tensor, int | Tensor]

# EXPERIMENT, off: the chunk attention as one fused kernel (F.scaled_dot_product_attention: scores and softmax never
# materialized, in the kernel's own precision) instead of the reference arithmetic (bf16 scores, fp32 softmax).
# `benchmarks/profile_encoder.py --modes kernel,kernel+fused` times both on a GPU (H100, 16 streams graphed: 11.9 ->
# 9.7 ms, embeddings 1.2e-2 off the reference); off, the served path keeps the reference's bits.
FUSED_ATTENTION = False
# Streams per eager encoder batch. A burst of first chunks (every stream opening within one period) would otherwise run
# as one batch whose activations grow with the stream count: at 290 paper-size streams the CNN's fp32 layer norm
# alone asked for more than the 8 GiB a full KV pool leaves free. Larger batches gain little (compute-bound).
MAX_EAGER_BATCH = 64
# Streams per CNN pass inside a batch, eager or captured. The CNN's first layers hold [streams, 512, 3100 m]
# activations with an fp32 copy for the layer norm (390 MiB for 32 streams at m=2), which a CUDA graph's pool keeps
# for good: at the memory limit the KV pool leaves too little room for that (an H100 at 303 paper-size streams ran out
# of memory capturing that encoder graph: 306 MiB free, 1.8 GiB fragmented). The transformer layers, whose
# activations are small, still run the whole batch at once.
MAX_CNN_BATCH = 8

# The cached window's keys and values built by one Triton kernel (gather, concatenation and key RoPE in one pass,
# :mod:`.window_kernel`; bit for bit the reference arithmetic below) in the passes captured into CUDA graphs
# (:mod:`.encoder_graphs` enters :func:`window_kernel_passes`), where only GPU time counts, on CUDA with Triton
# installed. Eager passes keep the separate ops: there the kernel's launch from Python costs more host time than it
# saves GPU time (one stream, steady state, on an H100: 22.6 ms per eager call without it, 40.0 ms with it).
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


@dataclass(frozen=True)
class RingWindow:
    """A layer's cached window, still in the pool: ``rows`` [S, C] of layer ``layer`` of ``pool``, oldest first."""

    pool: SpeechCachePool
    layer: int
    rows: Tensor

    def gather(self) -> tuple[Tensor, Tensor]:
        """(k, v) [S, H, C, D], un-rotated copies."""
        return self.pool.gather(self.layer, self.rows)

    def layer_kv(self) -> tuple[Tensor, Tensor]:
        """The layer's whole K and V storage, [slots * W, H, D] each."""
        return self.pool.data[self.layer, 0], self.pool.data[self.layer, 1]


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

    def forward(self, x: Tensor, past: RingWindow | None, bias: Tensor, positions: _Positions | None = None):
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
        if fast and WINDOW_ATTENTION and not FUSED_ATTENTION and window_kernel.attention_usable(q, self.head_dim):
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
        if FUSED_ATTENTION:
            mask = bias.to(q.dtype).expand(batch, 1, *bias.shape[-2:])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)  # q is scaled already
        else:
            scores = q @ k.transpose(-1, -2) + bias  # [S, H, T, C+T]
            out = torch.softmax(scores.to(_accumulate_dtype(scores.dtype)), dim=-1).to(v.dtype) @ v
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

    def forward(self, x: Tensor, past: RingWindow | None, bias: Tensor, positions: _Positions | None = None):
        attn, k, v = self.self_attn(self.self_attn_layer_norm(x), past, bias, positions)
        x = x + attn
        hidden = self.fc1(self.final_layer_norm(x))
        hidden = F.gelu(hidden.to(_accumulate_dtype(hidden.dtype))).to(hidden.dtype)
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
        positions: _Positions | None = None,
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


class SpeechCachePool:
    """The K/V storage of many streams' speech caches, one slot per stream.

    ``data`` [layers, 2 (K, V), slots * W, H, D] holds un-rotated keys and values, W = ``max_cache_frames``. Slot s
    owns rows s*W .. s*W + W - 1 as a ring buffer: absolute frame f of its stream lives at row s*W + f % W. A batch of
    streams thus reads its cached frames with one gather per layer and stores a chunk's frames with one scatter per
    layer and K/V (or one for all layers, :meth:`write_all`), whatever the batch size.

    A batch always reads a stream's whole slot (W rows), the frames it has not written yet included, and masks those
    out (:func:`chunk_attention_bias`). The memory is not initialized; a stream's first chunk zeroes its slot
    (:meth:`clear`) so that the masked rows hold finite values (an -inf bias does not cancel a NaN).

    A fixed pool (the engine's, one slot per possible stream, allocated up front) raises CapacityError when every
    slot is in use; a growable one (the frontend's default, for tests and tools) doubles instead.
    """

    def __init__(
        self,
        cfg: SpeechEncoderConfig,
        num_slots: int,
        dtype: torch.dtype,
        device: torch.device | str,
        growable: bool = False,
    ):
        self.cfg = cfg
        self.window = cfg.max_cache_frames
        self.growable = growable
        shape = (cfg.num_layers, 2, num_slots * self.window, cfg.num_heads, cfg.head_dim)
        self.data = torch.empty(shape, dtype=dtype, device=device)
        self._free = list(range(num_slots - 1, -1, -1))  # a stack: lowest slot first, released slots reused first

    @property
    def num_slots(self) -> int:
        return self.data.shape[2] // self.window

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def slot_nbytes(self) -> int:
        """Bytes of one slot: K and V of ``max_cache_frames`` frames in every layer."""
        return 2 * self.cfg.num_layers * self.window * self.cfg.embed_dim * self.data.element_size()

    def acquire(self) -> int:
        """A free slot. Raises CapacityError if a fixed pool is full."""
        if not self._free:
            if not self.growable:
                raise CapacityError(f"all {self.num_slots} speech cache slots are in use")
            self._grow()
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def ring_rows(self, slots: list[int], first_frames: list[int], count: int) -> Tensor:
        """Rows [S, count] of the absolute frames first_frames[s] .. first_frames[s] + count - 1 of slot slots[s]."""
        start = torch.tensor([slots, first_frames], device=self.data.device)  # [2, S]: one small copy
        return self.rows(start[0], start[1], count)

    def rows(self, slots: Tensor, first_frames: Tensor, count: int) -> Tensor:
        """:meth:`ring_rows` from device tensors [S] (pure device ops: usable inside a CUDA graph). Frames may be
        negative (before the stream's start): they map to rows of the slot all the same."""
        frames = first_frames[:, None] + torch.arange(count, device=first_frames.device)
        return slots[:, None] * self.window + frames % self.window  # floor modulo: in 0..W-1 for negative frames too

    def gather(self, layer: int, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Layer ``layer``'s (k, v) [S, H, C, D] at rows [S, C]: a copy, made by one indexing op."""
        # index_select of whole frames (H*D values) is faster on GPU than advanced indexing.
        kv = self.data[layer].flatten(2).index_select(1, rows.flatten())  # [2, S*C, H*D]
        k, v = kv.view(2, *rows.shape, self.cfg.num_heads, self.cfg.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)

    def write(self, layer: int, rows: Tensor, k: Tensor, v: Tensor) -> None:
        """Store layer ``layer``'s (k, v) [S, F, H, D] at rows [S, F], which must be distinct."""
        self.data[layer, 0][rows] = k
        self.data[layer, 1][rows] = v

    def write_all(self, rows: Tensor, kv: Tensor) -> None:
        """Store every layer's K and V, ``kv`` [layers, 2, S, F, H, D], at rows [S, F] (distinct): one op."""
        self.data.index_copy_(2, rows.flatten(), kv.flatten(2, 3))

    def clear(self, slots: Tensor) -> None:
        """Zero every row of the slots [S] (device tensor), in every layer: one op."""
        rows = slots[:, None] * self.window + torch.arange(self.window, device=slots.device)
        self.data.index_fill_(2, rows.flatten(), 0)

    def _grow(self) -> None:
        old = self.num_slots
        new = max(1, 2 * old)
        extra = self.data.new_empty((*self.data.shape[:2], (new - old) * self.window, *self.data.shape[3:]))
        self.data = torch.cat((self.data, extra), dim=2)
        self._free.extend(range(new - 1, old - 1, -1))


class SpeechCache:
    """One stream's encoder state: a :class:`SpeechCachePool` slot for the K/V of its last ``max_cache_frames``
    frames, and the raw-audio tail (at most prefix + 320*48*m samples), so memory is bounded whatever the stream
    length. The slot goes back to the pool on :meth:`release` or when the cache is garbage-collected."""

    __slots__ = ("pool", "slot", "m", "audio_tail", "frames_encoded", "_finalizer", "__weakref__")

    def __init__(self, pool: SpeechCachePool, m: int):
        self.pool = pool
        self.slot = pool.acquire()
        self.m = m  # latency multiplier: block size 48*m frames
        self.audio_tail: Tensor | None = None  # [N] raw samples (module dtype) the CNN re-runs on; None at first
        self.frames_encoded = 0  # frames of the stream encoded so far (absolute index of the next frame)
        self._finalizer = weakref.finalize(self, pool.release, self.slot)

    def release(self) -> None:
        """Give the slot back to the pool (a second call does nothing); the cache cannot be used afterwards."""
        self._finalizer()

    @property
    def released(self) -> bool:
        return not self._finalizer.alive

    @property
    def frames_cached(self) -> int:
        """Frames of K/V held per layer: the last ``max_cache_frames`` frames encoded."""
        return min(self.frames_encoded, self.pool.window)

    @property
    def keys(self) -> list[Tensor]:
        """Per layer [H, C, D] cached keys, un-rotated, oldest frame first: copies, for tests and inspection."""
        return self._cached(0)

    @property
    def values(self) -> list[Tensor]:
        """Per layer [H, C, D] cached values, oldest frame first: copies, for tests and inspection."""
        return self._cached(1)

    def nbytes(self) -> int:
        """Bytes this stream holds: its pool slot and its audio tail."""
        tail = 0 if self.audio_tail is None else self.audio_tail.untyped_storage().nbytes()
        return self.pool.slot_nbytes + tail

    def _cached(self, kind: int) -> list[Tensor]:
        if self.released:
            raise ValueError("the speech cache was released")
        cached = self.frames_cached
        rows = self.pool.ring_rows([self.slot], [self.frames_encoded - cached], cached)[0]
        return [layer[kind][rows].transpose(0, 1) for layer in self.pool.data]


@dataclass(slots=True)
class _GroupUpdate:
    """A group's new state, applied to its caches only once every group of the call has been encoded."""

    caches: list[SpeechCache]
    audio_tails: list[Tensor]  # per stream, the new CNN tail
    num_new: int  # frames encoded per stream (48*k)
    rows: Tensor  # [S, F] ring rows of each stream's last F = min(48*k, max_cache_frames) new frames
    # The K/V of those frames: per layer (k, v) [S, F, H, D], or every layer's in one [layers, 2, S, F, H, D].
    present: list[tuple[Tensor, Tensor]] | Tensor
    clear: Tensor | None = None  # first chunks: the slots [S] to zero before the writes

    def own(self) -> None:
        """Copy the K/V and rows out of buffers that are reused (a CUDA-graph group's static outputs)."""
        self.rows = self.rows.clone()
        if isinstance(self.present, Tensor):
            self.present = self.present.clone()

    def apply(self) -> None:
        pool = self.caches[0].pool
        if self.clear is not None:
            pool.clear(self.clear)
        if isinstance(self.present, Tensor):
            pool.write_all(self.rows, self.present)
        else:
            for layer, (k, v) in enumerate(self.present):
                pool.write(layer, self.rows, k, v)
        for cache, tail in zip(self.caches, self.audio_tails):
            cache.audio_tail = tail
            cache.frames_encoded += self.num_new


class SpeechFrontend(nn.Module):
    """Streaming encoder + length adapter + projection into the LLM embedding space (docs/model.md §3, §4).

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
        self._pool: SpeechCachePool | None = None  # the default pool of new_cache, made on first use

    @property
    def dtype(self) -> torch.dtype:
        return self.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    # -- public API ------------------------------------------------------------------------------------------------

    def new_pool(self, num_slots: int) -> SpeechCachePool:
        """A fixed pool of ``num_slots`` cache slots in the module's dtype and device, allocated now."""
        return SpeechCachePool(self.cfg, num_slots, self.dtype, self.device)

    def new_cache(self, m: int, pool: SpeechCachePool | None = None) -> SpeechCache:
        """An empty cache for a stream with latency multiplier m (chunks of 15360*m samples).

        Its K/V live in a slot of ``pool`` (see :meth:`new_pool`), by default of a growable pool of the frontend's.
        Streams are batched only with streams of the same pool. Raises CapacityError if a fixed pool is full.
        """
        _check_multiplier(m)
        if pool is None:
            pool = self._pool
            if pool is None or pool.data.dtype != self.dtype or pool.data.device != self.device:
                pool = self._pool = SpeechCachePool(self.cfg, 0, self.dtype, self.device, growable=True)
        return SpeechCache(pool, m)

    def encode_chunk(self, cache: SpeechCache, samples: Tensor) -> Tensor:
        """Encode a stream's next chunk: 1..15360*m new samples (a full chunk, or the final partial one).

        Returns [12*k, llm_hidden] in the module dtype, k = ceil(len/15360), and updates ``cache`` in place.
        Raises ValueError (cache untouched) for empty, too long, non-1-D or non-float samples. A partial chunk
        followed by more chunks is accepted: its zero padding stays part of the stream and blocks stay aligned to
        frame 0, as in the reference's inference mask.
        """
        return self.encode_chunks([cache], [samples])[0]

    @torch.inference_mode()
    def encode_chunks(
        self, caches: list[SpeechCache], samples_list: list[Tensor], graphs: EncoderGraphs | None = None
    ) -> list[Tensor]:
        """:meth:`encode_chunk` for several streams at once. Streams of one pool with the same m, tail length and
        chunk length run as one batch, which reads and writes its caches with a fixed number of ops whatever its
        size: all streams at their first chunk, or all past it at any age and block phase (each one's cache window
        and mask are padded to the full ``max_cache_frames``).

        ``graphs`` (GPU, :class:`~infinisst_backend.runtime.encoder_graphs.EncoderGraphs` of this frontend): the streams
        with a full chunk of a captured m (later chunks, and first ones with the paper's CNN) run as replays of CUDA
        graphs instead, the others as usual.

        Every input is validated before any cache changes, and caches are updated only after all are encoded.
        """
        if len(caches) != len(samples_list):
            raise ValueError(f"got {len(caches)} caches but {len(samples_list)} sample tensors")
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("the same SpeechCache appears twice in one call")
        if graphs is not None and graphs.frontend is not self:
            raise ValueError("the encoder graphs were captured for another SpeechFrontend")
        units = [self._check_chunk(cache, samples) for cache, samples in zip(caches, samples_list)]

        groups: dict[tuple, list[int]] = {}
        for i, (cache, samples) in enumerate(zip(caches, samples_list)):
            graphed = graphs is not None and graphs.fits(cache, samples)
            # (first and later chunks share a graph, and so a replay)
            tail = None if graphed else 0 if cache.audio_tail is None else cache.audio_tail.numel()
            groups.setdefault((id(cache.pool), cache.m, tail, units[i], graphed), []).append(i)

        outputs: list[Tensor | None] = [None] * len(caches)
        updates: list[_GroupUpdate] = []
        pending: _GroupUpdate | None = None  # the last replay's update: it reads the graphs' static outputs
        for key, members in groups.items():
            graphed = key[-1]
            size = graphs.max_batch if graphed else min(len(members), MAX_EAGER_BATCH)
            for begin in range(0, len(members), size):
                part = members[begin : begin + size]
                group, samples = [caches[i] for i in part], [samples_list[i] for i in part]
                if graphed:
                    if pending is not None:
                        pending.own()  # the next replay overwrites the static outputs
                    embeds, update = graphs.run(group, samples)
                    pending = update
                else:
                    embeds, update = self._encode_group(group, samples)
                for j, i in enumerate(part):
                    outputs[i] = embeds[j]
                updates.append(update)

        for update in updates:
            update.apply()
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
        x, _ = self.speech_encoder.encoder(x, bias)
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

    def _check_chunk(self, cache: SpeechCache, samples: Tensor) -> int:
        """Validate one stream's input; returns its number of units k (the chunk is padded to k*15360 samples)."""
        if not isinstance(cache, SpeechCache):
            raise ValueError(f"expected a SpeechCache, got {type(cache).__name__}")
        if cache.released:
            raise ValueError("the speech cache was released")
        pool = cache.pool
        if pool.cfg != self.cfg or pool.data.dtype != self.dtype or pool.data.device != self.device:
            raise ValueError("the cache's pool was made for another encoder config, dtype or device")
        self._check_samples(samples, SAMPLES_PER_UNIT * cache.m)
        return math.ceil(samples.numel() / SAMPLES_PER_UNIT)

    def tail_samples(self, m: int) -> int:
        """Raw samples a stream keeps for the CNN after a chunk.

        extractor_mode "layer_norm" (the paper's encoder) normalizes each frame on its own, so a new frame depends
        only on the 400 samples under it: the 399-sample receptive overlap is all the next chunk needs, and the
        CNN then runs on 399 + 15360*m samples, exactly like a first chunk (the reference re-runs the previous
        block too, which doubles the CNN's work for the same frames). "group_norm" normalizes over time, so it
        keeps the reference's tail of the overlap + one block.
        """
        if self.cfg.extractor_mode == "layer_norm":
            return self.prefix_samples
        return self.prefix_samples + self.hop * self.cfg.block_size * m

    def _window_inputs(
        self, pool: SpeechCachePool, slots: Tensor, starts: Tensor, num_new: int, m: int, cached: int
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """A group's cache rows and mask from its streams' slots and frames encoded, device tensors [S]; pure device
        ops, so that a CUDA graph computes them from static buffers.

        The keys are ``cached`` frames before the chunk (0 for first chunks, else W = max_cache_frames: frames
        P-W .. P-1 whatever the stream's age P, those before its start masked), then the chunk's T frames.
        Returns (rows [S, C] of the cached frames, or None when C = 0; bias [S, 1, T, C+T]; rows [S, F] where the
        chunk's last F = min(T, W) frames go).
        """
        window = pool.window
        k_frames = starts[:, None] - cached + torch.arange(cached + num_new, device=starts.device)  # [S, C+T]
        bias = chunk_attention_bias(k_frames[:, cached:], k_frames, self.cfg.block_size * m, window, self.dtype)
        read_rows = pool.rows(slots, starts - cached, cached) if cached else None
        keep = min(num_new, window)
        write_rows = pool.rows(slots, starts + (num_new - keep), keep)
        return read_rows, bias[:, None], write_rows

    def _encode_window(
        self,
        audio: Tensor,
        num_new: int,
        pool: SpeechCachePool,
        read_rows: Tensor | None,
        bias: Tensor,
        positions: _Positions | None = None,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """The encoder pass of a group: audio [S, tail + chunk] -> (embeddings [S, T/4, llm_hidden], per layer the
        chunk's (k, v) [S, T, H, D]), each layer's cached window gathered from ``pool`` at ``read_rows``."""
        x = self.speech_encoder.frames(audio, num_new)  # [S, T, E]
        past = partial(RingWindow, pool, rows=read_rows) if read_rows is not None else None
        x, present = self.speech_encoder.encoder(x, bias, past, positions)
        return self.proj(self.length_shrink(x)), present

    def _encode_group(self, caches: list[SpeechCache], samples: list[Tensor]) -> tuple[Tensor, _GroupUpdate]:
        """Encode (eagerly) streams of one pool whose m, tail length and chunk length match.

        Returns embeddings [S, 12*k, llm_hidden] and the group's new state, to apply once the whole call is encoded.
        """
        first, pool, window = caches[0], caches[0].pool, caches[0].pool.window
        length = math.ceil(samples[0].numel() / SAMPLES_PER_UNIT) * SAMPLES_PER_UNIT
        num_new = length // self.hop  # 48*k
        audio = torch.stack(
            [
                self._pad(x, length, prefix=True)
                if c.audio_tail is None
                else torch.cat((c.audio_tail, self._pad(x, length, prefix=False)))
                for c, x in zip(caches, samples)
            ]
        )  # [S, tail + new]

        starts = [c.frames_encoded for c in caches]
        idx = torch.tensor([[c.slot for c in caches], starts], device=self.device)  # [2, S]: one small copy
        cached = 0 if first.audio_tail is None else window
        read_rows, bias, write_rows = self._window_inputs(pool, idx[0], idx[1], num_new, first.m, cached)
        positions = None  # compact: queries from C, keys from 0 (C = W, or 0 for first chunks)
        if cached and min(starts) < window:
            # Streams younger than the window keep their compact positions, each its own: its oldest frame at 0,
            # the unwritten rows before it at negative positions (masked), its queries from its C. The same
            # position values as when it was encoded without the padding, so the same rotations.
            held = idx[1].clamp(max=window)[:, None]  # [S, 1] frames cached
            positions = (held, held - window)
        embeds, present = self._encode_window(audio, num_new, pool, read_rows, bias, positions)

        # The chunk's last max_cache_frames frames (at most) go to the ring, over the oldest ones, and the CNN tail of
        # prefix + 320*48*m samples is kept; cloned so that no cache pins the batch's audio.
        keep = write_rows.shape[1]
        tail_len = self.tail_samples(first.m)
        update = _GroupUpdate(
            caches=caches,
            audio_tails=[audio[s, -tail_len:].clone() for s in range(len(caches))],
            num_new=num_new,
            rows=write_rows,
            present=[(k[:, -keep:], v[:, -keep:]) for k, v in present],
            clear=None if cached else idx[0],
        )
        return embeds, update
