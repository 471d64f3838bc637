"""LLM steps replayed from CUDA graphs (GPU with FlashInfer only): decode steps and steady-state prefills.

A step at small and medium batch is bound by the host: ~40 kernel launches per layer, 32 layers, plus Python
around each. :class:`StepGraphs` captures the whole LLM forward of a step (every layer with its K/V write and
FlashInfer attention, final norm, LM head of each sequence's last token) once per shape and replays it; a step
then costs one graph launch plus its metadata. A shape is ``(q_len, rows)``: ``rows`` sequences that each append
``q_len`` tokens. Decode steps are ``q_len = 1``; a steady-state prefill is every stream's later turn with the
same latency multiplier (``12m + 10`` tokens, all sequences alike). Other steps (first turns with the system
prompt, mixed multipliers, partial chunks, large batches) run eagerly.

How a replay is fed:
* the step's input embeddings go into a static buffer; positions and the page/offset of each new token into
  static device buffers, from one pinned host buffer with a single non-blocking copy;
* each shape has its own FlashInfer wrapper in CUDA-graph mode (fixed batch size, static page-table buffers);
  its ``plan`` writes the step's page tables into those buffers before the replay;
* rows past the real batch (the batch is padded up to a bucket) read and write scratch pages that no sequence
  owns (``PagedKVCache(scratch_pages=...)``).

Every graph is captured up front (serving never captures): decode steps for each batch bucket, prefills for the
configured turn lengths (the latency multipliers served most) and each prefill bucket. The RoPE table is reserved
for ``max_positions``; a step with a position beyond it runs eagerly, so a graph never reads out of range.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
from functools import partial

import torch
from torch import Tensor

from infinisst_backend.kernels import llm_kernels
from infinisst_backend.kernels.attention import AttentionBackend
from infinisst_backend.model.infinisst import InfiniSSTModel
from infinisst_backend.model.kv_cache import PagedKVCache, SequenceKV

logger = logging.getLogger(__name__)

MAX_PREFILL_GRAPH_TOKENS = 4096  # prefill shapes with more tokens run eagerly (compute-bound anyway)


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then every 8 up to 64, every 16 up to 256, then every 32."""
    sizes = [1, 2, 4, 8, *range(16, 65, 8), *range(80, 257, 16), *range(288, max_batch + 32, 32)]
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


