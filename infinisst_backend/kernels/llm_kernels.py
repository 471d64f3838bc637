"""Fused elementwise kernels of the LLM's layers (Triton), for the steps that CUDA graphs replay.

Per layer the reference ops launch about 44 kernels, and at decode batch sizes most of them are tiny: each RMSNorm is
eight (cast, square, mean, add, rsqrt, product, cast, weight), each RoPE seven per tensor (four products, a sum, a
difference, a concatenation), writing K/V into the pages two more, SwiGLU two, and the residual adds. Together they
cost a decode step as much kernel time as its attention (measured with ``benchmarks/profile_llm.py``; figures in
docs/benchmarks/notes.md). Three kernels replace them:

* :func:`rms_norm`: the norm of a row, optionally after adding the residual branch (``h + a``, whose sum it also
  returns);
* :func:`rope_write_kv`: RoPE on the q and k heads of the fused q/k/v projection; q goes to a new tensor, the rotated
  k and the v heads straight into the layer's KV pages at the step's slots;
* :func:`silu_mul`: ``silu(gate) * up`` of the fused gate/up projection.

They round as the reference ops do, step by step: every intermediate the reference stores in the model dtype is
rounded to it here too (round to nearest even), products are not fused into multiply-adds, and ``exp``, ``rsqrt``
and division are CUDA's own (libdevice's ``expf`` and ``rsqrtf``, an IEEE division). RoPE, SwiGLU and the residual
add are therefore bit for bit the reference's. RMSNorm sums the squares in another order than torch's reduction, so
its fp32 inverse norm may differ in the last bit, which after rounding to bf16 moves rare outputs by one unit.

The LLM uses them only inside :func:`fused_passes`, which :class:`~runtime.llm_graphs.StepGraphs` enters
around its warm-ups and captures: a launch from Python costs more host time than the kernels save. :func:`ready`
compiles and runs each kernel once on a small input first; if Triton cannot (no compiler, no writable cache), the
kernels are disabled for the process with one warning and the graphs capture the reference ops.

Triton is imported on first use; under its CPU interpreter (``TRITON_INTERPRET=1``) the kernels run on CPU tensors,
which is how the tests check them without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import Tensor

from infinisst_backend.kernels.availability import (
    TRITON_DTYPES,
    KernelSwitch,
    pow2_dim,
    triton_importable,
    triton_runs_on,
)

logger = logging.getLogger(__name__)

_PASSES: ContextVar[bool] = ContextVar("llm_fused_passes", default=False)
_switch = KernelSwitch("LLM fused kernels", logger)  # off once a kernel failed here (see disable)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import libdevice

    @triton.jit
    def rms_norm_kernel(
        x, res, h_out, weight, out, N, eps, inv_n, BLOCK: tl.constexpr, HAS_RES: tl.constexpr, CUDA: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        xv = tl.load(x + row * N + cols, mask=mask, other=0.0)
        if HAS_RES:  # h = x + a, rounded to the model dtype as the reference's add
            rv = tl.load(res + row * N + cols, mask=mask, other=0.0)
            xv = (xv.to(tl.float32) + rv.to(tl.float32)).to(h_out.dtype.element_ty)
            tl.store(h_out + row * N + cols, xv, mask=mask)
        h = xv.to(tl.float32)
        mean = tl.sum(h * h, axis=0) * inv_n  # torch's mean multiplies the sum by 1/N
        if CUDA:  # CUDA's rsqrtf, as torch.rsqrt
            inv = libdevice.rsqrt(mean + eps)
        else:  # Triton's interpreter has no libdevice
            inv = tl.math.rsqrt(mean + eps)
        y = (h * inv).to(out.dtype.element_ty)
        w = tl.load(weight + cols, mask=mask, other=0.0)
        tl.store(out + row * N + cols, (w.to(tl.float32) * y.to(tl.float32)).to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def rope_write_kv_kernel(
        qkv,  # [T, (HQ + 2 HKV) * D]: the fused projection's output
        cos,  # [T, D/2]
        sin,  # [T, D/2]
        page,  # [T] int64
        offset,  # [T] int64
        kv,  # [num_pages, 2, PS, HKV, D]
        q_out,  # [T, HQ, D]
        HQ,
        HKV,
        PS,
        D: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        half: tl.constexpr = D // 2
        d = tl.arange(0, D)
        src = qkv + t * (HQ + 2 * HKV) * D + h * D
        x = tl.load(src + d)
        dtype = x.dtype
        if h < HQ + HKV:
            # The reference: cat(x1*cos - x2*sin, x2*cos + x1*sin) with each product and sum rounded to the dtype.
            partner = tl.load(src + (d + half) % D)
            c = tl.load(cos + t * half + d % half).to(tl.float32)
            s = tl.load(sin + t * half + d % half).to(tl.float32)
            a = (x.to(tl.float32) * c).to(dtype).to(tl.float32)
            b = (partner.to(tl.float32) * s).to(dtype).to(tl.float32)
            rotated = (a + tl.where(d < half, -b, b)).to(dtype)
            if h < HQ:
                tl.store(q_out + (t * HQ + h) * D + d, rotated)
            else:
                p = tl.load(page + t)
                o = tl.load(offset + t)
                tl.store(kv + ((p * 2) * PS + o) * HKV * D + (h - HQ) * D + d, rotated.to(kv.dtype.element_ty))
        else:
            p = tl.load(page + t)
            o = tl.load(offset + t)
            dst = kv + ((p * 2 + 1) * PS + o) * HKV * D + (h - HQ - HKV) * D + d
            tl.store(dst, x.to(kv.dtype.element_ty))

    @triton.jit
    def silu_mul_kernel(gate_up, out, inner, BLOCK: tl.constexpr, CUDA: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inner
        g = tl.load(gate_up + t * 2 * inner + cols, mask=mask, other=0.0)
        u = tl.load(gate_up + t * 2 * inner + inner + cols, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        if CUDA:  # torch: x / (1 + exp(-x)) with CUDA's expf and an IEEE division, rounded
            silu = tl.math.div_rn(gf, 1.0 + libdevice.exp(-gf)).to(g.dtype)
        else:
            silu = tl.math.div_rn(gf, 1.0 + tl.exp(-gf)).to(g.dtype)
        tl.store(out + t * inner + cols, (silu.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)

    @triton.jit
    def move_tokens_kernel(
        kv,  # [L, P, 2, PS, H, D]
        moves,  # [M, 5] int64: tail, src_off, src_base, dst_off, dst_base
        pages,  # int64: the moves' source and destination page lists, concatenated
        cos_sin,  # [M, 2, D/2] float32: each move's key re-rotation
        NUM_PAGES,
        PS,
        H,
        D: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        mv = tl.program_id(0)
        layer = tl.program_id(1).to(tl.int64)
        kind = tl.program_id(2) // H  # 0: K, 1: V
        head = tl.program_id(2) % H
        row = moves + mv * 5
        tail = tl.load(row)
        src_off = tl.load(row + 1)
        src_base = tl.load(row + 2)
        dst_off = tl.load(row + 3)
        dst_base = tl.load(row + 4)
        half: tl.constexpr = D // 2
        d = tl.arange(0, D)
        c = tl.load(cos_sin + mv * D + d % half)
        s = tl.load(cos_sin + mv * D + half + d % half)
        plane = PS * H * D  # one (page, K or V) block of a layer
        base = kv + layer * NUM_PAGES * 2 * plane + kind * plane + head * D
        # Tokens move down (destination index < source index) in blocks, in order: a block's stores can only land
        # on sources of its own or earlier blocks, so every source is read before it is overwritten as long as a
        # block's loads all finish before its stores start (the barrier).
        for start in range(0, tail, BLOCK):
            j = start + tl.arange(0, BLOCK)
            m = j < tail
            src_page = tl.load(pages + src_base + (src_off + j) // PS, mask=m, other=0)
            src_row = src_page * 2 * plane + ((src_off + j) % PS) * H * D
            x = tl.load(base + src_row[:, None] + d[None, :], mask=m[:, None], other=0.0)
            if kind == 0:  # rerotate_tokens: x1*cos - x2*sin | x2*cos + x1*sin, in fp32, one rounding
                partner = tl.load(base + src_row[:, None] + ((d + half) % D)[None, :], mask=m[:, None], other=0.0)
                a = x.to(tl.float32) * c[None, :]
                b = partner.to(tl.float32) * s[None, :]
                x = tl.where(d[None, :] < half, a - b, a + b).to(x.dtype)
            dst_page = tl.load(pages + dst_base + (dst_off + j) // PS, mask=m, other=0)
            dst_row = dst_page * 2 * plane + ((dst_off + j) % PS) * H * D
            tl.debug_barrier()
            tl.store(base + dst_row[:, None] + d[None, :], x, mask=m[:, None])

    return rms_norm_kernel, rope_write_kv_kernel, silu_mul_kernel, move_tokens_kernel


@contextlib.contextmanager
def fused_passes() -> Iterator[None]:
    """LLM forwards inside use the fused kernels where :func:`active` (CUDA-graph warm-ups and captures)."""
    token = _PASSES.set(True)
    try:
        yield
    finally:
        _PASSES.reset(token)


def active(x: Tensor) -> bool:
    """Whether the LLM's layers should use the fused kernels for activations like ``x`` right now."""
    return _PASSES.get() and _switch.on and triton_runs_on(x)


