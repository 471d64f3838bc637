"""The LLM's fused kernels (:mod:`infinisst_backend.kernels.llm_kernels`), run by Triton's CPU interpreter.

On a GPU the same kernels are compiled inside the decode/prefill CUDA graphs; ``tests/test_gpu.py`` checks them there
in bf16. In float32 the interpreter computes what the GPU computes (no bf16 rounding involved), so RoPE, the K/V
writes, the residual add and SwiGLU are checked exactly; RMSNorm sums in another order than torch's reduction.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from infinisst_backend.config import LLMConfig
from infinisst_backend.kernels import llm_kernels
from infinisst_backend.kernels.attention import AttentionBatch, TorchAttention, write_kv
from infinisst_backend.model.kv_cache import PagedKVCache
from infinisst_backend.model.llm import LLM, RMSNorm
from infinisst_backend.model.rope import RotaryEmbedding, apply_rotary, inv_freq
from tests.test_kv_cache import LLAMA3, _reference_compact, _scenario, _state
from tests.test_llm import CONFIGS

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # conftest turns it on without CUDA, before triton is imported
    pytest.skip(
        "needs Triton's interpreter from the start (tl.sum is built for it only then); on a GPU, tests/test_gpu.py "
        "checks the compiled kernels",
        allow_module_level=True,
    )


@pytest.fixture
def interpreted(monkeypatch):
    """Kernels built from here on run in Triton's interpreter (on CPU tensors)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    llm_kernels._kernels.cache_clear()
    monkeypatch.setattr(llm_kernels._switch, "reason", None)
    yield
    llm_kernels._kernels.cache_clear()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("width", [64, 96])  # a power of two, and one the kernel's block must mask
def test_rms_norm_and_residual_add(interpreted, width):
    gen = _gen()
    norm = RMSNorm(width, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(width, generator=gen) + 0.5)
    x, a = (3 * torch.randn(5, width, generator=gen) for _ in range(2))
    want = norm(x)
    got = llm_kernels.rms_norm(x, norm.weight.detach(), norm.eps)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # only the sum's order differs

    got_norm, got_h = llm_kernels.rms_norm(x, norm.weight.detach(), norm.eps, residual=a)
    assert torch.equal(got_h, x + a)
    torch.testing.assert_close(got_norm, norm(x + a), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="weight"):
        llm_kernels.rms_norm(x, torch.ones(width + 1), 1e-5)


def test_rope_write_kv_equals_apply_rotary_and_write_kv(interpreted):
    """q and k rotated exactly as ``apply_rotary``, k and v stored exactly as ``write_kv`` at scattered slots."""
    gen = _gen(1)
    tokens, heads, kv_heads, dim, page_size, pages = 7, 4, 2, 16, 4, 9
    rope = RotaryEmbedding(LLMConfig(head_dim=dim, hidden_size=heads * dim, num_attention_heads=heads))
    positions = torch.tensor([0, 1, 2, 40, 41, 7, 1000])
    cos, sin = rope.cos_sin(positions, torch.float32)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen)
    slots = torch.randperm(pages * page_size, generator=gen)[:tokens]
    page, offset = slots // page_size, slots % page_size
    kv = torch.randn(pages, 2, page_size, kv_heads, dim, generator=gen)
    want_kv = kv.clone()

    q = llm_kernels.rope_write_kv(qkv, cos, sin, page, offset, kv, heads, kv_heads)

    q_ref, k_ref, v_ref = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q_ref = apply_rotary(q_ref.view(tokens, heads, dim), cos, sin)
    k_ref = apply_rotary(k_ref.view(tokens, kv_heads, dim), cos, sin)
    write_kv(want_kv, page, offset, k_ref, v_ref.view(tokens, kv_heads, dim))
    assert q.shape == (tokens, heads, dim)
    assert torch.equal(q, q_ref)
    assert torch.equal(kv, want_kv)  # the slots written, every other slot untouched
    with pytest.raises(ValueError, match="heads"):
        llm_kernels.rope_write_kv(qkv, cos, sin, page, offset, kv, heads + 1, kv_heads)
    with pytest.raises(ValueError, match="rotary"):
        llm_kernels.rope_write_kv(qkv, cos[:-1], sin[:-1], page, offset, kv, heads, kv_heads)


def test_silu_mul(interpreted):
    gate_up = 4 * torch.randn(3, 2 * 1500, generator=_gen(2))  # 1500: two blocks, the second one masked
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(llm_kernels.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-6, atol=1e-6)


def _tiny_llm() -> LLM:
    torch.manual_seed(0)
    cfg = CONFIGS["llama3"]  # Llama-3.1's RoPE scaling, GQA (4 query / 2 KV heads)
    llm = LLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights
        for module in llm.modules():
            if isinstance(module, RMSNorm):
                module.weight.uniform_(0.5, 1.5)
    llm.fuse_projections()
    return llm