def scratch_pages_needed(max_q_len: int, page_size: int) -> int:
    """Scratch pages a padding row of ``max_q_len`` tokens writes."""
    return -(-max_q_len // page_size)


def capture_graph(forward, device: torch.device, pool) -> torch.cuda.CUDAGraph:
    """Capture ``forward()`` as a CUDA graph in memory pool ``pool``, after one warm-up run on a side stream (lazy
    inits, cuBLAS/cuDNN heuristics must not happen inside the capture). Call under ``torch.inference_mode()``."""
    with torch.cuda.device(device):  # torch.cuda.graph captures on a stream of the current device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            forward()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            forward()
    return graph


class _GraphAttention(AttentionBackend):
    """The attention of a captured step: writes K/V at static slots, runs the shape's FlashInfer wrapper."""

    def __init__(self, write_page: Tensor, write_offset: Tensor):
        self.write_page, self.write_offset = write_page, write_offset
        self.wrapper = None  # the shape being captured
        self.tokens = 0

    def plan(self, batch) -> None:  # metadata lives in static buffers; planning happens outside the graph
        raise RuntimeError("_GraphAttention is planned through StepGraphs")

    def write_slots(self) -> tuple[Tensor, Tensor]:
        return self.write_page[: self.tokens], self.write_offset[: self.tokens]

    def attend(self, layer: int, q: Tensor, kv_layer: Tensor) -> Tensor:
        return self.wrapper.run(q.to(kv_layer.dtype), kv_layer).to(q.dtype)  # as FlashInferAttention.attend


class StepGraphs:
    """Captured LLM steps over ``kv``; :meth:`run` replays the smallest bucket that fits the step."""

    def __init__(
        self,
        model: InfiniSSTModel,
        kv: PagedKVCache,
        scratch_pages: list[int],
        max_decode_batch: int,
        max_prefill_batch: int,
        prefill_q_lens: list[int],
        max_positions: int,
        workspace: Tensor,
        decode_tensor_cores: bool = False,
        fused_kernels: bool = True,
    ):
        llm = model.llm
        self.model = model
        self.kv = kv
        self.scratch_pages = scratch_pages
        self.page_size = kv.page_size
        self.max_positions = max_positions
        self.prefill_q_lens = sorted(set(prefill_q_lens))
        max_q_len = max(self.prefill_q_lens, default=1)
        self.max_pages_per_seq = -(-max_positions // kv.page_size)
        self.decode_buckets = batch_buckets(max_decode_batch)
        self.prefill_buckets = batch_buckets(max_prefill_batch)
        self.device = device = kv.data.device
        self._workspace = workspace
        self._decode_tensor_cores = decode_tensor_cores
        dtype = llm.model.embed_tokens.weight.dtype  # the compute dtype (the KV cache's may differ)
        # The fused kernels run in the captured passes only (a launch from Python costs more than it saves).
        self.fused_kernels = fused_kernels and llm_kernels.ready(device, dtype)
        max_tokens = max(self.decode_buckets[-1], self.prefill_buckets[-1] * max_q_len)
        # Host staging (pinned) and device copies of: position, write page, write offset per token.
        self._host = torch.zeros(3, max_tokens, dtype=torch.long).pin_memory()
        self._inputs = torch.zeros(3, max_tokens, dtype=torch.long, device=device)
        self._embeds = torch.zeros(max_tokens, llm.cfg.hidden_size, dtype=dtype, device=device)
        self._attn = _GraphAttention(self._inputs[1], self._inputs[2])
        max_rows = max(self.decode_buckets[-1], self.prefill_buckets[-1])
        self._logits = torch.zeros(max_rows, llm.cfg.vocab_size, dtype=torch.float32, device=device)
        self._plan_args = dict(
            num_qo_heads=llm.cfg.num_attention_heads,
            num_kv_heads=llm.cfg.num_key_value_heads,
            page_size=kv.page_size,
            pos_encoding_mode="NONE",
            q_data_type=kv.data.dtype,
            kv_data_type=kv.data.dtype,
            sm_scale=llm.cfg.head_dim**-0.5,
        )
        llm.rope.reserve(max_positions)
        llm.rope.cos_sin(self._inputs[0, :1], dtype)  # builds the table on the device before any capture
        self._pool = torch.cuda.graph_pool_handle()
        self._wrappers: dict[tuple[int, int], object] = {}
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.replays: dict[int, int] = {}  # q_len -> replays so far (tests, stats)
        shapes = [(1, rows) for rows in self.decode_buckets]
        shapes += [(q, rows) for q in self.prefill_q_lens for rows in self.prefill_buckets]
        for q_len, rows in sorted(shapes, key=lambda k: k[0] * k[1], reverse=True):  # largest first: smaller graphs
            self._capture(q_len, rows)  # reuse its pool memory
        torch.cuda.synchronize(device)
        logger.info(
            "captured CUDA graphs: decode batches %s, prefills of %s tokens per sequence for batches %s",
            self.decode_buckets,
            self.prefill_q_lens,
            self.prefill_buckets,
        )

    def prepare(self, seqs: list[SequenceKV], q_len: int) -> bool:
        """Whether a step where every sequence of ``seqs`` (before reserving) appends ``q_len`` tokens has a graph."""
        if not seqs or (q_len != 1 and q_len not in self.prefill_q_lens):
            return False
        buckets = self.decode_buckets if q_len == 1 else self.prefill_buckets
        if len(seqs) > buckets[-1] or (q_len > 1 and len(seqs) * q_len > MAX_PREFILL_GRAPH_TOKENS):
            return False
        return max(s.num_tokens for s in seqs) + q_len <= self.max_positions

    @torch.inference_mode()
    def run(self, seqs: list[SequenceKV], embeds: Tensor, q_len: int) -> Tensor:
        """Logits ``[B, V]`` (float32) of each sequence's last new token, once :meth:`prepare` said yes; the
        sequences already hold the slots of their ``q_len`` new tokens, whose embeddings are ``embeds [B*q_len, H]``.
        """
        n = len(seqs)
        buckets = self.decode_buckets if q_len == 1 else self.prefill_buckets
        rows = buckets[bisect.bisect_left(buckets, n)]
        ps, tokens = self.page_size, n * q_len
        host = self._host
        host[0, :tokens] = torch.tensor([p for s in seqs for p in range(s.num_tokens - q_len, s.num_tokens)])
        slots = torch.tensor([x for s in seqs for x in s.slots(s.num_tokens - q_len, s.num_tokens)])
        host[1, :tokens] = slots // ps
        host[2, :tokens] = slots % ps
        self._fill_padding(tokens, rows * q_len, q_len)
        self._inputs[:, : rows * q_len].copy_(host[:, : rows * q_len], non_blocking=True)
        self._embeds[:tokens].copy_(embeds)
        self._plan(q_len, rows, [s.pages[: -(-s.num_tokens // ps)] for s in seqs], [s.num_tokens for s in seqs])
        self._graphs[(q_len, rows)].replay()
        self.replays[q_len] = self.replays.get(q_len, 0) + 1
        return self._logits[:n]

    def _fill_padding(self, start: int, end: int, q_len: int) -> None:
        """Padding rows: positions 0 .. q_len - 1 on the scratch pages."""
        if end <= start:
            return
        pos = torch.arange(q_len).repeat((end - start) // q_len)
        scratch = torch.tensor(self.scratch_pages, dtype=torch.long)
        self._host[0, start:end] = pos
        self._host[1, start:end] = scratch[pos // self.page_size]
        self._host[2, start:end] = pos % self.page_size

    def _plan(self, q_len: int, rows: int, tables: list[list[int]], kv_lens: list[int]) -> None:
        """Plan the shape's wrapper: the real sequences, then padding rows of q_len tokens on the scratch pages."""
        pad = rows - len(tables)
        pad_table = self.scratch_pages[: -(-q_len // self.page_size)]
        counts = [len(t) for t in tables] + [len(pad_table)] * pad
        kv_indptr = torch.zeros(rows + 1, dtype=torch.int32)
        torch.cumsum(torch.tensor(counts, dtype=torch.int32), 0, out=kv_indptr[1:])
        indices = torch.tensor([p for t in tables for p in t] + pad_table * pad, dtype=torch.int32)
        pad_last = q_len - (len(pad_table) - 1) * self.page_size
        last = [n - (len(t) - 1) * self.page_size for t, n in zip(tables, kv_lens)] + [pad_last] * pad
        last = torch.tensor(last, dtype=torch.int32)
        wrapper = self._wrappers[(q_len, rows)]
        head_dim = self.model.llm.cfg.head_dim
        if q_len == 1:
            wrapper.plan(kv_indptr, indices, last, head_dim=head_dim, **self._plan_args)
        else:
            qo_indptr = torch.arange(0, (rows + 1) * q_len, q_len, dtype=torch.int32)
            wrapper.plan(qo_indptr, kv_indptr, indices, last, head_dim_qk=head_dim, causal=True, **self._plan_args)

    def _new_wrapper(self, q_len: int, rows: int):
        import flashinfer

        dev = dict(dtype=torch.int32, device=self.device)
        kv_buffers = dict(
            paged_kv_indptr_buffer=torch.zeros(rows + 1, **dev),
            paged_kv_indices_buffer=torch.zeros(rows * self.max_pages_per_seq, **dev),
            paged_kv_last_page_len_buffer=torch.zeros(rows, **dev),
        )
        if q_len == 1:
            return flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self._workspace,
                kv_layout="NHD",
                use_cuda_graph=True,
                use_tensor_cores=self._decode_tensor_cores,
                **kv_buffers,
            )
        return flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self._workspace,
            kv_layout="NHD",
            use_cuda_graph=True,
            qo_indptr_buf=torch.zeros(rows + 1, **dev),
            paged_kv_indptr_buf=kv_buffers["paged_kv_indptr_buffer"],
            paged_kv_indices_buf=kv_buffers["paged_kv_indices_buffer"],
            paged_kv_last_page_len_buf=kv_buffers["paged_kv_last_page_len_buffer"],
        )

    @torch.inference_mode()
    def _capture(self, q_len: int, rows: int) -> None:
        """Capture the forward of ``rows`` sequences of ``q_len`` new tokens (planned on the scratch pages)."""
        key = (q_len, rows)
        self._wrappers[key] = self._new_wrapper(q_len, rows)
        self._plan(q_len, rows, [], [])
        tokens = rows * q_len
        self._fill_padding(0, tokens, q_len)
        self._inputs[:, :tokens].copy_(self._host[:, :tokens])
        self._attn.wrapper, self._attn.tokens = self._wrappers[key], tokens
        with llm_kernels.fused_passes() if self.fused_kernels else contextlib.nullcontext():
            self._graphs[key] = capture_graph(partial(self._forward, q_len, rows), self.device, self._pool)
        self._attn.wrapper = None

    def _forward(self, q_len: int, rows: int) -> None:
        """The captured work: the LLM on the static inputs, logits of each row's last token into the static logits."""
        llm, tokens = self.model.llm, rows * q_len
        hidden = llm(self._embeds[:tokens], self._inputs[0, :tokens], self.kv, self._attn)
        if q_len > 1:
            hidden = hidden[q_len - 1 :: q_len]
        self._logits[:rows].copy_(llm.logits(hidden))
