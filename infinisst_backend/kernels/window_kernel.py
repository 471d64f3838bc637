"""GPU kernels (Triton) for a speech-encoder layer's chunk attention over the ring cache.

Two of them. :func:`window_attention` (served by default in the encoder's CUDA graphs) does the whole attention in
one kernel: RoPE on queries and keys, scores, softmax and the weighted sum, without storing the window's keys or the
scores (``speech_encoder.WINDOW_ATTENTION``; its arithmetic is described there and below). :func:`window_keys_values`,
described next, only builds the keys and values, bit for bit, for the reference ops to use.

The reference path of :class:`~infinisst_backend.model.speech_encoder.SelfAttention` makes a layer's keys and values in
about eight passes over the window, several of them in fp32: gather the cached frames from the pool, transpose,
concatenate the chunk's frames, then RoPE on every key (pair swap, negation, two products, a sum, a cast). At serving
batch sizes that data movement, not the matmuls, is what the encoder spends its time on
(``docs/benchmarks/profile_encoder.txt``). :func:`window_keys_values` does all of it in one pass: each program reads
a tile of frames (from the pool rows, or from the chunk's new keys for the last T frames), rotates the keys and
writes K and V in the matmul's layout [S, H, C+T, D].

The result is bit for bit the reference's: the kernel takes the rotary's cos/sin tables as the reference computes
them (:meth:`~infinisst_backend.model.speech_encoder.InterleavedRotary.tables`), applies the same products in the same
dtypes (fp32 products, or products rounded to the model dtype when the tables are in it) and adds them without a
fused multiply-add (``enable_fp_fusion=False``), as the reference's separate kernels do.

The encoder uses it only in the passes that CUDA graphs capture (``speech_encoder.window_kernel_passes``): a launch
from Python costs more host time than the kernel saves on the GPU, so eager passes keep the separate ops. If Triton
cannot build or launch it, :func:`disable` turns it off for the process.

Triton is imported on first use: the package runs on CPU without it, and :func:`usable` says False there. Under
Triton's CPU interpreter (``TRITON_INTERPRET=1``, before the first call) the kernel runs on CPU tensors: the tests
check it that way without a GPU.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from infinisst_backend.kernels.availability import KernelSwitch, pow2_dim, triton_importable, triton_runs_on

logger = logging.getLogger(__name__)

_switch = KernelSwitch("speech encoder window kernel", logger)  # off once the kernel failed here (see disable)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def window_kv(
        pool_k,  # [R, H*D]: one layer's cached keys, un-rotated
        pool_v,  # [R, H*D]
        rows,  # [S, C] int64: ring rows of the cached frames, oldest first
        new_k,  # [S, T, H*D]: the chunk's keys, un-rotated
        new_v,  # [S, T, H*D]
        cos,  # [S or 1, L, D/2]
        sin,  # [S or 1, L, D/2]
        out_k,  # [S, H, L, D]: rotated
        out_v,  # [S, H, L, D]
        C,
        T,
        table_stride,  # cos/sin elements per stream (0: one table for all)
        H: tl.constexpr,
        D: tl.constexpr,
        BLOCK: tl.constexpr,
        INTERLEAVED: tl.constexpr,  # pairs (2i, 2i+1), else (i, i + D/2)
        ROUND_PRODUCTS: tl.constexpr,  # tables in the model dtype: each product rounded to it, as the reference
    ):
        block, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        length = C + T
        t = block * BLOCK + tl.arange(0, BLOCK)  # key index in the window, [BLOCK]
        d = tl.arange(0, D)
        if INTERLEAVED:
            partner = d ^ 1
            sign = tl.where(d % 2 == 0, -1.0, 1.0)
            angle = d // 2
        else:
            partner = (d + D // 2) % D
            sign = tl.where(d < D // 2, -1.0, 1.0)
            angle = d % (D // 2)
        cached = t < C
        fresh = (t >= C) & (t < length)
        row = tl.load(rows + s.to(tl.int64) * C + t, mask=cached, other=0)
        old = row[:, None] * (H * D) + h * D  # [BLOCK, 1]
        new = (s.to(tl.int64) * T + (t - C))[:, None] * (H * D) + h * D
        m_old, m_new = cached[:, None], fresh[:, None]

        k = tl.load(pool_k + old + d[None, :], mask=m_old, other=0.0)
        k = tl.where(m_new, tl.load(new_k + new + d[None, :], mask=m_new, other=0.0), k)
        kp = tl.load(pool_k + old + partner[None, :], mask=m_old, other=0.0)
        kp = tl.where(m_new, tl.load(new_k + new + partner[None, :], mask=m_new, other=0.0), kp)
        v = tl.load(pool_v + old + d[None, :], mask=m_old, other=0.0)
        v = tl.where(m_new, tl.load(new_v + new + d[None, :], mask=m_new, other=0.0), v)

        in_window = (t < length)[:, None]
        table = s.to(tl.int64) * table_stride + t[:, None] * (D // 2) + angle[None, :]
        c = tl.load(cos + table, mask=in_window, other=0.0)
        sn = tl.load(sin + table, mask=in_window, other=0.0)
        turned = kp.to(tl.float32) * sign[None, :]  # exact: a negation or nothing
        a = k.to(tl.float32) * c.to(tl.float32)
        b = turned * sn.to(tl.float32)
        if ROUND_PRODUCTS:
            a = a.to(out_k.dtype.element_ty).to(tl.float32)
            b = b.to(out_k.dtype.element_ty).to(tl.float32)
        rotated = (a + b).to(out_k.dtype.element_ty)

        out = (s.to(tl.int64) * H + h) * length * D + t[:, None] * D + d[None, :]
        tl.store(out_k + out, rotated, mask=in_window)
        tl.store(out_v + out, v, mask=in_window)

    return window_kv


@functools.cache
def _attention_kernel():
    from infinisst_backend.kernels._window_attention_kernel import window_attention_kernel  # imports triton

    return window_attention_kernel


def usable(x: Tensor, head_dim: int) -> bool:
    """Whether :func:`window_keys_values` runs for tensors like ``x``: a CUDA tensor (any tensor under Triton's
    interpreter) of a supported dtype, a power-of-two head dim, and Triton importable."""
    return _switch.on and triton_runs_on(x) and pow2_dim(head_dim) and triton_importable()


def disable(reason: str) -> None:
    """Stop using the kernel in this process (e.g. Triton could not compile it here: no writable cache folder, no
    compiler); :func:`usable` says False from now on, and callers keep their reference path."""
    _switch.disable(reason)


def window_keys_values(
    pool_k: Tensor,
    pool_v: Tensor,
    rows: Tensor,
    new_k: Tensor,
    new_v: Tensor,
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
    block: int = 16,
    num_warps: int = 2,
) -> tuple[Tensor, Tensor]:
    """A layer's rotated keys and values over the cached window and the chunk.

    ``pool_k``/``pool_v`` [R, H, D]: the layer's un-rotated cache (the pool's K and V of that layer); ``rows`` [S, C]
    the ring rows of each stream's cached frames in order; ``new_k``/``new_v`` [S, T, H, D] (contiguous) the chunk's
    un-rotated keys and values; ``cos``/``sin`` [L, D/2] (one table for all streams) or [S, ..., L, D/2] (L = C + T)
    the rotary tables of the key positions.

    Returns (k, v), each [S, H, L, D] contiguous in the chunk's dtype: k = RoPE(cat(cached, new)), v = cat(cached,
    new), as :class:`~infinisst_backend.model.speech_encoder.SelfAttention`'s reference path computes them.
    """
    batch, length, heads, dim = new_k.shape
    cached = rows.shape[1]
    total = cached + length
    if cos.shape[-2:] != (total, dim // 2) or sin.shape != cos.shape or cos[..., 0, 0].numel() not in (1, batch):
        raise ValueError(f"rotary tables {tuple(cos.shape)} do not fit {total} keys of head dim {dim}")
    if rows.shape[0] != batch or pool_k.shape[1:] != (heads, dim) or pool_v.shape != pool_k.shape:
        raise ValueError("pool, rows and chunk shapes do not match")
    new_k, new_v = new_k.contiguous(), new_v.contiguous()
    cos, sin = (t.reshape(-1, total, dim // 2).contiguous() for t in (cos, sin))
    stride = 0 if cos.shape[0] == 1 else total * (dim // 2)
    rows = rows.contiguous()
    k = torch.empty(batch, heads, total, dim, dtype=new_k.dtype, device=new_k.device)
    v = torch.empty_like(k)
    grid = (-(-total // block), heads, batch)
    _kernel()[grid](
        pool_k,
        pool_v,
        rows,
        new_k,
        new_v,
        cos,
        sin,
        k,
        v,
        cached,
        length,
        stride,
        H=heads,
        D=dim,
        BLOCK=block,
        INTERLEAVED=interleaved,
        ROUND_PRODUCTS=cos.dtype == new_k.dtype,
        enable_fp_fusion=False,
        num_warps=num_warps,
    )
    return k, v


def attention_usable(q: Tensor, head_dim: int) -> bool:
    """Whether :func:`window_attention` runs for queries like ``q``: :func:`usable`, and a head dim of at least 16 (the
    smallest matrix tile)."""
    return usable(q, head_dim) and head_dim >= 16


def window_attention(
    q: Tensor,
    pool_k: Tensor,
    pool_v: Tensor,
    rows: Tensor,
    new_k: Tensor,
    new_v: Tensor,
    q_tables: tuple[Tensor, Tensor],
    k_tables: tuple[Tensor, Tensor],
    bias: Tensor,
    interleaved: bool,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> Tensor:
    """A speech-encoder layer's chunk attention over the cached window, in one kernel: RoPE on the queries and on every
    key (cached keys read from the pool's ring rows, as :func:`window_keys_values` does), scores, softmax and the
    weighted sum of the values, without materializing the window's keys or the scores.

    ``q`` [S, T, H, D]: the chunk's scaled, un-rotated queries; ``pool_k``/``pool_v`` [R, H, D], ``rows`` [S, C]
    (C may be 0), ``new_k``/``new_v`` [S, T, H, D] as for :func:`window_keys_values`; ``q_tables``/``k_tables``: the
    rotary (cos, sin) of the query positions [.., T, D/2] and key positions [.., C+T, D/2], one for all streams or
    one per stream; ``bias`` [T, C+T] or [S, 1, T, C+T]: the additive mask.

    Returns the attention output [S, T, H, D] in q's dtype. Keys are rotated and scores rounded to the model dtype as
    the reference does; the softmax is the one-pass (flash) form in fp32 with CUDA's ``expf``: the weights are
    rounded to the model dtype before normalization, and the sum divides the fp32 accumulator at the end (an IEEE
    division), where the reference rounds normalized probabilities. The difference is within the model dtype's
    rounding (measured on the GPU in ``tests/test_gpu.py``).
    """
    batch, length, heads, dim = q.shape
    cached = rows.shape[1]
    total = cached + length
    if new_k.shape != q.shape or new_v.shape != q.shape or rows.shape[0] != batch:
        raise ValueError("query, chunk and rows shapes do not match")
    if cached and (pool_k.shape[1:] != (heads, dim) or pool_v.shape != pool_k.shape):
        raise ValueError("pool shapes do not match the queries")
    tables = []
    for (cos, sin), n in ((q_tables, length), (k_tables, total)):
        if cos.shape[-2:] != (n, dim // 2) or sin.shape != cos.shape or cos[..., 0, 0].numel() not in (1, batch):
            raise ValueError(f"rotary tables {tuple(cos.shape)} do not fit {n} positions of head dim {dim}")
        cos, sin = (t.reshape(-1, n, dim // 2).contiguous() for t in (cos, sin))
        tables.append((cos, sin, 0 if cos.shape[0] == 1 else n * (dim // 2)))
    bias = bias.reshape(-1, length, total).contiguous()
    if bias.shape[0] not in (1, batch):
        raise ValueError(f"bias {tuple(bias.shape)} does not fit {batch} streams")
    (cos_q, sin_q, q_stride), (cos_k, sin_k, k_stride) = tables
    out = torch.empty_like(q)
    block_m = max(16, min(64, 1 << (length - 1).bit_length()))
    grid = (-(-length // block_m), heads, batch)
    _attention_kernel()[grid](
        q.contiguous(),
        pool_k if cached else new_k,
        pool_v if cached else new_v,
        rows.contiguous() if cached else torch.zeros(1, dtype=torch.long, device=q.device),
        new_k.contiguous(),
        new_v.contiguous(),
        cos_q,
        sin_q,
        cos_k,
        sin_k,
        bias,
        out,
        cached,
        length,
        q_stride,
        k_stride,
        0 if bias.shape[0] == 1 else length * total,
        H=heads,
        D=dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        INTERLEAVED=interleaved,
        ROUND_Q=cos_q.dtype == q.dtype,
        ROUND_K=cos_k.dtype == new_k.dtype,
        FP32=q.dtype == torch.float32,
        CUDA=q.is_cuda,
        enable_fp_fusion=False,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
