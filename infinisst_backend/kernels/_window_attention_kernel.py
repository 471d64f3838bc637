"""The Triton kernel of :func:`kernels.window_kernel.window_attention` (imported on first use: it imports
Triton, which the package does not need on CPU)."""

import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice


@triton.jit
def rotate(x, c, sn, ROUND: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The reference RoPE of a tile x [N, D] with tables [N, D/2]: pairs (a, b) -> (a*cos - b*sin, b*cos + a*sin),
    pairs (2i, 2i+1) if INTERLEAVED else (i, i + D/2); products rounded to x's dtype if ROUND (tables in it)."""
    n: tl.constexpr = x.shape[0]
    d: tl.constexpr = x.shape[1]
    if INTERLEAVED:
        a, b = tl.split(tl.reshape(x, [n, d // 2, 2]))
    else:
        a, b = tl.split(tl.permute(tl.reshape(x, [n, 2, d // 2]), [0, 2, 1]))
    a = a.to(tl.float32)
    b = b.to(tl.float32)
    c = c.to(tl.float32)
    sn = sn.to(tl.float32)
    ac, bs, bc, as_ = a * c, b * sn, b * c, a * sn
    if ROUND:
        ac = ac.to(x.dtype).to(tl.float32)
        bs = bs.to(x.dtype).to(tl.float32)
        bc = bc.to(x.dtype).to(tl.float32)
        as_ = as_.to(x.dtype).to(tl.float32)
    pairs = tl.join((ac - bs).to(x.dtype), (bc + as_).to(x.dtype))  # [n, d/2, 2]
    if INTERLEAVED:
        return tl.reshape(pairs, [n, d])
    return tl.reshape(tl.permute(pairs, [0, 2, 1]), [n, d])


@triton.jit
def rotate_rows(x, cos, sin, table, mask, ROUND: tl.constexpr, INTERLEAVED: tl.constexpr):
    """:func:`rotate` with the tile's rows of the tables (offsets ``table``) loaded under ``mask``."""
    c = tl.load(cos + table, mask=mask, other=0.0)
    sn = tl.load(sin + table, mask=mask, other=0.0)
    return rotate(x, c, sn, ROUND, INTERLEAVED)


@triton.jit
def window_rows(pool, new, old, fresh_rows, cached, fresh, d):
    """Rows of K or V for a tile of window positions: the pool's ring rows where cached, the chunk's where fresh."""
    x = tl.load(pool + old + d[None, :], mask=cached[:, None], other=0.0)
    return tl.where(fresh[:, None], tl.load(new + fresh_rows + d[None, :], mask=fresh[:, None], other=0.0), x)


@triton.jit
def window_attention_kernel(
    q,  # [S, T, H, D]: the chunk's queries, scaled, un-rotated
    pool_k,  # [R, H*D]: one layer's cached keys, un-rotated
    pool_v,  # [R, H*D]
    rows,  # [S, C] int64: ring rows of the cached frames, oldest first
    new_k,  # [S, T, H*D]: the chunk's keys, un-rotated
    new_v,  # [S, T, H*D]
    cos_q,  # [S or 1, T, D/2]
    sin_q,
    cos_k,  # [S or 1, C+T, D/2]
    sin_k,
    bias,  # [S or 1, T, C+T]
    out,  # [S, T, H, D]
    C,
    T,
    q_table_stride,
    k_table_stride,
    bias_stride,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    ROUND_Q: tl.constexpr,
    ROUND_K: tl.constexpr,
    FP32: tl.constexpr,
    CUDA: tl.constexpr,
):
    block, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    L = C + T
    i = block * BLOCK_M + tl.arange(0, BLOCK_M)  # query index in the chunk
    d = tl.arange(0, D)
    half = tl.arange(0, D // 2)
    m_q = (i < T)[:, None]
    q_rows = (((s * T + i) * H + h) * D)[:, None]
    x = tl.load(q + q_rows + d[None, :], mask=m_q, other=0.0)
    table = s * q_table_stride + i[:, None] * (D // 2) + half[None, :]
    qr = rotate_rows(x, cos_q, sin_q, table, m_q, ROUND_Q, INTERLEAVED)

    # One pass over the window's keys (flash attention): running max, running sum, running weighted values.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in range(0, L, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        cached = t < C
        fresh = (t >= C) & (t < L)
        row = tl.load(rows + s * C + t, mask=cached, other=0)
        old = (row * (H * D) + h * D)[:, None]
        new = ((s * T + (t - C)) * (H * D) + h * D)[:, None]
        k = window_rows(pool_k, new_k, old, new, cached, fresh, d)
        v = window_rows(pool_v, new_v, old, new, cached, fresh, d)
        ktab = s * k_table_stride + t[:, None] * (D // 2) + half[None, :]
        kr = rotate_rows(k, cos_k, sin_k, ktab, (t < L)[:, None], ROUND_K, INTERLEAVED)
        # The reference's scores: q @ k^T rounded to the model dtype, plus the bias; -inf past the window.
        if FP32:
            sc = tl.dot(qr, tl.trans(kr), input_precision="ieee")
        else:
            sc = tl.dot(qr, tl.trans(kr)).to(qr.dtype).to(tl.float32)
        inside = m_q & (t < L)[None, :]
        b = tl.load(bias + s * bias_stride + i[:, None] * L + t[None, :], mask=inside, other=0.0).to(tl.float32)
        sc = tl.where((t < L)[None, :], sc + b, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: keep exp() finite
        if CUDA:  # CUDA's expf, as torch's softmax
            alpha = libdevice.exp(m_i - m_safe)
            p = libdevice.exp(sc - m_safe[:, None])
        else:
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padding rows only
    tl.store(out + q_rows + d[None, :], tl.math.div_rn(acc, l_i[:, None]).to(out.dtype.element_ty), mask=m_q)
