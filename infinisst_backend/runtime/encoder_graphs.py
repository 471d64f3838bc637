"""Steady-state speech encoder calls replayed from CUDA graphs (GPU only).

An encoder call (:meth:`SpeechFrontend.encode_chunks`) is bound by the host at serving batch sizes: for wav2vec 2.0
Large, ~800 kernel launches (CNN, 24 layers with their cache gathers, adapter, projection) plus the Python around
them, whatever the batch size (docs/benchmarks/notes.md).

:func:`encode_chunks` decides, stream by stream, graph or eager (as the model runner does for the LLM steps), and
:class:`EncoderGraphs` captures a group's whole pass for every full chunk of a
latency multiplier m (15360*m samples after a full CNN tail, and a cache window of ``max_cache_frames`` rows, those
before the stream's start masked) once per batch-size bucket, and replays it. With the paper's CNN a stream's first
chunk has that shape too: its tail is the 399-sample zero prefix, and all of its window is masked.

How a replay is fed (one call = one bucket of one m):
* each stream's slot and frames encoded, and the chunk's samples when they are on the host (as the engine's are), go
  to static device buffers from one pinned host buffer with one non-blocking copy (two host buffers alternate, and
  one is refilled only once its previous copy has left);
* the CNN tails (device tensors) are stacked into a static buffer by one op;
* the graph does everything else on the device: assembles the audio [S, tail + chunk], computes the rows of each
  layer's window in the pool and the per-stream attention bias from the slots and frames encoded, runs the CNN, the
  layers (each window's keys and values built from the pool by one Triton kernel, :mod:`.window_kernel`, where it
  runs), the adapter and the projection, and writes the embeddings, the
  chunk's K/V [layers, 2, S, T, H, D] and the ring rows they belong at to static outputs;
* rows past the real batch (the bucket is padded up) repeat the first stream's slot and position: they read valid
  rows, and their outputs are dropped. The graph never writes the pool: the frontend's update step does, eagerly,
  after every group of the call is encoded, for the real streams only (one ``index_copy_`` for all layers).

RoPE uses each stream's compact positions, computed on the device from its frames encoded (queries from
``min(P, max_cache_frames)``), exactly as the eager path gives them. Anything else (partial chunks, first chunks of a
"group_norm" CNN, an m without graphs) runs eagerly, as before; more streams than the largest bucket replay in
pieces.

The module imports on CPU; the engine only makes :class:`EncoderGraphs` for a CUDA device. ``capture=False`` runs
the same static-buffer path without graphs (tests, on any device).
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from infinisst_backend.config import MAX_LATENCY_MULTIPLIER, SAMPLES_PER_UNIT
from infinisst_backend.model.speech_cache import CacheUpdate, SpeechCache, SpeechCachePool
from infinisst_backend.model.speech_encoder import accumulate_dtype, check_multiplier, window_kernel_passes
from infinisst_backend.model.speech_frontend import SpeechFrontend
from infinisst_backend.runtime.llm_graphs import capture_graph

logger = logging.getLogger(__name__)

# The engine's largest bucket: a graph's memory pool keeps the peak activations of its largest capture (the CNN's
# first layers dominate: ~100 MB per stream at m=4 for wav2vec 2.0 Large), and a larger group replays in pieces.
MAX_GRAPH_BATCH = 32


def encoder_buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, then every 64, and ``max_batch``."""
    if max_batch < 1:
        raise ValueError(f"invalid max_batch={max_batch!r}: expected >= 1")
    sizes = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, *range(192, max_batch + 64, 64)]
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


@dataclass(slots=True)
class _Shape:
    """The static buffers of one m; a bucket of B streams uses their first B rows."""

    m: int
    chunk_len: int  # samples of a full chunk: 15360*m
    tail_len: int  # samples of a full CNN tail (SpeechFrontend.tail_samples)
    num_new: int  # frames per chunk: 48*m
    chunks: Tensor  # [max, chunk_len] staged samples (device, staging dtype): a view of the device staging bytes
    host_chunks: list[Tensor]  # the same view of each pinned host buffer
    tails: Tensor  # [max, tail_len] the streams' CNN tails (model dtype)
    audio: Tensor  # [max, tail_len + chunk_len] the CNN input, assembled inside the graph
    embeds: Tensor  # [max, num_new / 2^adapter_layers, llm_hidden] output
    write_rows: Tensor  # [max, num_new] output: the ring rows of the chunk's frames
    kv: Tensor  # [layers, 2, max, num_new, H, D] output, a view of the K/V storage shared by every m


