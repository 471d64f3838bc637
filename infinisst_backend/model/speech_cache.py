"""The speech cache (docs/model.md §3.5): per stream, the K/V of its last ``max_cache_frames`` encoder frames and the
raw-audio tail the CNN re-runs on, so a stream's encoder memory is bounded whatever its length.

The K/V of many streams live in one :class:`SpeechCachePool` (a ring buffer per stream slot), so a batch reads and
writes its caches with a fixed number of ops whatever its size. A call's new state is a :class:`CacheUpdate`, applied
only once every stream of the call has been encoded.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from infinisst_backend.config import SpeechEncoderConfig
from infinisst_backend.errors import CapacityError


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
class CacheUpdate:
    """A group of streams' new encoder state (CNN tails, frames encoded, the chunk's K/V in their slots), applied to
    their caches only once every group of a call has been encoded."""

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