def disable(reason: str) -> None:
    """Stop using the kernels in this process; the reference ops serve from now on."""
    _switch.disable(reason)


def ready(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Compile and run each kernel once on a small input on ``device``; on failure :func:`disable` them. Returns
    whether they are usable."""
    if not _switch.on:
        return False
    if not triton_importable():
        disable("triton is not installed")
        return False
    if dtype not in TRITON_DTYPES:
        return False
    try:
        x = torch.randn(2, 64, device=device, dtype=dtype)
        rms_norm(x, torch.ones(64, device=device, dtype=dtype), 1e-5, residual=x)
        qkv = torch.randn(2, 4 * 16, device=device, dtype=dtype)
        cos_sin = torch.ones(2, 8, device=device, dtype=dtype)
        kv = torch.zeros(1, 2, 4, 1, 16, device=device, dtype=dtype)
        slots = torch.zeros(2, dtype=torch.long, device=device)
        rope_write_kv(qkv, cos_sin, cos_sin, slots, slots + 1, kv, 2, 1)
        silu_mul(torch.randn(2, 128, device=device, dtype=dtype))
    except Exception as e:
        disable(f"{type(e).__name__}: {e}")
        return False
    return True


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """``RMSNorm(x)`` as :class:`~model.llm.RMSNorm` computes it, for ``x [T, N]`` and a ``weight [N]`` of
    x's dtype. With ``residual``: ``h = x + residual`` (rounded as the reference's add), returns ``(norm(h), h)``."""
    rows, n = x.shape
    if weight.shape != (n,) or weight.dtype != x.dtype:
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype} does not fit rows of {n} {x.dtype}")
    x = x.contiguous()
    out = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else out
    res = residual.contiguous() if residual is not None else x
    block = max(16, 1 << (n - 1).bit_length())
    _kernels()[0][(rows,)](
        x,
        res,
        h,
        weight,
        out,
        n,
        eps,
        1.0 / n,
        BLOCK=block,
        HAS_RES=residual is not None,
        CUDA=x.is_cuda,
        enable_fp_fusion=False,
        num_warps=min(16, max(1, block // 256)),
    )
    return (out, h) if residual is not None else out


def rope_write_kv(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    page: Tensor,
    offset: Tensor,
    kv_layer: Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> Tensor:
    """From the fused projection ``qkv [T, (Hq + 2 Hkv) * D]``: rotate q and k with ``cos``/``sin [T, D/2]`` (as
    :func:`~infinisst_backend.model.rope.apply_rotary`), store k and v at slots ``(page, offset)`` of ``kv_layer
    [num_pages, 2, page_size, Hkv, D]`` in its dtype (as :func:`~infinisst_backend.kernels.attention.write_kv`), return
    q ``[T, Hq, D]``."""
    tokens = qkv.shape[0]
    dim = kv_layer.shape[-1]
    if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * dim or kv_layer.shape[3] != num_kv_heads:
        raise ValueError(f"qkv {tuple(qkv.shape)} does not fit {num_heads}/{num_kv_heads} heads of {dim}")
    if cos.shape != (tokens, dim // 2) or sin.shape != cos.shape or dim & (dim - 1):
        raise ValueError(f"rotary tables {tuple(cos.shape)} do not fit {tokens} tokens of head dim {dim}")
    if not kv_layer.is_contiguous():
        raise ValueError("kv_layer must be contiguous")
    q = torch.empty(tokens, num_heads, dim, dtype=qkv.dtype, device=qkv.device)
    if tokens:
        _kernels()[1][(tokens, num_heads + 2 * num_kv_heads)](
            qkv.contiguous(),
            cos.contiguous(),
            sin.contiguous(),
            page.contiguous(),
            offset.contiguous(),
            kv_layer,
            q,
            num_heads,
            num_kv_heads,
            kv_layer.shape[2],
            D=dim,
            enable_fp_fusion=False,
            num_warps=1,
        )
    return q


def silu_mul(gate_up: Tensor, block: int = 1024) -> Tensor:
    """``silu(gate) * up`` of ``gate_up [T, 2I]`` (gate first), as :class:`~model.llm.MLP` computes it."""
    tokens, width = gate_up.shape
    inner = width // 2
    out = torch.empty(tokens, inner, dtype=gate_up.dtype, device=gate_up.device)
    if tokens:
        _kernels()[2][(tokens, -(-inner // block))](
            gate_up.contiguous(), out, inner, BLOCK=block, CUDA=gate_up.is_cuda, enable_fp_fusion=False, num_warps=4
        )
    return out


def move_tokens_usable(data: Tensor) -> bool:
    """Whether :func:`move_tokens` handles a KV cache like ``data``."""
    return _switch.on and triton_runs_on(data) and pow2_dim(data.shape[-1]) and data.is_contiguous()


def move_tokens_ready(data: Tensor) -> bool:
    """Whether :func:`move_tokens` serves the KV cache ``data``: compiles it for this cache's shapes now (not at the
    first eviction, where the compile stalls every stream for about a second) by moving token 0 of page 0 onto itself
    with the identity rotation, which leaves the cache as it was. On failure :func:`disable` the kernels."""
    if not move_tokens_usable(data) or not triton_importable():
        return False
    half = data.shape[-1] // 2
    identity = torch.stack((torch.ones(half), torch.zeros(half)))[None].to(data.device)
    try:
        move_tokens(data, [(1, 0, [0], 0, [0])], identity)
    except Exception as e:
        disable(f"{type(e).__name__}: {e}")
        return False
    return True


def move_tokens(
    data: Tensor, moves: list[tuple[int, int, list[int], int, list[int]]], cos_sin: Tensor, block: int = 32
) -> None:
    """The data side of a batched eviction in one kernel, in place: for each move ``(tail, src_off, src_pages,
    dst_off, dst_pages)``, its ``tail`` tokens move down from ``src_pages`` (the first at offset ``src_off`` of the
    first page) to ``dst_pages`` in every layer of ``data [L, P, 2, page_size, H, D]``, their keys re-rotated by the
    move's row of ``cos_sin [M, 2, D/2]`` (float32) as :func:`~model.rope.rerotate_tokens` does, values
    copied. Each destination token must precede its source in the sequence, and no page may be written by one move and
    read by another (no copy-on-write pages in the batch).
    """
    num_layers, num_pages, _, page_size, heads, dim = data.shape
    if cos_sin.shape != (len(moves), 2, dim // 2) or cos_sin.dtype != torch.float32:
        raise ValueError(f"cos_sin {tuple(cos_sin.shape)} {cos_sin.dtype} does not fit {len(moves)} moves")
    if not moves:
        return
    table, page_ids = [], []
    for tail, src_off, src_pages, dst_off, dst_pages in moves:
        table += [tail, src_off, len(page_ids)]
        page_ids += src_pages
        table += [dst_off, len(page_ids)]
        page_ids += dst_pages
    table += [0] * (len(table) % 2)  # the page list starts 16-byte aligned whatever the number of moves (one compile)
    host = torch.tensor(table + page_ids, dtype=torch.long)
    buf = host.pin_memory().to(data.device, non_blocking=True) if data.is_cuda else host
    _kernels()[3][(len(moves), num_layers, 2 * heads)](
        data,
        buf[: len(table)],
        buf[len(table) :],
        cos_sin.to(data.device).contiguous(),
        num_pages,
        page_size,
        heads,
        D=dim,
        BLOCK=block,
        enable_fp_fusion=False,
        num_warps=4,
    )