@torch.inference_mode()
def encode_chunks(
    frontend: SpeechFrontend, caches: list[SpeechCache], samples_list: list[Tensor], graphs: EncoderGraphs | None
) -> list[Tensor]:
    """:meth:`SpeechFrontend.encode_chunks` where ``graphs`` can: the streams whose chunk a graph :meth:`fits
    <EncoderGraphs.fits>` (full chunks of a captured m, later ones and first ones with the paper's CNN) run as
    replays, grouped by m, at most ``graphs.max_batch`` each; the others run eagerly. As there, every input is
    validated before any cache changes, and caches are updated only after all are encoded."""
    if graphs is not None and graphs.frontend is not frontend:
        raise ValueError("the encoder graphs were captured for another SpeechFrontend")
    units = frontend.check_chunks(caches, samples_list)
    graphed: dict[int, list[int]] = {}  # by m (first and later chunks share a graph, and so a replay)
    eager: list[int] = []
    for i, (cache, samples) in enumerate(zip(caches, samples_list)):
        if graphs is not None and graphs.fits(cache, samples):
            graphed.setdefault(cache.m, []).append(i)
        else:
            eager.append(i)
    outputs: list[Tensor | None] = [None] * len(caches)
    embeds, updates = frontend.encode_eager(
        [caches[i] for i in eager], [samples_list[i] for i in eager], [units[i] for i in eager]
    )
    for i, out in zip(eager, embeds):
        outputs[i] = out
    pending: CacheUpdate | None = None  # the last replay's update: it reads the graphs' static outputs
    for members in graphed.values():
        for begin in range(0, len(members), graphs.max_batch):
            part = members[begin : begin + graphs.max_batch]
            if pending is not None:
                pending.own()  # the next replay overwrites the static outputs
            embeds, pending = graphs.run([caches[i] for i in part], [samples_list[i] for i in part])
            for j, i in enumerate(part):
                outputs[i] = embeds[j]
            updates.append(pending)
    for update in updates:
        update.apply()
    return outputs


