"""Page pool, page tables with copy-on-write, page copies and the turn-aligned compaction of the paged KV cache."""

from __future__ import annotations

import random

import pytest
import torch

from infinisst_backend.config import LLMConfig
from infinisst_backend.errors import CapacityError
from infinisst_backend.model.kv_cache import OutOfPages, PagedKVCache, PagePool, SequenceKV
from infinisst_backend.model.rope import RotaryEmbedding, apply_rotary, inv_freq, rerotate

PAGE = 4
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _cache(num_pages: int = 16, layers: int = 2, heads: int = 2, head_dim: int = 8) -> PagedKVCache:
    return PagedKVCache(layers, num_pages, PAGE, heads, head_dim, dtype=torch.float64)


def _read(kv: PagedKVCache, seq: SequenceKV) -> torch.Tensor:
    """The sequence's cache content in token order: [num_tokens, L, 2, Hkv, D]."""
    slots = torch.tensor(seq.slots(0, seq.num_tokens), dtype=torch.long)
    return kv.data[:, slots // PAGE, :, slots % PAGE]


def _write(kv: PagedKVCache, seq: SequenceKV, start: int, values: torch.Tensor) -> None:
    """Write values [n, L, 2, Hkv, D] at tokens start .. start + n - 1."""
    slots = torch.tensor(seq.slots(start, start + values.shape[0]), dtype=torch.long)
    kv.data[:, slots // PAGE, :, slots % PAGE] = values


# ----------------------------------------------------------------------------------------------- PagePool


def test_pool_allocate_refcount_free():
    pool = PagePool(6, PAGE)
    assert pool.allocate(2) == [0, 1]
    assert pool.num_free == 4 and pool.used_pages() == [0, 1]
    pool.incref([0])
    assert pool.refcount(0) == 2 and pool.refcount(1) == 1
    pool.decref([0, 1])
    assert pool.refcount(0) == 1 and pool.refcount(1) == 0 and pool.num_free == 5
    with pytest.raises(AssertionError, match="still referenced"):
        pool.assert_all_free()
    pool.decref([0])
    pool.assert_all_free()
    with pytest.raises(RuntimeError, match="free page"):
        pool.decref([0])
    with pytest.raises(RuntimeError, match="free page"):
        pool.incref([3])
    # Freed pages are reused.
    assert sorted(pool.allocate(6)) == list(range(6))
    assert not pool.can_allocate(1)


def test_pool_exhaustion_is_a_clear_error_and_changes_nothing():
    pool = PagePool(3, PAGE)
    pool.allocate(2)
    with pytest.raises(OutOfPages, match="exhausted"):
        pool.allocate(2)
    assert pool.num_free == 1
    assert issubclass(OutOfPages, CapacityError)

    seq = SequenceKV(pool)
    seq.reserve(3)  # takes the last page
    with pytest.raises(OutOfPages):
        seq.reserve(2)  # needs a second page
    assert seq.num_tokens == 3 and len(seq.pages) == 1
    seq.reserve(1)  # still fits in the last page
    assert seq.num_tokens == 4


def test_invalid_sizes_are_rejected():
    with pytest.raises(ValueError):
        PagePool(0, PAGE)
    with pytest.raises(ValueError):
        SequenceKV(PagePool(2, PAGE)).reserve(-1)


# ----------------------------------------------------------------------------------------------- SequenceKV


def test_reserve_grows_pages_and_slots():
    pool = PagePool(8, PAGE)
    seq = SequenceKV(pool)
    assert seq.pages_needed(6) == 2
    assert seq.reserve(6) == []
    assert seq.pages == [0, 1] and seq.num_tokens == 6
    assert seq.slots(0, 6) == [0, 1, 2, 3, 4, 5]
    assert seq.pages_needed(2) == 0 and seq.reserve(2) == [] and seq.pages == [0, 1]
    assert seq.pages_needed(1) == 1 and seq.reserve(1) == [] and seq.pages == [0, 1, 2]
    assert seq.slots(7, 9) == [7, 8]
    with pytest.raises(ValueError):
        seq.slots(0, 10)
    seq.release()
    seq.release()  # idempotent
    assert seq.pages == [] and seq.num_tokens == 0
    pool.assert_all_free()


def test_fork_copy_on_write_of_a_partial_last_page():
    pool = PagePool(8, PAGE)
    parent = SequenceKV(pool)
    parent.reserve(6)  # pages [0, 1], last page holds 2 tokens
    child = parent.fork()
    assert child.pages == [0, 1] and child.num_tokens == 6
    assert pool.refcount(0) == pool.refcount(1) == 2
    assert child.reserve(0) == []  # nothing to write, nothing to copy
    assert child.pages_needed(1) == 1

    copies = child.reserve(1)
    (src, dst), *rest = copies
    assert not rest and src == 1 and dst not in (0, 1)
    assert child.pages == [0, dst] and parent.pages == [0, 1]
    assert pool.refcount(1) == 1 and pool.refcount(dst) == 1 and pool.refcount(0) == 2
    # The parent's last page is private now: it writes in place.
    assert parent.reserve(1) == [] and parent.pages == [0, 1]
    parent.release()
    child.release()
    pool.assert_all_free()


def test_fork_at_a_page_boundary_copies_nothing():
    pool = PagePool(8, PAGE)
    parent = SequenceKV(pool)
    parent.reserve(8)
    child = parent.fork()
    assert child.reserve(3) == []
    assert child.pages[:2] == parent.pages and child.pages[2] not in parent.pages
    assert pool.refcount(parent.pages[0]) == 2 and pool.refcount(parent.pages[1]) == 2
    child.release()
    assert pool.refcount(parent.pages[0]) == 1
    parent.release()
    pool.assert_all_free()


def test_random_forks_reserves_compactions_never_corrupt_a_sequence():
    """Every token written gets a unique value; each live sequence must always read back its own values."""
    rng = random.Random(0)
    kv = PagedKVCache(1, 40, PAGE, 1, 2, dtype=torch.float64)
    freq = torch.ones(1, dtype=torch.float64)
    live: list[tuple[SequenceKV, list[float]]] = [(kv.new_sequence(), [])]
    counter = 0
    for _ in range(300):
        op = rng.random()
        seq, expected = live[rng.randrange(len(live))]
        if op < 0.2 and len(live) < 6:
            live.append((seq.fork(), list(expected)))
        elif op < 0.3 and len(live) > 1:
            live.remove((seq, expected))
            seq.release()
        elif op < 0.4 and seq.num_tokens:
            keep = rng.randint(0, seq.num_tokens)
            cut = rng.randint(keep, seq.num_tokens)
            try:
                kv.compact(seq, keep, cut, freq)
            except OutOfPages:  # copy-on-write found no free page: nothing changed
                continue
            expected[keep:cut] = []
        else:
            n_new = rng.randint(1, 6)
            if seq.pages_needed(n_new) > kv.pool.num_free:
                continue
            start = seq.num_tokens
            kv.copy_pages(seq.reserve(n_new))
            # Never write into a page another sequence still reads.
            assert all(kv.pool.refcount(s // PAGE) == 1 for s in seq.slots(start, start + n_new))
            values = torch.arange(counter, counter + n_new, dtype=torch.float64)
            counter += n_new
            _write(kv, seq, start, values[:, None, None, None, None].expand(n_new, 1, 2, 1, 2))
            expected.extend(values.tolist())
        for other, other_expected in live:
            assert _read(kv, other)[:, 0, 1, 0, 0].tolist() == other_expected
    for seq, _ in live:
        seq.release()
    kv.pool.assert_all_free()


# ----------------------------------------------------------------------------------------------- PagedKVCache


def test_copy_pages_copies_every_layer():
    kv = _cache()
    kv.data.normal_(generator=torch.Generator().manual_seed(0))
    before = kv.data.clone()
    kv.copy_pages([(2, 5), (3, 7)])
    assert torch.equal(kv.data[:, 5], before[:, 2]) and torch.equal(kv.data[:, 7], before[:, 3])
    assert torch.equal(kv.data[:, 2], before[:, 2]) and torch.equal(kv.data[:, 0], before[:, 0])
    kv.copy_pages([])
    assert kv.kv_layers[1].shape == (16, 2, PAGE, 2, 8) and kv.kv_layers[1].is_contiguous()


def _filled_sequence(kv: PagedKVCache, n: int, seed: int = 0):
    """A sequence of n tokens with keys rotated at positions 0..n-1. Returns (seq, raw keys, values, rope)."""
    cfg = LLMConfig(head_dim=kv.data.shape[-1], rope_theta=10_000.0, rope_scaling=dict(LLAMA3))
    rope = RotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(seed)
    layers, heads, dim = kv.data.shape[0], kv.data.shape[-2], kv.data.shape[-1]
    raw_keys = torch.randn(n, layers, heads, dim, generator=g, dtype=torch.float64)
    values = torch.randn(n, layers, heads, dim, generator=g, dtype=torch.float64)
    seq = kv.new_sequence()
    kv.copy_pages(seq.reserve(n))
    _write(kv, seq, 0, torch.stack((_rotated(rope, raw_keys, torch.arange(n)), values), dim=2))
    return seq, raw_keys, values, rope


def _rotated(rope: RotaryEmbedding, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate keys [n, L, H, D] at positions [n] (layers folded into heads)."""
    cos, sin = rope.cos_sin(positions, keys.dtype)
    n, layers, heads, dim = keys.shape
    return apply_rotary(keys.reshape(n, layers * heads, dim), cos, sin).reshape(keys.shape)


@pytest.mark.parametrize("keep,cut", [(5, 11), (4, 8), (0, 7), (3, 19), (6, 6), (2, 17)])
def test_compact_moves_and_rerotates_the_tail(keep, cut):
    n = 19
    kv = _cache()
    seq, raw_keys, values, rope = _filled_sequence(kv, n)
    before = _read(kv, seq).clone()
    kv.compact(seq, keep, cut, rope.inv_freq)

    new_len = n - (cut - keep)
    kept = list(range(keep)) + list(range(cut, n))  # original index of each token after compaction
    assert seq.num_tokens == new_len and len(seq.pages) == -(-new_len // PAGE)
    after = _read(kv, seq)
    assert torch.equal(after[:keep], before[:keep])  # the kept prefix is untouched
    assert torch.equal(after[:, :, 1], values[kept])  # values move exactly
    # Keys equal fresh rotations of the raw keys at their new (compact) positions.
    fresh = _rotated(rope, raw_keys[kept], torch.arange(new_len))
    assert torch.allclose(after[:, :, 0], fresh, rtol=0, atol=1e-12)
    if cut > keep and n > cut:
        assert not torch.allclose(after[keep:, :, 0], before[cut:, :, 0], atol=1e-3)  # really re-rotated
    assert kv.pool.num_free == kv.pool.num_pages - len(seq.pages)
    seq.release()
    kv.pool.assert_all_free()


def test_compact_copies_shared_pages_and_leaves_the_fork_intact():
    kv = _cache()
    parent, raw_keys, values, rope = _filled_sequence(kv, 14)
    child = parent.fork()
    parent_before = _read(kv, parent).clone()

    kv.compact(child, 3, 9, rope.inv_freq)  # writes tokens 3..7 (pages 0, 1), drops the child's refs to 2, 3
    assert torch.equal(_read(kv, parent), parent_before)
    assert child.num_tokens == 8 and child.pages[0] != parent.pages[0] and child.pages[1] != parent.pages[1]
    kept = [0, 1, 2] + list(range(9, 14))
    fresh = _rotated(rope, raw_keys[kept], torch.arange(8))
    assert torch.allclose(_read(kv, child)[:, :, 0], fresh, rtol=0, atol=1e-12)
    assert torch.equal(_read(kv, child)[:, :, 1], values[kept])
    assert all(kv.pool.refcount(p) == 1 for p in parent.pages + child.pages)
    parent.release()
    child.release()
    kv.pool.assert_all_free()


def test_compact_keeps_unwritten_shared_pages_shared():
    kv = _cache()
    parent, _, _, rope = _filled_sequence(kv, 14)
    child = parent.fork()
    kv.compact(child, 9, 12, rope.inv_freq)  # writes only page 2; pages 0, 1 stay shared
    assert child.pages[:2] == parent.pages[:2] and kv.pool.refcount(parent.pages[0]) == 2
    assert child.pages[2] != parent.pages[2]


def test_compact_validates_and_fails_cleanly_when_out_of_pages():
    kv = _cache(num_pages=8)
    seq, _, _, rope = _filled_sequence(kv, 14)  # 4 pages
    with pytest.raises(ValueError):
        kv.compact(seq, 5, 4, rope.inv_freq)
    with pytest.raises(ValueError):
        kv.compact(seq, 0, 15, rope.inv_freq)
    with pytest.raises(ValueError, match="another page pool"):
        _cache().compact(seq, 0, 4, rope.inv_freq)

    forks = [seq.fork()]
    kv.pool.allocate(kv.pool.num_free)  # nothing left for copy-on-write
    state = (list(seq.pages), seq.num_tokens)
    with pytest.raises(OutOfPages):
        kv.compact(seq, 1, 6, rope.inv_freq)
    assert (seq.pages, seq.num_tokens) == state and forks[0].pages == seq.pages


def test_rerotate_by_a_delta_equals_rotation_at_the_new_position():
    cfg = LLMConfig(head_dim=16, rope_theta=500_000.0, rope_scaling=dict(LLAMA3))
    rope = RotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 16, generator=g, dtype=torch.float64)
    positions = torch.tensor([40, 41, 90, 700, 1100])
    cos, sin = rope.cos_sin(positions, torch.float64)
    moved = rerotate(apply_rotary(x, cos, sin), -37, inv_freq(cfg))
    cos, sin = rope.cos_sin(positions - 37, torch.float64)
    assert torch.allclose(moved, apply_rotary(x, cos, sin), rtol=0, atol=1e-12)
    # float32 keys stay float32, within float32 rounding.
    moved32 = rerotate(apply_rotary(x, *rope.cos_sin(positions, torch.float64)).float(), -37, inv_freq(cfg))
    assert moved32.dtype == torch.float32
    assert torch.allclose(moved32.double(), apply_rotary(x, cos, sin), atol=1e-5)


# ----------------------------------------------------------------------------------------------- compact_many


def _reference_rerotate(x: torch.Tensor, delta: int, freq: torch.Tensor) -> torch.Tensor:
    """Re-rotation as first written (one delta, angles in float64, computed in float32 or float64)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    angle = delta * freq.to(torch.float64)
    cos = angle.cos().to(device=x.device, dtype=compute)
    sin = angle.sin().to(device=x.device, dtype=compute)
    x1, x2 = x.to(compute).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _reference_compact(kv: PagedKVCache, seq: SequenceKV, keep: int, cut: int, freq: torch.Tensor) -> None:
    """The per-sequence compaction as first written (per-token slot lists, one re-rotation): the oracle."""
    n, ps = seq.num_tokens, kv.page_size
    if cut == keep:
        return
    new_len = n - (cut - keep)
    num_pages = -(-new_len // ps)
    dropped = seq.pages[num_pages:]
    shared = [i for i in range(keep // ps, num_pages) if kv.pool.refcount(seq.pages[i]) > 1]
    if len(shared) > kv.pool.num_free + sum(kv.pool.refcount(p) == 1 for p in dropped):
        raise OutOfPages("reference: out of pages")
    src = torch.tensor(seq.slots(cut, n), dtype=torch.long, device=kv.data.device)
    moved = kv.data[:, src // ps, :, src % ps]
    moved[:, :, 0] = _reference_rerotate(moved[:, :, 0], keep - cut, freq)
    kv.pool.decref(dropped)
    del seq.pages[num_pages:]
    seq.num_tokens = new_len
    kv.copy_pages([seq._copy_on_write(i) for i in shared])
    dst = torch.tensor(seq.slots(keep, new_len), dtype=torch.long, device=kv.data.device)
    kv.data[:, dst // ps, :, dst % ps] = moved


def _scenario(dtype: torch.dtype, seed: int, num_pages: int = 400, head_dim: int = 8, forks: int = 6):
    """Random sequences, forks of them (sharing pages, some extended past the fork) and compactions of a
    random subset (each sequence once; cut == keep, keep == 0 and cut == num_tokens included).

    Deterministic in ``seed``: two calls build identical caches. Returns (kv, items, sequences).
    """
    rng = random.Random(seed)
    kv = PagedKVCache(3, num_pages, PAGE, 2, head_dim, dtype=dtype)
    kv.data.copy_(torch.randn(kv.data.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    seqs = []
    for _ in range(8):
        seq = kv.new_sequence()
        kv.copy_pages(seq.reserve(rng.randint(1, 60)))
        seqs.append(seq)
    for _ in range(forks):
        child = rng.choice(seqs).fork()
        if rng.random() < 0.5:
            kv.copy_pages(child.reserve(rng.randint(1, 9)))  # a partial shared last page is copied
        seqs.append(child)
    items = []
    for seq in rng.sample(seqs, min(10, len(seqs))):
        n = seq.num_tokens
        keep = rng.choice([0, rng.randint(0, n)])
        cut = rng.choice([keep, n, rng.randint(keep, n), rng.randint(keep, n)])
        items.append((seq, keep, cut))
    return kv, items, seqs


def _state(kv: PagedKVCache, seqs: list[SequenceKV]):
    return [(list(s.pages), s.num_tokens) for s in seqs], list(kv.pool._free), list(kv.pool._refcounts)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(6))
def test_compact_many_equals_compacting_one_by_one(dtype, seed):
    """Bit for bit: the whole data tensor, every page table, the free list and the reference counts."""
    freq = inv_freq(LLMConfig(head_dim=8, rope_theta=10_000.0, rope_scaling=dict(LLAMA3)))
    ref, ref_items, ref_seqs = _scenario(dtype, seed)
    for seq, keep, cut in ref_items:
        _reference_compact(ref, seq, keep, cut, freq)
    copied = sum(ref.pool.refcount(p) for p in range(ref.pool.num_pages))
    for group_tokens in (10**6, 7, 1):  # one gather/scatter, several, one per sequence
        kv, items, seqs = _scenario(dtype, seed)
        kv.compact_group_bytes = group_tokens * kv._token_bytes()
        kv.compact_many(items, freq)
        assert torch.equal(kv.data, ref.data), group_tokens
        assert _state(kv, seqs) == _state(ref, ref_seqs)
    # The single-sequence API is the same code.
    kv, items, seqs = _scenario(dtype, seed)
    for item in items:
        kv.compact(*item, freq)
    assert torch.equal(kv.data, ref.data) and _state(kv, seqs) == _state(ref, ref_seqs)
    assert copied == sum(len(s.pages) for s in ref_seqs)  # every reference belongs to a live sequence


def test_compact_many_copies_shared_pages_of_forks_compacted_together():
    """A parent and its fork in one call: the first copies the shared pages, the second then writes in place."""
    freq = inv_freq(LLMConfig(head_dim=8, rope_theta=10_000.0))
    ref = PagedKVCache(1, 12, PAGE, 1, 8, dtype=torch.float64)
    kv = PagedKVCache(1, 12, PAGE, 1, 8, dtype=torch.float64)
    for cache in (ref, kv):
        cache.data.normal_(generator=torch.Generator().manual_seed(3))
    states = []
    for cache, batched in ((ref, False), (kv, True)):
        parent = cache.new_sequence()
        cache.copy_pages(parent.reserve(14))
        child = parent.fork()
        items = [(child, 2, 9), (parent, 1, 5)]
        if batched:
            cache.compact_many(items, freq)
        else:
            for item in items:
                _reference_compact(cache, *item, freq)
        assert child.pages[0] != parent.pages[0]  # the child copied page 0; the parent then owned it alone
        states.append(_state(cache, [parent, child]))
    assert states[0] == states[1] and torch.equal(kv.data, ref.data)


def test_compact_many_out_of_pages_changes_nothing():
    freq = inv_freq(LLMConfig(head_dim=8, rope_theta=10_000.0))
    kv = PagedKVCache(2, 10, PAGE, 2, 8, dtype=torch.float64)
    kv.data.normal_(generator=torch.Generator().manual_seed(0))
    a, b, c = kv.new_sequence(), kv.new_sequence(), kv.new_sequence()
    for seq, n in ((a, 14), (b, 8), (c, 6)):
        kv.copy_pages(seq.reserve(n))
    forks = [b.fork(), c.fork()]
    kv.pool.allocate(kv.pool.num_free - 1)  # one page left
    before = (kv.data.clone(), _state(kv, [a, b, c, *forks]))
    # a alone fits (no copies); b then needs 2 copies with one free page: nothing may change, a included.
    with pytest.raises(OutOfPages):
        kv.compact_many([(a, 2, 3), (b, 1, 3)], freq)
    # Each of c and b fits alone (one copy each) but not both together.
    with pytest.raises(OutOfPages):
        kv.compact_many([(c, 5, 6), (b, 5, 7)], freq)
    # Bad arguments are refused before anything changes too.
    with pytest.raises(ValueError, match="more than once"):
        kv.compact_many([(a, 2, 10), (a, 0, 1)], freq)
    with pytest.raises(ValueError, match="keep <= cut"):
        kv.compact_many([(a, 2, 10), (c, 3, 2)], freq)
    assert torch.equal(kv.data, before[0]) and _state(kv, [a, b, c, *forks]) == before[1]
    # Pages a drops (it alone holds them) pay for b's copy within the same call, as compacting in turn would.
    kv.compact_many([(a, 0, 12), (b, 5, 7)], freq)
    assert a.num_tokens == 2 and len(b.pages) == 2 and b.pages[1] != forks[0].pages[1] and kv.pool.num_free == 3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rerotate_tokens_equals_rerotate_per_delta(dtype):
    """A delta per token gives bit for bit what rerotate (and its original form) gives for each delta."""
    from infinisst_backend.model.rope import rerotate_tokens, rerotation_compute_dtype, rerotation_cos_sin

    for head_dim in (8, 128):
        freq = inv_freq(LLMConfig(head_dim=head_dim, rope_theta=500_000.0, rope_scaling=dict(LLAMA3)))
        deltas = [-1, -37, -250, -999, -4, -1000, -37]
        x = torch.randn(len(deltas), 3, 2, head_dim, generator=torch.Generator().manual_seed(5)).to(dtype)
        table = torch.stack([rerotation_cos_sin(d, freq) for d in deltas]).to(rerotation_compute_dtype(dtype))
        batched = rerotate_tokens(x, table)
        for i, delta in enumerate(deltas):
            assert torch.equal(batched[i], rerotate(x[i], delta, freq))
            assert torch.equal(batched[i], _reference_rerotate(x[i], delta, freq))
