"""Paged KV cache of the LLM: page ids and reference counts, per-sequence page tables, and the tensors.

* :class:`PagePool` hands out page ids and counts references; it never touches a tensor.
* :class:`SequenceKV` is the page table of one sequence (a stream, or one beam of it). Beams fork a sequence
  and share its pages; a shared page is never written: the first writer copies it (copy-on-write).
* :class:`PagedKVCache` owns the per-layer tensors ``[num_pages, 2, page_size, num_kv_heads, head_dim]``
  (FlashInfer's NHD layout, K at index 0, V at 1) and the page operations that move data: page copies and the
  turn-aligned eviction :meth:`PagedKVCache.compact` (of many sequences at once: ``compact_many``).

Token ``t`` of a sequence lives in page ``pages[t // page_size]`` at offset ``t % page_size``; its flat slot
id is ``page * page_size + offset``. Keys are stored rotated at position ``t`` (docs/design.md "Paged KV").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from infinisst_backend.config import LLMConfig
from infinisst_backend.errors import CapacityError
from infinisst_backend.kernels import llm_kernels
from infinisst_backend.model.rope import rerotate_tokens, rerotation_compute_dtype, rerotation_cos_sin


class OutOfPages(CapacityError):
    """The page pool cannot satisfy an allocation. Nothing was changed by the failed call."""


# Distinct re-rotation deltas whose cos/sin rows are kept (deltas are eviction lengths, at most about a window).
_MAX_MEMO_DELTAS = 8192


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

    def share_prefix(self, n: int) -> SequenceKV:
        """A sequence of this one's first ``n`` tokens that shares their pages (one more reference each); a partial
        last page is copied when the new sequence first grows (copy-on-write)."""
        if not 0 <= n <= self.num_tokens:
            raise ValueError(f"share_prefix({n}) out of range for a sequence of {self.num_tokens} tokens")
        child = SequenceKV(self.pool)
        child.pages = self.pages[: _ceil_div(n, self.page_size)]
        child.num_tokens = n
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

    # compact_many moves at most this many bytes of K/V (all layers) per gather/scatter; its scratch memory is
    # about 2.5 times that, and one sequence's tail always goes in one piece. None: 512 MiB on a GPU (larger
    # groups amortize the kernel launches), 16 MiB on the CPU (groups that stay in cache are faster there).
    compact_group_bytes: int | None = None
    # compact_many moves the tails with one Triton kernel (llm_kernels.move_tokens: in place, keys re-rotated on the
    # way, the same bits) where it can: the runner turns this on for CUDA caches with EngineConfig.fused_kernels.
    # Batches with copy-on-write pages (beam search) keep the gather/scatter below.
    move_kernel: bool = False

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        scratch_pages: int = 0,
    ):
        """``scratch_pages`` extra pages (ids ``num_pages ..``) sit outside the pool: no sequence ever owns them
        (CUDA-graph padding rows write there)."""
        self.pool = PagePool(num_pages, page_size)
        self.page_size = page_size
        # [L, P, 2, page_size, Hkv, D]: one allocation; kv_layers[i] is a contiguous view per layer.
        shape = (num_layers, num_pages + scratch_pages, 2, page_size, num_kv_heads, head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.kv_layers: list[Tensor] = list(self.data.unbind(0))
        self._rerotation_rows: dict[int, Tensor] = {}  # delta -> rerotation_cos_sin(delta, _rerotation_freq)
        self._rerotation_freq: Tensor | None = None

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
        """Evict tokens ``keep .. cut - 1`` of ``seq`` (docs/model.md §5.4, docs/design.md "Paged KV").

        Tokens ``0 .. keep - 1`` stay in place; tokens ``cut .. num_tokens - 1`` move down to start at ``keep``
        and their keys are re-rotated by ``-(cut - keep)`` positions, so each key is rotated at its new index.
        Pages no longer needed return to the pool; a shared page that would be written is copied first.
        """
        self.compact_many([(seq, keep, cut)], inv_freq)

    def compact_many(self, items: list[tuple[SequenceKV, int, int]], inv_freq: Tensor) -> None:
        """Evict ``(seq, keep, cut)`` for each item: the same pages and contents as :meth:`compact` on each in turn.

        Each sequence may appear once. All arguments are checked and the copy-on-write pages of all items
        counted before anything changes (``ValueError``, :class:`OutOfPages`). The page accounting then runs
        item by item as :meth:`compact` would; the data moves of many items run together: index tensors built
        on the device from the page tables, one gather of all tails, one re-rotation with each token's own
        delta, the page copies, one scatter (split into groups of at most ``compact_group_bytes`` moved).
        """
        work = []
        for seq, keep, cut in items:
            if seq.pool is not self.pool:
                raise ValueError("compact: the sequence belongs to another page pool")
            n = seq.num_tokens
            if not 0 <= keep <= cut <= n:
                raise ValueError(f"compact needs 0 <= keep <= cut <= num_tokens, got keep={keep} cut={cut} num={n}")
            if cut > keep:
                work.append((seq, int(keep), int(cut)))
        if len({id(seq) for seq, _, _ in items}) != len(items):
            raise ValueError("compact_many: a sequence appears more than once")
        to_copy = self._pages_to_copy(work)

        ps = self.page_size
        moves = []
        for (seq, keep, cut), shared in zip(work, to_copy):
            n = seq.num_tokens
            new_len = n - (cut - keep)
            num_pages = _ceil_div(new_len, ps)
            tail = n - cut
            src_pages = seq.pages[cut // ps : _ceil_div(n, ps)] if tail else []
            self.pool.decref(seq.pages[num_pages:])
            del seq.pages[num_pages:]
            seq.num_tokens = new_len
            copies = [seq._copy_on_write(i) for i in shared]
            dst_pages = seq.pages[keep // ps : num_pages] if tail else []
            moves.append(_Move(tail, keep - cut, cut % ps, src_pages, keep % ps, dst_pages, copies))

        if self.move_kernel and llm_kernels.move_tokens_usable(self.data) and not any(m.copies for m in moves):
            # One in-place kernel for all moves (no scratch copy of the tails, so no grouping).
            moving = [m for m in moves if m.tail]
            if moving:
                cos_sin = self._rerotation_table([m.delta for m in moving], inv_freq)
                llm_kernels.move_tokens(
                    self.data,
                    [(m.tail, m.src_off, m.src_pages, m.dst_off, m.dst_pages) for m in moving],
                    cos_sin.to(device=self.data.device, dtype=torch.float32),
                )
            return

        group, group_tokens = [], 0
        group_bytes = self.compact_group_bytes or (512 if self.data.is_cuda else 16) * 2**20
        limit = max(1, group_bytes // self._token_bytes())
        for move in moves:
            if group and group_tokens + move.tail > limit:
                self._apply_moves(group, inv_freq)
                group, group_tokens = [], 0
            group.append(move)
            group_tokens += move.tail
        if group:
            self._apply_moves(group, inv_freq)

    def _pages_to_copy(self, work: list[tuple[SequenceKV, int, int]]) -> list[list[int]]:
        """Per item, the page indices :meth:`compact` would copy (shared pages in the written range).

        Replays the reference counts item by item without changing the pool; raises :class:`OutOfPages` if
        some item would find too few free pages.
        """
        ps, refcounts = self.page_size, self.pool._refcounts
        changed: dict[int, int] = {}  # reference counts as the earlier items leave them
        get = changed.get
        free = self.pool.num_free
        result = []
        for seq, keep, cut in work:
            num_pages = _ceil_div(seq.num_tokens - (cut - keep), ps)
            for page in seq.pages[num_pages:]:  # dropped pages are released before the copies are allocated
                count = get(page, refcounts[page]) - 1
                changed[page] = count
                free += count == 0
            first = keep // ps
            shared = [i for i, page in enumerate(seq.pages[first:num_pages], first) if get(page, refcounts[page]) > 1]
            if len(shared) > free:
                raise OutOfPages(
                    f"KV cache exhausted: compaction needs {len(shared)} copy-on-write page(s), {free} free"
                )
            free -= len(shared)
            for i in shared:
                page = seq.pages[i]
                changed[page] = get(page, refcounts[page]) - 1
            result.append(shared)
        return result

    def _token_bytes(self) -> int:
        """Bytes one token occupies over all layers, K and V."""
        num_layers, _, two, _, heads, dim = self.data.shape
        return num_layers * two * heads * dim * self.data.element_size()

    def _apply_moves(self, moves: list[_Move], inv_freq: Tensor) -> None:
        """Gather the tails of ``moves``, re-rotate their keys, apply the page copies, scatter the tails.

        Data moves whole rows (one token's K or V of one layer, ``Hkv * D`` elements, contiguous in the
        page layout) seen as wide integers, so the copies are exact and coalesced.
        """
        moves_with_data = [m for m in moves if m.tail]
        total = sum(m.tail for m in moves_with_data)
        if total:
            num_layers, num_pages, _, ps, heads, dim = self.data.shape
            tails, src_page, src_off, dst_page, dst_off = self._move_indices(moves_with_data, total)
            layer = torch.arange(num_layers, device=self.data.device) * (num_pages * 2 * ps)
            # Row of the K of (token, layer) in [L * P * 2 * page_size] rows; its V is page_size rows further.
            src = ((src_page * (2 * ps) + src_off)[:, None] + layer).view(-1)
            dst = ((dst_page * (2 * ps) + dst_off)[:, None] + layer).view(-1)
            rows = self._rows()
            # Gather before any page is written.
            keys = rows.index_select(0, src).view(self.data.dtype).view(total, num_layers, heads, dim)
            values = rows.index_select(0, src + ps)
            cos_sin = self._rerotation_table([m.delta for m in moves_with_data], inv_freq)
            cos_sin = cos_sin.to(device=self.data.device, dtype=rerotation_compute_dtype(self.data.dtype))
            cos_sin = torch.repeat_interleave(cos_sin, tails, dim=0, output_size=total)  # [total, 2, D/2]
            keys = rerotate_tokens(keys, cos_sin)
        self.copy_pages([copy for m in moves for copy in m.copies])
        if total:
            rows.index_copy_(0, dst, keys.view(total * num_layers, heads * dim).view(rows.dtype))
            rows.index_copy_(0, dst + ps, values)

    def _rows(self) -> Tensor:
        """``data`` as rows ``[L * P * 2 * page_size, words]``, one per (layer, page, K/V, offset).

        A row's ``Hkv * D`` elements are seen as the widest integer type that divides its size.
        """
        row_bytes = self.data.shape[-2] * self.data.shape[-1] * self.data.element_size()
        word = next(t for t in (torch.int64, torch.int32, torch.int16, torch.uint8) if row_bytes % t.itemsize == 0)
        return self.data.view(-1, self.data.shape[-2] * self.data.shape[-1]).view(word)

    def _move_indices(self, moves: list[_Move], total: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The moves' tails, then (page, offset) of each moved token's source and destination, on the device.

        Token ``j`` of a move (``0 <= j < tail``) reads page ``src_pages[(src_off + j) // page_size]`` at
        offset ``(src_off + j) % page_size``, and likewise for its destination. One host-to-device copy holds
        the per-move numbers and the concatenated page lists.
        """
        per_move, src_pages, dst_pages = [], [], []
        start = 0
        for m in moves:
            # Columns: shift so that (token index + shift) is the offset from the move's first page; that page's
            # index in the concatenated page list; the same two for the destination.
            per_move += [m.src_off - start, len(src_pages), m.dst_off - start, len(dst_pages)]
            src_pages += m.src_pages
            dst_pages += m.dst_pages
            start += m.tail
        host = torch.tensor([m.tail for m in moves] + per_move + src_pages + dst_pages, dtype=torch.long)
        buf = host.to(self.data.device)
        k = len(moves)
        tails, per_move_t = buf[:k], buf[k : 5 * k].view(k, 4)
        src_t, dst_t = buf[5 * k : 5 * k + len(src_pages)], buf[5 * k + len(src_pages) :]
        per_token = torch.repeat_interleave(per_move_t, tails, dim=0, output_size=total)  # [total, 4]
        token = torch.arange(total, device=buf.device)
        ps = self.page_size
        src = token + per_token[:, 0]
        dst = token + per_token[:, 2]
        src_page, dst_page = src_t[per_token[:, 1] + src // ps], dst_t[per_token[:, 3] + dst // ps]
        return tails, src_page, src % ps, dst_page, dst % ps

    def _rerotation_table(self, deltas: list[int], inv_freq: Tensor) -> Tensor:
        """``[len(deltas), 2, D/2]`` float64: :func:`rerotation_cos_sin` of each delta, memoized per delta."""
        if self._rerotation_freq is not inv_freq or len(self._rerotation_rows) > _MAX_MEMO_DELTAS:
            self._rerotation_rows.clear()
            self._rerotation_freq = inv_freq
        rows = self._rerotation_rows
        for delta in deltas:
            if delta not in rows:
                rows[delta] = rerotation_cos_sin(delta, inv_freq)
        return torch.stack([rows[delta] for delta in deltas])


@dataclass(slots=True)
class _Move:
    """The data side of one compaction: ``tail`` tokens move from ``src_pages`` to ``dst_pages``.

    ``src_off``/``dst_off`` are the first token's offsets in the first page of each list; ``delta`` is the
    key re-rotation; ``copies`` the copy-on-write page copies to apply between the gather and the scatter.
    """

    tail: int
    delta: int
    src_off: int
    src_pages: list[int]
    dst_off: int
    dst_pages: list[int]
    copies: list[tuple[int, int]]