class EncoderGraphs:
    """CUDA graphs of :class:`SpeechFrontend`'s steady-state group pass over ``pool``, one per (m, batch bucket).

    :func:`encode_chunks` runs the streams that :meth:`fits` through :meth:`run`. Every graph is captured up front
    (largest first, sharing one memory pool), so serving never captures.
    """

    def __init__(
        self,
        frontend: SpeechFrontend,
        pool: SpeechCachePool,
        max_batch: int,
        multipliers: list[int] | range | None = None,
        capture: bool = True,
    ):
        """``multipliers``: the m that get graphs (default 1..MAX_LATENCY_MULTIPLIER); an m whose chunk has more
        frames than the cache window (48*m > max_cache_frames) gets none. ``capture=False``: no CUDA graphs, every
        run executes the captured pass eagerly from the same static buffers (tests)."""
        if pool.growable:
            raise ValueError("encoder graphs need a fixed SpeechCachePool: a growable one moves its storage")
        if pool.cfg != frontend.cfg or pool.data.dtype != frontend.dtype or pool.data.device != frontend.device:
            raise ValueError("the pool was made for another encoder config, dtype or device")
        if pool.num_slots == 0:
            raise ValueError("the pool has no slots")  # padding rows and captures read slot 0
        if capture and frontend.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the frontend is on {frontend.device}")
        cfg = frontend.cfg
        multipliers = range(1, MAX_LATENCY_MULTIPLIER + 1) if multipliers is None else multipliers
        for m in multipliers:
            check_multiplier(m)
        self.frontend = frontend
        self.pool = pool
        self._data = pool.data
        self.window = pool.window
        self.buckets = encoder_buckets(max_batch)
        self.multipliers = sorted({m for m in multipliers if cfg.block_size * m <= pool.window})
        self.capture = capture
        self.replays = 0  # runs so far (tests and stats)
        device, dtype = frontend.device, frontend.dtype
        biggest = self.buckets[-1]

        # Staging, host and device alike: [slots, frames encoded] int64 [2, max], then the chunks' samples in the
        # staging dtype (float32, or float64 for a float64 model: the graph rounds them to the model dtype, as the
        # eager path does).
        self._stage_dtype = accumulate_dtype(dtype)
        itemsize = torch.empty(0, dtype=self._stage_dtype).element_size()
        self._idx_bytes = 2 * biggest * 8
        max_chunk = SAMPLES_PER_UNIT * max(self.multipliers, default=0)
        nbytes = self._idx_bytes + biggest * max_chunk * itemsize
        pin = device.type == "cuda"
        self._host = [torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self._copied: list[torch.cuda.Event | None] = [None, None]  # per host buffer, its last copy's event
        self._turn = 0
        self._dev = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self._idx = self._dev[: self._idx_bytes].view(torch.int64).view(2, biggest)

        def chunk_view(buf: Tensor, chunk_len: int) -> Tensor:
            end = self._idx_bytes + biggest * chunk_len * itemsize
            return buf[self._idx_bytes : end].view(self._stage_dtype).view(biggest, chunk_len)

        def kv_shape(num_new: int) -> tuple[int, ...]:
            return (cfg.num_layers, 2, biggest, num_new, cfg.num_heads, cfg.head_dim)

        # One K/V output for every m (a call's second replay first copies the previous one out: CacheUpdate.own).
        kv_numel = math.prod(kv_shape(cfg.block_size * max(self.multipliers, default=0)))
        self._kv = torch.empty(kv_numel, dtype=dtype, device=device)
        self._shapes: dict[int, _Shape] = {}
        for m in self.multipliers:
            chunk_len, tail_len, num_new = SAMPLES_PER_UNIT * m, frontend.tail_samples(m), cfg.block_size * m
            self._shapes[m] = _Shape(
                m=m,
                chunk_len=chunk_len,
                tail_len=tail_len,
                num_new=num_new,
                chunks=chunk_view(self._dev, chunk_len),
                host_chunks=[chunk_view(h, chunk_len) for h in self._host],
                tails=torch.zeros(biggest, tail_len, dtype=dtype, device=device),
                audio=torch.zeros(biggest, tail_len + chunk_len, dtype=dtype, device=device),
                embeds=torch.zeros(
                    biggest, num_new >> cfg.adapter_layers, frontend.proj.out_features, dtype=dtype, device=device
                ),
                write_rows=torch.zeros(biggest, num_new, dtype=torch.long, device=device),
                kv=self._kv[: math.prod(kv_shape(num_new))].view(kv_shape(num_new)),
            )

        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        if capture and self.multipliers:
            with torch.inference_mode():
                self._capture()
            logger.info("captured speech encoder CUDA graphs for m %s, batch sizes %s", self.multipliers, self.buckets)

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def fits(self, cache: SpeechCache, samples: Tensor) -> bool:
        """Whether the stream's next chunk (validated ``samples``) is a full chunk that a graph can encode: a later
        one, or a first one where the CNN's tail is exactly the zero prefix (extractor_mode "layer_norm", the paper's):
        then the graph's pass, with a zero tail and every cached row masked, is the first chunk's eager pass."""
        shape = self._shapes.get(cache.m)
        if shape is None or cache.pool is not self.pool or self.pool.data is not self._data:
            return False
        if samples.numel() != shape.chunk_len:
            return False
        if cache.audio_tail is None:  # a first chunk: its CNN input is the zero prefix and the chunk
            return cache.frames_encoded == 0 and shape.tail_len == self.frontend.prefix_samples
        return cache.audio_tail.numel() == shape.tail_len and cache.frames_encoded > 0

    def run(self, caches: list[SpeechCache], samples: list[Tensor]) -> tuple[Tensor, CacheUpdate]:
        """Encode streams that all :meth:`fit` with the same m, at most :attr:`max_batch`: (embeddings
        [S, 12*m, llm_hidden], a copy; the group's update). The update reads the static outputs: apply it, or
        ``own()`` it, before the next run. Nothing of the caches or the pool changes here, except that streams at their
        first chunk have their (still empty) slots zeroed."""
        n = len(caches)
        s = self._shapes[caches[0].m]
        rows = self.buckets[bisect.bisect_left(self.buckets, n)]
        turn, self._turn = self._turn, 1 - self._turn
        host = self._host[turn]
        copied = self._copied[turn]
        if copied is not None:
            copied.synchronize()  # that buffer's last copy has left: it may be refilled
        idx = host[: self._idx_bytes].view(torch.int64).view(2, -1)
        idx[:, :n] = torch.tensor([[c.slot for c in caches], [c.frames_encoded for c in caches]])
        idx[:, n:rows] = idx[:, :1]  # padding rows: the first stream's slot and position (read, never written)
        stage = self._stage_dtype
        staged = [x if x.dtype == stage else x.to(self.frontend.dtype).to(stage) for x in samples]
        on_host = all(x.device.type == "cpu" for x in staged)
        nbytes = self._idx_bytes
        if on_host:
            torch.stack(staged, out=s.host_chunks[turn][:n])
            nbytes += n * s.chunk_len * s.host_chunks[turn].element_size()
        self._dev[:nbytes].copy_(host[:nbytes], non_blocking=True)
        if self._dev.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self._dev.device))
            self._copied[turn] = event
        if not on_host:
            s.chunks[:n].copy_(torch.stack([x.to(self._dev.device) for x in staged]))
        # First chunks: a zero CNN tail (the eager path's prefix), and a zeroed slot, as the eager path's update
        # leaves it, because the graph reads the whole window (masked) and an -inf bias does not cancel a NaN.
        firsts = [c.slot for c in caches if c.audio_tail is None]
        if firsts:
            self.pool.clear(torch.tensor(firsts, device=self._dev.device))
        zeros = s.tails.new_zeros(s.tail_len) if firsts else None
        torch.stack([zeros if c.audio_tail is None else c.audio_tail for c in caches], out=s.tails[:n])

        if self.capture:
            self._graphs[(s.m, rows)].replay()
        else:
            self._forward(s.m, rows)
        self.replays += 1

        tails = s.audio[:n, -s.tail_len :].clone()  # the new CNN tails, one block for the group
        update = CacheUpdate(
            caches=list(caches),
            audio_tails=list(tails.unbind(0)),
            num_new=s.num_new,
            rows=s.write_rows[:n],
            present=s.kv[:, :, :n],
        )
        return s.embeds[:n].clone(), update

    # -- internals -------------------------------------------------------------------------------------------------

    def _forward(self, m: int, rows: int) -> None:
        """The captured work: the pass of ``rows`` streams from the static inputs into the static outputs."""
        s = self._shapes[m]
        slots, starts = self._idx[0, :rows], self._idx[1, :rows]
        audio = s.audio[:rows]
        audio[:, : s.tail_len].copy_(s.tails[:rows])
        audio[:, s.tail_len :].copy_(s.chunks[:rows])  # rounded to the model dtype, as the eager path does
        frontend = self.frontend
        read_rows, bias, write_rows = frontend.window_inputs(self.pool, slots, starts, s.num_new, m, self.window)
        # Per-stream compact positions (as encode_group gives streams younger than the window; (W, 0) for the others)
        held = starts.clamp(max=self.window)[:, None]
        embeds, present = frontend.encode_window(
            audio, s.num_new, self.pool, read_rows, bias, (held, held - self.window)
        )
        s.embeds[:rows].copy_(embeds)
        s.write_rows[:rows].copy_(write_rows)
        for layer, (k, v) in enumerate(present):
            s.kv[layer, 0, :rows].copy_(k)
            s.kv[layer, 1, :rows].copy_(v)

    def _capture(self) -> None:
        device = self.frontend.device
        self._idx[0].zero_()  # slot 0, a full window: any valid rows do for capturing
        self._idx[1].fill_(self.window)
        mem = torch.cuda.graph_pool_handle()
        keys = sorted(((m, b) for m in self.multipliers for b in self.buckets), key=lambda k: (k[0] * k[1], k[1]))
        with window_kernel_passes():  # the warm-up before each capture also compiles the kernel, outside capture
            for m, rows in reversed(keys):  # largest first: smaller graphs reuse its pool memory
                self._graphs[(m, rows)] = capture_graph(partial(self._forward, m, rows), device, mem)
        torch.cuda.synchronize(device)