def _forward(llm: LLM, embeds: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefill of two sequences (5 and 3 new tokens after 4 and 0 cached) on a fresh cache; hidden states and
    the cache."""
    cfg = llm.cfg
    kv = PagedKVCache(cfg.num_hidden_layers, 8, 4, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cpu")
    batch = AttentionBatch.build([5, 3], [[0, 1, 2], [5, 4]], [9, 3], 4, device="cpu")
    attn = TorchAttention()
    attn.plan(batch)
    with torch.no_grad():
        kv.data.copy_(torch.randn(kv.data.shape, generator=_gen(3)))  # the 4 cached tokens of sequence 0
        if fused:
            with llm_kernels.fused_passes():
                return llm(embeds, batch.positions, kv, attn), kv.data.clone()
        return llm(embeds, batch.positions, kv, attn), kv.data.clone()


def test_llm_forward_with_fused_kernels_equals_the_reference(interpreted):
    """The whole decoder with the fused kernels (as the CUDA graphs capture it) against the reference ops; only
    RMSNorm's summation order differs."""
    llm = _tiny_llm()
    embeds = torch.randn(8, 64, generator=_gen(4))
    want, want_kv = _forward(llm, embeds, fused=False)
    assert not llm_kernels.active(embeds)  # outside fused_passes
    got, got_kv = _forward(llm, embeds, fused=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_kv, want_kv, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got_kv, torch.zeros_like(got_kv))


def test_ready_and_disable(interpreted, monkeypatch, caplog):
    """ready() compiles and runs each kernel once; a failure disables them for the process with one warning, and the
    LLM then runs the reference ops inside fused_passes too."""
    assert llm_kernels.ready("cpu", torch.float32)
    with llm_kernels.fused_passes():
        assert llm_kernels.active(torch.zeros(1))
        assert not llm_kernels.active(torch.zeros(1, dtype=torch.float64))

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(llm_kernels, "silu_mul", broken)
    with caplog.at_level("WARNING"):
        assert not llm_kernels.ready("cpu", torch.float32)
        assert not llm_kernels.ready("cpu", torch.float32)
    assert [r.message for r in caplog.records].count(
        "LLM fused kernels disabled, using the separate torch ops: RuntimeError: no compiler here"
    ) == 1
    llm = _tiny_llm()
    embeds = torch.randn(8, 64, generator=_gen(4))
    with llm_kernels.fused_passes():
        assert not llm_kernels.active(embeds)
    want, _ = _forward(llm, embeds, fused=False)
    got, _ = _forward(llm, embeds, fused=True)
    assert torch.equal(got, want)  # the reference ops, bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the interpreter truncates to bf16 (GPU: test_gpu)
@pytest.mark.parametrize("forks", [0, 6])
@pytest.mark.parametrize("seed", range(3))
def test_eviction_kernel_equals_the_reference_compaction(interpreted, dtype, forks, seed):
    """compact_many with the move kernel: the same data bits, page tables and free list as the reference per-sequence
    compaction. With forks (copy-on-write pages) the batch keeps the gather/scatter path, with the same result."""
    freq = inv_freq(LLMConfig(head_dim=16, rope_theta=10_000.0, rope_scaling=dict(LLAMA3)))
    ref, ref_items, ref_seqs = _scenario(dtype, seed, head_dim=16, forks=forks)
    for seq, keep, cut in ref_items:
        _reference_compact(ref, seq, keep, cut, freq)
    kv, items, seqs = _scenario(dtype, seed, head_dim=16, forks=forks)
    kv.move_kernel = True
    moving = any(keep < cut < seq.num_tokens for seq, keep, cut in items)
    calls = []
    real = llm_kernels.move_tokens
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llm_kernels, "move_tokens", lambda *a, **k: calls.append(1) or real(*a, **k))
        kv.compact_many(items, freq)
    assert bool(calls) == (forks == 0 and moving)
    assert torch.equal(kv.data, ref.data)
    assert _state(kv, seqs) == _state(ref, ref_seqs)


def test_move_kernel_is_readied_on_the_cache_itself(interpreted, monkeypatch, caplog):
    """move_tokens_ready compiles the kernel for the real cache by a move that leaves it as it was; if the kernel
    cannot run, the kernels are disabled with one warning and evictions keep the gather/scatter path."""
    kv = PagedKVCache(2, 6, 4, 2, 16, dtype=torch.float32)
    kv.data.normal_(generator=_gen(7))
    before = kv.data.clone()
    assert llm_kernels.move_tokens_ready(kv.data)
    assert torch.equal(kv.data, before)

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(llm_kernels, "move_tokens", broken)
    with caplog.at_level("WARNING"):
        assert not llm_kernels.move_tokens_ready(kv.data)
    assert not llm_kernels.move_tokens_usable(kv.data)
    assert "no compiler here" in caplog.text
