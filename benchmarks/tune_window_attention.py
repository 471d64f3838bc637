"""Times ``window_kernel.window_attention`` on one encoder layer of 32 steady-state streams (paper dimensions: 48
queries, a 576-frame window, 16 heads of 64) over key-block sizes, warps and pipeline stages, against the window
kernel + the reference ops and against the window kernel + torch's SDPA (GPU):

    python -m benchmarks.tune_window_attention

``rel`` is each configuration's relative distance from the first one's output (the additions' order differs).
"""

from __future__ import annotations

import itertools
import time
from functools import partial

import torch

from infinisst_backend.kernels import window_kernel
from infinisst_backend.model.speech_encoder import InterleavedRotary

S, T, C, H, D = 32, 48, 576, 16, 64


def time_us(fn, n: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    torch.manual_seed(0)
    dt = torch.bfloat16
    rot = InterleavedRotary(D, 10000.0).cuda().to(dt)
    pool_k, pool_v = (torch.randn(S * C, H, D, device="cuda", dtype=dt) for _ in range(2))
    rows = torch.stack([torch.randperm(S * C, device="cuda")[:C] for _ in range(S)])
    q, nk, nv = (torch.randn(S, T, H, D, device="cuda", dtype=dt) * 0.3 for _ in range(3))
    bias = torch.zeros(T, C + T, device="cuda", dtype=dt)
    qt, kt = rot.tables(C, T, q), rot.tables(0, C + T, nk)
    attention = partial(window_kernel.window_attention, q, pool_k, pool_v, rows, nk, nv, qt, kt, bias, True)
    ref = None
    for bn, nw, ns in itertools.product([32, 64, 128], [2, 4, 8], [1, 2, 3]):
        fn = partial(attention, block_n=bn, num_warps=nw, num_stages=ns)
        out = fn()
        ref = out if ref is None else ref
        print(f"block_n {bn} warps {nw} stages {ns}: {time_us(fn):.0f} us/layer, rel {rel(out, ref):.1e}", flush=True)

    def keys_values():
        k, v = window_kernel.window_keys_values(pool_k, pool_v, rows, nk, nv, *kt, True)
        return rot(q.transpose(1, 2), C), k, v

    def kv_path():
        qq, k, v = keys_values()
        scores = qq @ k.transpose(-1, -2) + bias
        return (torch.softmax(scores.float(), -1).to(dt) @ v).transpose(1, 2)

    def sdpa():
        qq, k, v = keys_values()
        mask = bias.expand(S, 1, T, C + T)
        return torch.nn.functional.scaled_dot_product_attention(qq, k, v, attn_mask=mask, scale=1.0).transpose(1, 2)

    print(f"window kernel + reference ops: {time_us(kv_path):.0f} us/layer, rel {rel(kv_path(), ref):.1e}")
    print(f"window kernel + SDPA: {time_us(sdpa):.0f} us/layer")


if __name__ == "__main__":
    main()
