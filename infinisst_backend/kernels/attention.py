"""Attention over the paged KV cache: per-step metadata, the backend interface, and the torch implementation.

One step runs a flattened varlen batch: sequence ``b`` contributes ``q_len_b`` new tokens (a prefill chunk or
one decode token) at rows ``qo_indptr[b] .. qo_indptr[b+1] - 1``. The runner builds one
:class:`AttentionBatch` per step, calls ``backend.plan(batch)`` once, then every layer calls
``backend.forward``. :class:`TorchAttention` is the CPU path and the reference for GPU backends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(slots=True)
class AttentionBatch:
    """Metadata of one step, shared by all layers.

    The ``*_cpu`` tensors are FlashInfer's CSR page layout (int32, on the host, where its ``plan`` wants them).
    """

    qo_indptr: list[int]  # [B+1] offsets of each sequence's new tokens in the flattened batch
    kv_page_tables: list[list[int]]  # per sequence: the pages covering its kv_len tokens, in order
    kv_lens: list[int]  # per sequence: cache length AFTER appending its new tokens
    slot_mapping: Tensor  # [T] int64 on the device: flat slot (page * page_size + offset) of each new token
    positions: Tensor  # [T] int64 on the device: position of each new token (kv_len - q_len + i)
    page_size: int
    qo_indptr_cpu: Tensor  # [B+1] int32
    kv_indptr_cpu: Tensor  # [B+1] int32, offsets into kv_indices_cpu
    kv_indices_cpu: Tensor  # [sum of pages] int32, the page tables concatenated
    kv_last_page_len_cpu: Tensor  # [B] int32, tokens in each sequence's last page (1..page_size)

    @classmethod
    def build(
        cls,
        qo_lens: list[int],
        kv_page_tables: list[list[int]],
        kv_lens: list[int],
        page_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionBatch:
        """Build the step's metadata from Python lists; device tensors are made once, here.

        ``kv_page_tables[b]`` may be longer than needed (e.g. ``SequenceKV.pages``); it is cut to
        ``ceil(kv_lens[b] / page_size)`` pages.
        """
        if not len(qo_lens) == len(kv_page_tables) == len(kv_lens):
            raise ValueError("qo_lens, kv_page_tables and kv_lens must have one entry per sequence")
        qo_indptr, kv_indptr, tables, slots, positions = [0], [0], [], [], []
        for q_len, table, kv_len in zip(qo_lens, kv_page_tables, kv_lens):
            num_pages = -(-kv_len // page_size)
            if not 0 < q_len <= kv_len or num_pages > len(table):
                raise ValueError(f"bad sequence in batch: q_len={q_len} kv_len={kv_len} pages={len(table)}")
            table = list(table[:num_pages])
            for pos in range(kv_len - q_len, kv_len):
                slots.append(table[pos // page_size] * page_size + pos % page_size)
                positions.append(pos)
            tables.append(table)
            qo_indptr.append(qo_indptr[-1] + q_len)
            kv_indptr.append(kv_indptr[-1] + num_pages)
        last_page_lens = [kv_len - (len(t) - 1) * page_size for t, kv_len in zip(tables, kv_lens)]
        return cls(
            qo_indptr=qo_indptr,
            kv_page_tables=tables,
            kv_lens=list(kv_lens),
            slot_mapping=_to_device(slots, torch.long, device),
            positions=_to_device(positions, torch.long, device),
            page_size=page_size,
            qo_indptr_cpu=torch.tensor(qo_indptr, dtype=torch.int32),
            kv_indptr_cpu=torch.tensor(kv_indptr, dtype=torch.int32),
            kv_indices_cpu=torch.tensor([p for t in tables for p in t], dtype=torch.int32),
            kv_last_page_len_cpu=torch.tensor(last_page_lens, dtype=torch.int32),
        )

    @property
    def num_seqs(self) -> int:
        return len(self.kv_lens)

    @property
    def num_tokens(self) -> int:
        return self.qo_indptr[-1]

    @property
    def qo_lens(self) -> list[int]:
        return [b - a for a, b in zip(self.qo_indptr, self.qo_indptr[1:])]

    @property
    def is_decode(self) -> bool:
        """Every sequence feeds exactly one token (a decode-only step)."""
        return self.num_tokens == self.num_seqs


def _to_device(values: list[int], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def write_kv(kv_layer: Tensor, page: Tensor, offset: Tensor, k: Tensor, v: Tensor) -> None:
    """Store a step's new K and V rows ``[T, Hkv, D]`` at slots (page, offset) of ``kv_layer``
    ``[num_pages, 2, page_size, Hkv, D]``, converted to its dtype (``EngineConfig.kv_cache_dtype``)."""
    kv_layer[page, 0, offset] = k.to(kv_layer.dtype)
    kv_layer[page, 1, offset] = v.to(kv_layer.dtype)


class AttentionBackend:
    """Paged causal attention. Chosen once at start-up; ``plan`` once per step, ``forward`` once per layer."""

    def plan(self, batch: AttentionBatch) -> None:
        raise NotImplementedError

    def forward(self, layer: int, q: Tensor, k: Tensor, v: Tensor, kv_layer: Tensor) -> Tensor:
        """Write ``k``/``v`` at the batch's slots, then attend.

        q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` (already rotated), kv_layer ``[num_pages, 2, page_size, Hkv, D]``
        (its dtype may differ from q's: k/v are converted to it).
        The i-th new token of a sequence sits at position ``kv_len - q_len + i`` and sees cached positions
        ``<=`` its own. Returns ``[T, Hq, D]`` in q's dtype.
        """
        write_kv(kv_layer, *self.write_slots(), k, v)
        return self.attend(layer, q, kv_layer)

    def write_slots(self) -> tuple[Tensor, Tensor]:
        """``(page, offset)`` ``[T]`` of the planned step's new tokens, for a caller that stores K/V itself (the
        fused kernels of :mod:`.llm_kernels`) and then calls :meth:`attend`."""
        raise NotImplementedError

    def attend(self, layer: int, q: Tensor, kv_layer: Tensor) -> Tensor:
        """Attention of ``q`` over the pages, whose new tokens' K/V are stored already (see :meth:`forward`)."""
        raise NotImplementedError


class TorchAttention(AttentionBackend):
    """Reference implementation: gathers each sequence's pages and runs masked softmax attention.

    Scores and softmax are computed in float32 (float64 for float64 inputs). Prefill steps take one Python
    iteration per sequence; decode-only steps gather all sequences' pages at once, padded to the longest.
    """

    def __init__(self, scale: float | None = None):
        self.scale = scale  # None: head_dim ** -0.5
        self._batch: AttentionBatch | None = None
        self._write_page: Tensor | None = None  # [T] page of each new token
        self._write_offset: Tensor | None = None  # [T] offset in that page
        self._read_pages: list[Tensor] = []  # per sequence: [num_pages] page ids
        self._masks: list[Tensor] = []  # per sequence: [q_len, kv_len] bool, True where attention is allowed
        # Decode-only steps run all sequences in one padded gather: [B, max_pages] page ids, [B, max_len] mask.
        self._padded_pages: Tensor | None = None
        self._padded_mask: Tensor | None = None

    def plan(self, batch: AttentionBatch) -> None:
        device = batch.slot_mapping.device
        self._batch = batch
        self._write_page = batch.slot_mapping // batch.page_size
        self._write_offset = batch.slot_mapping % batch.page_size
        self._padded_pages = self._padded_mask = None
        if batch.is_decode:
            width = max(len(t) for t in batch.kv_page_tables)
            table = [t + [t[-1]] * (width - len(t)) for t in batch.kv_page_tables]  # pad with a real page
            self._padded_pages = torch.tensor(table, dtype=torch.long, device=device)
            lens = torch.tensor(batch.kv_lens, device=device)
            self._padded_mask = torch.arange(width * batch.page_size, device=device)[None, :] < lens[:, None]
            return
        self._read_pages = [torch.tensor(t, dtype=torch.long, device=device) for t in batch.kv_page_tables]
        self._masks = []
        for q_len, kv_len in zip(batch.qo_lens, batch.kv_lens):
            q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
            self._masks.append(torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None])

    def write_slots(self) -> tuple[Tensor, Tensor]:
        if self._batch is None:
            raise RuntimeError("TorchAttention used before plan()")
        return self._write_page, self._write_offset

    def attend(self, layer: int, q: Tensor, kv_layer: Tensor) -> Tensor:
        batch = self._batch
        if batch is None:
            raise RuntimeError("TorchAttention used before plan()")
        if q.shape[0] != batch.num_tokens:
            raise ValueError(f"q has {q.shape[0]} tokens, the planned batch has {batch.num_tokens}")
        if self._padded_pages is not None:
            return self._decode(q, kv_layer)

        out = torch.empty_like(q)
        for b, (pages, mask) in enumerate(zip(self._read_pages, self._masks)):
            start, end = batch.qo_indptr[b], batch.qo_indptr[b + 1]
            kv_len = batch.kv_lens[b]
            # [num_pages, page_size, Hkv, D] -> [kv_len, Hkv, D]
            keys = kv_layer[pages, 0].flatten(0, 1)[:kv_len]
            values = kv_layer[pages, 1].flatten(0, 1)[:kv_len]
            out[start:end] = self._attend(q[start:end], keys, values, mask)
        return out

    def _decode(self, q: Tensor, kv_layer: Tensor) -> Tensor:
        """One new token per sequence: every sequence at once over its pages, padded to the longest."""
        num_seqs, num_heads, head_dim = q.shape
        # [B, max_pages, 2, page_size, Hkv, D] -> keys/values [B, max_len, Hkv, D]
        pages = kv_layer[self._padded_pages]
        keys, values = pages[:, :, 0].flatten(1, 2), pages[:, :, 1].flatten(1, 2)
        num_kv_heads = keys.shape[2]
        compute = torch.promote_types(q.dtype, torch.float32)
        scale = self.scale if self.scale is not None else head_dim**-0.5
        qg = q.to(compute).view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
        scores = torch.einsum("bhgd,bkhd->bhgk", qg, keys.to(compute)) * scale  # [B, Hkv, G, K]
        scores = scores.masked_fill(~self._padded_mask[:, None, None, :], float("-inf"))
        out = torch.einsum("bhgk,bkhd->bhgd", scores.softmax(dim=-1), values.to(compute))
        return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)

    def _attend(self, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        """q ``[Q, Hq, D]``, keys/values ``[K, Hkv, D]``, mask ``[Q, K]`` -> ``[Q, Hq, D]``."""
        num_q, num_heads, head_dim = q.shape
        num_kv_heads = keys.shape[1]
        group = num_heads // num_kv_heads  # GQA: query head h reads kv head h // group
        compute = torch.promote_types(q.dtype, torch.float32)
        scale = self.scale if self.scale is not None else head_dim**-0.5
        qg = q.to(compute).view(num_q, num_kv_heads, group, head_dim)
        scores = torch.einsum("qhgd,khd->hgqk", qg, keys.to(compute)) * scale  # [Hkv, G, Q, K]
        scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.einsum("hgqk,khd->qhgd", scores.softmax(dim=-1), values.to(compute))  # [Q, Hkv, G, D]
        return out.reshape(num_q, num_heads, head_dim).to(q.dtype)
