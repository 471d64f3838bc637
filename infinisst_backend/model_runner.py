"""Runs scheduled work on the model: tensors in, logits out.

The runner owns the device-side state (weights, the paged KV tensors, the attention backend) and the page
pool. It never looks at queues or streams: it gets sequences (page tables) and token/embedding inputs.
"""

from __future__ import annotations

import logging

import torch

from .attention import AttentionBatch, TorchAttention
from .config import EngineConfig
from .kv_cache import PagedKVCache, SequenceKV
from .model import InfiniSSTModel

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_attention_backend(cfg: EngineConfig):
    if cfg.attention_backend == "flashinfer":
        from .flashinfer_attention import FlashInferAttention  # GPU only; imported lazily

        return FlashInferAttention(cfg)
    return TorchAttention()


class ModelRunner:
    def __init__(self, model: InfiniSSTModel, cfg: EngineConfig, num_pages: int):
        self.model = model
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dtype = DTYPES[cfg.dtype]
        llm = model.llm.cfg
        self.kv = PagedKVCache(
            num_layers=llm.num_hidden_layers,
            num_pages=num_pages,
            page_size=cfg.page_size,
            num_kv_heads=llm.num_key_value_heads,
            head_dim=llm.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.pool = self.kv.pool
        self.attn = make_attention_backend(cfg)

    def new_sequence(self) -> SequenceKV:
        return self.kv.new_sequence()

    @torch.inference_mode()
    def encode_speech(self, caches: list, samples: list) -> list[torch.Tensor]:
        """Speech embeddings [12k, H] per stream, each from its own speech cache."""
        tensors = [torch.from_numpy(s).to(self.device) for s in samples]
        return self.model.speech.encode_chunks(caches, tensors)

    @torch.inference_mode()
    def prefill(self, seqs: list[SequenceKV], parts: list[tuple[list[int], torch.Tensor, list[int]]]) -> torch.Tensor:
        """Append each sequence's turn prompt (prefix ids, speech rows, suffix ids); logits of its last token."""
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
        return self._forward(seqs, torch.cat(embeds), lengths)

    @torch.inference_mode()
    def decode(self, seqs: list[SequenceKV], tokens: list[int]) -> torch.Tensor:
        """Feed one token to each sequence; logits [B, V] for the next token."""
        embeds = self.model.llm.embed(torch.tensor(tokens, device=self.device))
        return self._forward(seqs, embeds, [1] * len(seqs))

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
