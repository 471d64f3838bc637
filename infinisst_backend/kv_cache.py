"""Paged KV cache of the LLM: page ids and reference counts, per-sequence page tables, and the tensors.

* :class:`PagePool` hands out page ids and counts references; it never touches a tensor.
* :class:`SequenceKV` is the page table of one sequence (a stream, or one beam of it). Beams fork a sequence
  and share its pages; a shared page is never written: the first writer copies it (copy-on-write).
* :class:`PagedKVCache` owns the per-layer tensors ``[num_pages, 2, page_size, num_kv_heads, head_dim]``
  (FlashInfer's NHD layout, K at index 0, V at 1) and the page operations that move data: page copies and the
  turn-aligned eviction :meth:`PagedKVCache.compact`.

Token ``t`` of a sequence lives in page ``pages[t // page_size]`` at offset ``t % page_size``; its flat slot
id is ``page * page_size + offset``. Keys are stored rotated at position ``t`` (design.md "Paged KV").
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import LLMConfig
from .errors import CapacityError
from .rope import rerotate


class OutOfPages(CapacityError):
    """The page pool cannot satisfy an allocation. Nothing was changed by the failed call."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class PagePool:
    """Page ids ``0 .. num_pages - 1`` with a free list and reference counts."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"PagePool needs num_pages > 0 and page_size > 0, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._refcounts = [0] * num_pages
        # Popped from the end: a fresh pool hands out 0, 1, 2, ...
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """``n`` free pages, each with reference count 1. Raises :class:`OutOfPages` (and allocates none)."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if not self.can_allocate(n):
            raise OutOfPages(f"KV cache exhausted: {n} page(s) requested, {self.num_free} free of {self.num_pages}")
        pages = [self._free.pop() for _ in range(n)]
        for page in pages:
            self._refcounts[page] = 1
        return pages

    def incref(self, pages: list[int]) -> None:
        """One more reference to each page (a fork); every page must be in use."""
        for page in pages:
            if self._refcounts[page] <= 0:
                raise RuntimeError(f"incref of free page {page}")
            self._refcounts[page] += 1

    def decref(self, pages: list[int]) -> None:
        """Drop one reference to each page; a page whose count reaches 0 returns to the free list."""
        for page in pages:
            if self._refcounts[page] <= 0:
                raise RuntimeError(f"decref of free page {page}")
            self._refcounts[page] -= 1
            if self._refcounts[page] == 0:
                self._free.append(page)

    def refcount(self, page: int) -> int:
        return self._refcounts[page]

    def used_pages(self) -> list[int]:
        """Pages with a reference (a leak check for tests and ``stats()``)."""
        return [page for page, count in enumerate(self._refcounts) if count > 0]

    def assert_all_free(self) -> None:
        """Raise ``AssertionError`` naming the leaked pages if any page is still referenced."""
        used = self.used_pages()
        if used or self.num_free != self.num_pages:
            raise AssertionError(f"{len(used)} page(s) still referenced: {used[:16]}")


