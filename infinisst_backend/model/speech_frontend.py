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
the runtime replays the whole batch from a CUDA graph instead (:mod:`infinisst_backend.runtime.encoder_graphs`,
which decides graph or eager per stream, as the runner does for the LLM).

Attention mask rule (shared by the streaming and the offline path): frame ``t`` (absolute index in the stream) sees
frame ``j`` iff ``t - max_cache_frames <= j < end_of_block(t)``, blocks being ``48*m`` frames aligned to frame 0.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infinisst_backend.config import SAMPLES_PER_UNIT, SpeechEncoderConfig
from infinisst_backend.model.adapter import LengthAdapter
from infinisst_backend.model.speech_cache import CacheUpdate, RingWindow, SpeechCache, SpeechCachePool
from infinisst_backend.model.speech_encoder import (
    Positions,
    SpeechEncoder,
    check_multiplier,
    chunk_attention_bias,
    conv_geometry,
)

# Streams per eager encoder batch. A burst of first chunks (every stream opening within one period) would otherwise run
# as one batch whose activations grow with the stream count, more than a full KV pool leaves free at the paper's
# dimensions (docs/benchmarks/notes.md). Larger batches gain little (compute-bound).
MAX_EAGER_BATCH = 64


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
        check_multiplier(m)
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
    def encode_chunks(self, caches: list[SpeechCache], samples_list: list[Tensor]) -> list[Tensor]:
        """:meth:`encode_chunk` for several streams at once, eagerly. Streams of one pool with the same m, tail length
        and chunk length run as one batch, which reads and writes its caches with a fixed number of ops whatever its
        size: all streams at their first chunk, or all past it at any age and block phase (each one's cache window
        and mask are padded to the full ``max_cache_frames``).

        Every input is validated before any cache changes, and caches are updated only after all are encoded. (The
        runtime's :func:`~infinisst_backend.runtime.encoder_graphs.encode_chunks` is this call with CUDA graphs.)
        """
        outputs, updates = self.encode_eager(caches, samples_list, self.check_chunks(caches, samples_list))
        for update in updates:
            update.apply()
        return outputs

    def check_chunks(self, caches: list[SpeechCache], samples_list: list[Tensor]) -> list[int]:
        """Validate a call's inputs (see :meth:`encode_chunk`); returns each stream's number of units k."""
        if len(caches) != len(samples_list):
            raise ValueError(f"got {len(caches)} caches but {len(samples_list)} sample tensors")
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("the same SpeechCache appears twice in one call")
        return [self.check_chunk(cache, samples) for cache, samples in zip(caches, samples_list)]

    @torch.inference_mode()
    def encode_eager(
        self, caches: list[SpeechCache], samples_list: list[Tensor], units: list[int]
    ) -> tuple[list[Tensor], list[CacheUpdate]]:
        """Encode validated streams (``units`` from :meth:`check_chunks`) in groups of one pool, m, tail length and
        chunk length, at most ``MAX_EAGER_BATCH`` streams each: (each stream's embeddings, the groups' updates, not
        yet applied)."""
        groups: dict[tuple, list[int]] = {}
        for i, cache in enumerate(caches):
            tail = 0 if cache.audio_tail is None else cache.audio_tail.numel()
            groups.setdefault((id(cache.pool), cache.m, tail, units[i]), []).append(i)
        outputs: list[Tensor | None] = [None] * len(caches)
        updates: list[CacheUpdate] = []
        for members in groups.values():
            for begin in range(0, len(members), MAX_EAGER_BATCH):
                part = members[begin : begin + MAX_EAGER_BATCH]
                embeds, update = self.encode_group([caches[i] for i in part], [samples_list[i] for i in part])
                for j, i in enumerate(part):
                    outputs[i] = embeds[j]
                updates.append(update)
        return outputs, updates

    @torch.inference_mode()
    def encode_full(self, samples: Tensor, m: int) -> Tensor:
        """Non-incremental reference: the whole zero-prefixed stream in one pass, absolute positions, full mask.

        The stream is padded to a multiple of 15360 samples, which is what chunk-by-chunk encoding with a partial
        last chunk does, so the outputs match :meth:`encode_chunk` row for row (for extractor_mode "group_norm"
        they do not: its CNN normalizes over time, so streaming depends on the re-run tail, as in the reference).
        Memory grows with the square of the stream length: for tests and checks only.
        """
        self._check_samples(samples, None)
        return self.forward_full(samples[None], m)[0][0]

    def forward_full(self, audio: Tensor, m: int, lengths: list[int] | None = None) -> tuple[Tensor, Tensor]:
        """The offline pass of :meth:`encode_full` for a batch of padded streams, differentiable (training).

        ``audio [B, L]``: stream b holds ``lengths[b]`` samples (default: all L); what follows them is read as
        zeros. Each stream is zero-prefixed and padded to ``k = ceil(L / 15360)`` units. Returns (embeddings
        ``[B, 12*k, llm_hidden]``, encoder frames ``[B, 48*k, E]`` after the encoder's final norm). Stream b's first
        ``ceil(lengths[b] / 15360)`` units equal :meth:`encode_full` of its own samples: a frame never sees the
        frames of the units after its stream's last (its padding), which only affects the rows after them.
        """
        check_multiplier(m)
        if audio.ndim != 2 or audio.shape[1] == 0 or not audio.is_floating_point():
            raise ValueError(f"audio must be a non-empty float [B, L] tensor, got {audio.dtype} {tuple(audio.shape)}")
        units = math.ceil(audio.shape[1] / SAMPLES_PER_UNIT)
        audio = audio.to(device=self.device, dtype=self.dtype)
        if lengths is not None:
            if len(lengths) != audio.shape[0] or not all(0 < n <= audio.shape[1] for n in lengths):
                raise ValueError(f"lengths {lengths} do not fit audio of shape {tuple(audio.shape)}")
            # Zeros after each stream's samples, as the padding of its last chunk.
            ends = torch.tensor(lengths, device=self.device)[:, None]
            audio = audio.masked_fill(torch.arange(audio.shape[1], device=self.device) >= ends, 0.0)
        audio = F.pad(audio, (self.prefix_samples, units * SAMPLES_PER_UNIT - audio.shape[1]))
        num_frames = units * self.cfg.block_size
        x = self.speech_encoder.frames(audio, num_frames)  # [B, F, E]
        frames = torch.arange(num_frames, device=self.device)
        bias = chunk_attention_bias(frames, frames, self.cfg.block_size * m, self.cfg.max_cache_frames, self.dtype)
        if lengths is not None:
            # Frames of a stream's own units see only those; its padding frames also see the rule's frames (no
            # fully masked row, whose NaNs would reach the real frames through the zero-weighted values).
            valid = torch.tensor(
                [math.ceil(n / SAMPLES_PER_UNIT) * self.cfg.block_size for n in lengths], device=self.device
            )[:, None, None]  # [B, 1, 1]
            hidden = (frames[None, None, :] >= valid) & (frames[None, :, None] < valid)  # [B, F(q), F(k)]
            bias = bias.masked_fill(hidden, float("-inf"))[:, None]  # [B, 1, F, F]
        x, _ = self.speech_encoder.encoder(x, bias)
        return self.proj(self.length_shrink(x)), x

    # -- the pieces of a pass (the runtime's CUDA graphs capture the same ones) ------------------------------------

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

    def check_chunk(self, cache: SpeechCache, samples: Tensor) -> int:
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

    def window_inputs(
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

    def encode_window(
        self,
        audio: Tensor,
        num_new: int,
        pool: SpeechCachePool,
        read_rows: Tensor | None,
        bias: Tensor,
        positions: Positions | None = None,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """The encoder pass of a group: audio [S, tail + chunk] -> (embeddings [S, T/4, llm_hidden], per layer the
        chunk's (k, v) [S, T, H, D]), each layer's cached window gathered from ``pool`` at ``read_rows``."""
        x = self.speech_encoder.frames(audio, num_new)  # [S, T, E]
        past = partial(RingWindow, pool, rows=read_rows) if read_rows is not None else None
        x, present = self.speech_encoder.encoder(x, bias, past, positions)
        return self.proj(self.length_shrink(x)), present

    def encode_group(self, caches: list[SpeechCache], samples: list[Tensor]) -> tuple[Tensor, CacheUpdate]:
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
        read_rows, bias, write_rows = self.window_inputs(pool, idx[0], idx[1], num_new, first.m, cached)
        positions = None  # compact: queries from C, keys from 0 (C = W, or 0 for first chunks)
        if cached and min(starts) < window:
            # Streams younger than the window keep their compact positions, each its own: its oldest frame at 0,
            # the unwritten rows before it at negative positions (masked), its queries from its C. The same
            # position values as when it was encoded without the padding, so the same rotations.
            held = idx[1].clamp(max=window)[:, None]  # [S, 1] frames cached
            positions = (held, held - window)
        embeds, present = self.encode_window(audio, num_new, pool, read_rows, bias, positions)

        # The chunk's last max_cache_frames frames (at most) go to the ring, over the oldest ones, and the CNN tail of
        # prefix + 320*48*m samples is kept; cloned so that no cache pins the batch's audio.
        keep = write_rows.shape[1]
        tail_len = self.tail_samples(first.m)
        update = CacheUpdate(
            caches=caches,
            audio_tails=[audio[s, -tail_len:].clone() for s in range(len(caches))],
            num_new=num_new,
            rows=write_rows,
            present=[(k[:, -keep:], v[:, -keep:]) for k, v in present],
            clear=None if cached else idx[0],
        )
        return embeds, update
