"""Runs scheduled work on the model: tensors in, logits out.

The runner owns the device-side state (weights, the paged KV tensors, the attention backend) and the page
pool. It never looks at queues or streams: it gets sequences (page tables) and token/embedding inputs.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from infinisst_backend.config import DTYPES, EMBEDDINGS_PER_UNIT, EngineConfig
from infinisst_backend.kernels import llm_kernels
from infinisst_backend.kernels.attention import AttentionBatch, TorchAttention
from infinisst_backend.model.infinisst import InfiniSSTModel
from infinisst_backend.model.kv_cache import PagedKVCache, SequenceKV
from infinisst_backend.runtime.encoder_graphs import MAX_GRAPH_BATCH, EncoderGraphs, encode_chunks
from infinisst_backend.runtime.llm_graphs import scratch_pages_needed

logger = logging.getLogger(__name__)

# LM head rows are padded to a multiple of this on GPU (GEMM tiling).
VOCAB_PAD = 128
# CUDA graphs: steady-state prefills and encoder calls get graphs for these latency multipliers (the paper's; each
# graph keeps its activations' peak in the shared graph pool, so other m run eagerly), prefills up to this batch.
GRAPH_MULTIPLIERS = (1, 2)
GRAPH_PREFILL_Q_LENS = [EMBEDDINGS_PER_UNIT * m + 10 for m in GRAPH_MULTIPLIERS]  # a later turn's prompt tokens
MAX_PREFILL_GRAPH_BATCH = 64


def make_attention_backend(cfg: EngineConfig):
    if cfg.attention_backend == "flashinfer":
        from infinisst_backend.kernels.flashinfer_attention import FlashInferAttention  # GPU only; imported lazily

        return FlashInferAttention(cfg, decode_tensor_cores=cfg.decode_tensor_cores)
    return TorchAttention()


def _profiled(method):
    """Time a public runner call into ``runner.profile`` when it is a dict (benchmarks): the device is synchronized
    after the call, and its wall seconds are added to ``profile[name + "_s"]``."""
    key = method.__name__ + "_s"

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self.profile is None:
            return method(self, *args, **kwargs)
        start = time.perf_counter()
        out = method(self, *args, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.profile[key] = self.profile.get(key, 0.0) + time.perf_counter() - start
        return out

    return call


class ModelRunner:
    def __init__(self, model: InfiniSSTModel, cfg: EngineConfig, num_pages: int):
        self.model = model
        self.cfg = cfg
        # None, or a dict that encode_speech, prefill, decode and compact_many add their synchronized seconds to.
        self.profile: dict[str, float] | None = None
        self.device = torch.device(cfg.device)
        self.dtype = DTYPES[cfg.dtype]
        self._use_graphs = self.device.type == "cuda" and cfg.attention_backend == "flashinfer" and cfg.cuda_graphs
        # One speech cache slot per possible stream, allocated now (engine._pages_from_free_memory set it aside).
        self.speech_pool = model.speech.new_pool(cfg.max_streams)
        llm = model.llm.cfg
        self.kv = PagedKVCache(
            num_layers=llm.num_hidden_layers,
            num_pages=num_pages,
            page_size=cfg.page_size,
            num_kv_heads=llm.num_key_value_heads,
            head_dim=llm.head_dim,
            dtype=DTYPES[cfg.kv_dtype],
            device=self.device,
            scratch_pages=scratch_pages_needed(max(GRAPH_PREFILL_Q_LENS), cfg.page_size) if self._use_graphs else 0,
        )
        self.pool = self.kv.pool
        if self.device.type == "cuda" and cfg.fused_kernels:
            self.kv.move_kernel = llm_kernels.move_tokens_ready(self.kv.data)
        self.attn = make_attention_backend(cfg)
        self.graphs = None
        if self.device.type == "cuda":
            model.llm.pad_vocab(VOCAB_PAD)
            model.llm.fuse_projections()
            if self._use_graphs:
                self.graphs = self._step_graphs(num_pages)
        # Speech encoder calls of full chunks (first ones too) replayed from CUDA graphs (GRAPH_MULTIPLIERS,
        # prefill-sized batches).
        self.speech_graphs = None
        if self.device.type == "cuda" and cfg.cuda_graphs:
            max_batch = min(cfg.max_batch_size, MAX_GRAPH_BATCH)
            self.speech_graphs = EncoderGraphs(model.speech, self.speech_pool, max_batch, GRAPH_MULTIPLIERS)

    def new_sequence(self) -> SequenceKV:
        return self.kv.new_sequence()

    @_profiled
    @torch.inference_mode()
    def encode_speech(self, caches: list, samples: list) -> list[torch.Tensor]:
        """Speech embeddings [12k, H] per stream, each from its own speech cache."""
        # Host tensors: the frontend moves them (a CUDA-graph group stages them all with one copy).
        tensors = [torch.from_numpy(s) for s in samples]
        return encode_chunks(self.model.speech, caches, tensors, self.speech_graphs)

    @_profiled
    @torch.inference_mode()
    def prefill(self, seqs: list[SequenceKV], parts: list[tuple[list[int], torch.Tensor, list[int]]]) -> torch.Tensor:
        """Append each sequence's turn prompt (prefix ids, speech rows, suffix ids); logits of its last token.

        A CUDA graph replays the step when every prompt has the same length (streams' later turns with one latency
        multiplier) and the shape fits; otherwise it runs eagerly."""
        llm = self.model.llm
        ids = torch.tensor([i for prefix, _, suffix in parts for i in prefix + suffix], device=self.device)
        text = llm.embed(ids)  # [sum of prefix+suffix lengths, H]
        embeds, offset = [], 0
        for prefix, speech, suffix in parts:
            n_pre, n_suf = len(prefix), len(suffix)
            suffix_rows = text[offset + n_pre : offset + n_pre + n_suf]
            embeds += [text[offset : offset + n_pre], speech.to(text.dtype), suffix_rows]
            offset += n_pre + n_suf
        lengths = [len(p) + s.shape[0] + len(q) for p, s, q in parts]
        if len(set(lengths)) == 1:
            return self._replay_or_forward(seqs, torch.cat(embeds), lengths[0])
        return self._forward(seqs, torch.cat(embeds), lengths)

    @_profiled
    @torch.inference_mode()
    def decode(self, seqs: list[SequenceKV], tokens: list[int]) -> torch.Tensor:
        """Feed one token to each sequence; logits [B, V] for the next token (a CUDA graph replay if one fits)."""
        embeds = self.model.llm.embed(torch.tensor(tokens, device=self.device))
        return self._replay_or_forward(seqs, embeds, 1)

    def _replay_or_forward(self, seqs: list[SequenceKV], embeds: torch.Tensor, q_len: int) -> torch.Tensor:
        """Every sequence appends ``q_len`` tokens: a graph replay if the shape has one, else eager."""
        if self.graphs is not None and self.graphs.prepare(seqs, q_len):
            self.kv.copy_pages([copy for seq in seqs for copy in seq.reserve(q_len)])
            return self.graphs.run(seqs, embeds, q_len)
        return self._forward(seqs, embeds, [q_len] * len(seqs))

    def _step_graphs(self, num_pages: int):
        from infinisst_backend.runtime.llm_graphs import StepGraphs  # GPU only

        scratch = list(range(num_pages, self.kv.data.shape[1]))  # the pages past the pool
        return StepGraphs(
            self.model,
            self.kv,
            scratch,
            max_decode_batch=self.cfg.max_batch_size,
            max_prefill_batch=min(self.cfg.max_batch_size, MAX_PREFILL_GRAPH_BATCH),
            prefill_q_lens=GRAPH_PREFILL_Q_LENS,
            # The longest a sequence gets: system prompt + window + a turn (prompt and generated tokens), with room.
            max_positions=self.cfg.max_llm_cache_tokens + 1024,
            workspace=self.attn.workspace,
            decode_tensor_cores=self.cfg.decode_tensor_cores,
            fused_kernels=self.cfg.fused_kernels,
        )

    def _forward(self, seqs: list[SequenceKV], embeds: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        copies = [copy for seq, n in zip(seqs, lengths) for copy in seq.reserve(n)]
        self.kv.copy_pages(copies)
        batch = AttentionBatch.build(
            qo_lens=lengths,
            kv_page_tables=[seq.pages for seq in seqs],
            kv_lens=[seq.num_tokens for seq in seqs],
            page_size=self.cfg.page_size,
            device=self.device,
        )
        self.attn.plan(batch)
        hidden = self.model.llm(embeds, batch.positions, self.kv, self.attn)
        last = torch.tensor(batch.qo_indptr[1:], device=self.device) - 1
        return self.model.llm.logits(hidden[last])

    def compact(self, seq: SequenceKV, keep: int, cut: int) -> None:
        """Drop cached tokens [keep, cut) and re-rotate the tail (turn-aligned eviction)."""
        self.kv.compact(seq, keep, cut, self.model.llm.inv_freq)

    @_profiled
    def compact_many(self, items: list[tuple[SequenceKV, int, int]]) -> None:
        """``compact(seq, keep, cut)`` for each item, batched (``PagedKVCache.compact_many``)."""
        self.kv.compact_many(items, self.model.llm.inv_freq)