class SequenceKV:
    """The page table of one sequence: ``pages`` cover tokens ``0 .. num_tokens - 1``."""

    def __init__(self, pool: PagePool):
        self.pool = pool
        self.page_size = pool.page_size
        self.pages: list[int] = []
        self.num_tokens = 0

    def __repr__(self) -> str:
        return f"SequenceKV(num_tokens={self.num_tokens}, pages={self.pages})"

    def fork(self) -> SequenceKV:
        """A sequence with the same tokens that shares every page (one more reference each)."""
        child = SequenceKV(self.pool)
        child.pages = list(self.pages)
        child.num_tokens = self.num_tokens
        self.pool.incref(child.pages)
        return child

    def pages_needed(self, n_new: int) -> int:
        """New pages that ``reserve(n_new)`` would allocate (fresh pages plus a copy-on-write page)."""
        if n_new < 0:
            raise ValueError(f"cannot reserve {n_new} tokens")
        grow = _ceil_div(self.num_tokens + n_new, self.page_size) - len(self.pages)
        return max(grow, 0) + int(n_new > 0 and self._last_page_shared())

    def reserve(self, n_new: int) -> list[tuple[int, int]]:
        """Extend the sequence by ``n_new`` tokens (``num_tokens`` grows now; the K/V are written later).

        If the partial last page is shared with a fork, it is replaced by a private copy. Returns the
        ``(src, dst)`` page copies that must be applied (``PagedKVCache.copy_pages``) before any write.
        Raises :class:`OutOfPages` without changing anything when the pool is short.
        """
        needed = self.pages_needed(n_new)
        if not self.pool.can_allocate(needed):
            raise OutOfPages(
                f"KV cache exhausted: {needed} page(s) needed for {n_new} token(s), {self.pool.num_free} free"
            )
        copies = []
        if n_new > 0 and self._last_page_shared():
            copies.append(self._copy_on_write(len(self.pages) - 1))
        grow = _ceil_div(self.num_tokens + n_new, self.page_size) - len(self.pages)
        self.pages.extend(self.pool.allocate(max(grow, 0)))
        self.num_tokens += n_new
        return copies

    def slots(self, start: int, end: int) -> list[int]:
        """Flat slot ids ``page * page_size + offset`` of tokens ``start .. end - 1``."""
        if not 0 <= start <= end <= self.num_tokens:
            raise ValueError(f"slots({start}, {end}) out of range for a sequence of {self.num_tokens} tokens")
        ps = self.page_size
        return [self.pages[t // ps] * ps + t % ps for t in range(start, end)]

    def release(self) -> None:
        """Drop this sequence's reference to all its pages (idempotent)."""
        self.pool.decref(self.pages)
        self.pages = []
        self.num_tokens = 0

    def _last_page_shared(self) -> bool:
        return self.num_tokens % self.page_size != 0 and self.pool.refcount(self.pages[-1]) > 1

    def _copy_on_write(self, index: int) -> tuple[int, int]:
        """Replace shared page ``pages[index]`` with a fresh private page; returns the copy to apply."""
        src = self.pages[index]
        (dst,) = self.pool.allocate(1)
        self.pool.decref([src])
        self.pages[index] = dst
        return src, dst


class PagedKVCache:
    """The KV tensors of all layers and the page pool that indexes them."""

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.pool = PagePool(num_pages, page_size)
        self.page_size = page_size
        # [L, P, 2, page_size, Hkv, D]: one allocation; kv_layers[i] is a contiguous view per layer.
        self.data = torch.zeros(num_layers, num_pages, 2, page_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.kv_layers: list[Tensor] = list(self.data.unbind(0))

    @classmethod
    def for_model(
        cls,
        cfg: LLMConfig,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> PagedKVCache:
        """A cache shaped for the LLM described by ``cfg``."""
        return cls(cfg.num_hidden_layers, num_pages, page_size, cfg.num_key_value_heads, cfg.head_dim, dtype, device)

    def new_sequence(self) -> SequenceKV:
        return SequenceKV(self.pool)

    def copy_pages(self, copies: list[tuple[int, int]]) -> None:
        """Apply ``(src, dst)`` page copies in every layer (from ``SequenceKV.reserve``)."""
        if not copies:
            return
        src, dst = (torch.tensor(ids, device=self.data.device) for ids in zip(*copies))
        self.data[:, dst] = self.data[:, src]

    def compact(self, seq: SequenceKV, keep: int, cut: int, inv_freq: Tensor) -> None:
        """Evict tokens ``keep .. cut - 1`` of ``seq`` (model doc §5.4, design.md "Paged KV").

        Tokens ``0 .. keep - 1`` stay in place; tokens ``cut .. num_tokens - 1`` move down to start at ``keep``
        and their keys are re-rotated by ``-(cut - keep)`` positions, so each key is rotated at its new index.
        Pages no longer needed return to the pool; a shared page that would be written is copied first.
        """
        if seq.pool is not self.pool:
            raise ValueError("compact: the sequence belongs to another page pool")
        n = seq.num_tokens
        if not 0 <= keep <= cut <= n:
            raise ValueError(f"compact needs 0 <= keep <= cut <= num_tokens, got keep={keep} cut={cut} num={n}")
        if cut == keep:
            return
        new_len = n - (cut - keep)
        ps = self.page_size
        num_pages = _ceil_div(new_len, ps)
        dropped = seq.pages[num_pages:]
        shared = [i for i in range(keep // ps, num_pages) if self.pool.refcount(seq.pages[i]) > 1]
        # Dropped pages are released before the copies are allocated, so those we alone hold count as free.
        available = self.pool.num_free + sum(self.pool.refcount(p) == 1 for p in dropped)
        if len(shared) > available:
            raise OutOfPages(f"KV cache exhausted: compaction needs {len(shared)} copy-on-write page(s)")

        # Gather the tail before anything is written or freed: [tail, L, 2, Hkv, D].
        src_page, src_off = self._page_offsets(seq.slots(cut, n))
        moved = self.data[:, src_page, :, src_off]
        moved[:, :, 0] = rerotate(moved[:, :, 0], keep - cut, inv_freq)

        self.pool.decref(dropped)
        del seq.pages[num_pages:]
        seq.num_tokens = new_len
        self.copy_pages([seq._copy_on_write(i) for i in shared])
        dst_page, dst_off = self._page_offsets(seq.slots(keep, new_len))
        self.data[:, dst_page, :, dst_off] = moved

    def _page_offsets(self, slots: list[int]) -> tuple[Tensor, Tensor]:
        slots_t = torch.tensor(slots, dtype=torch.long, device=self.data.device)
        return slots_t // self.page_size, slots_t % self.page_size
