"""Error of one attention call against float64, per sequence: FlashInfer vs the torch path (GPU).

Paged batches of prefill and decode sequences (context lengths across page boundaries and up to 1,040 tokens) with
random bf16 q/k/v at a head shape (default SmolLM2's: 9 query / 3 KV heads, head_dim 64). For each sequence it prints
the relative L2 error of the torch path (float32 softmax, bf16 output) and of FlashInfer against float64 on the same
bf16 inputs, and FlashInfer against the torch path. A sequence whose FlashInfer error stands out from the others
would point at an indexing or masking error; a uniform excess is FlashInfer's arithmetic.

    python -m benchmarks.attention_error [--heads 9,3,64] [--sharp 1,4]
"""

from __future__ import annotations

import argparse

import torch

from infinisst_backend.config import EngineConfig
from infinisst_backend.kernels.attention import AttentionBatch, TorchAttention
from infinisst_backend.model.kv_cache import PagedKVCache

PAGE = 16
BATCHES = {
    "prefill": ([22, 1, 40, 7, 16, 22], [0, 300, 1000, 15, 33, 977]),
    "decode": ([1] * 8, [0, 1, 15, 16, 17, 517, 999, 1040]),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def errors(qo_lens, ctx_lens, heads: int, kv_heads: int, dim: int, sharp: float, seed: int = 0):
    from infinisst_backend.kernels.flashinfer_attention import FlashInferAttention

    gen = torch.Generator().manual_seed(seed)
    num_pages = 512
    order = torch.randperm(num_pages, generator=gen).tolist()
    tables, kv_lens = [], []
    for q, c in zip(qo_lens, ctx_lens):
        n = -(-(q + c) // PAGE)
        tables.append(order[:n])
        order = order[n:]
        kv_lens.append(q + c)
    batch = AttentionBatch.build(qo_lens, tables, kv_lens, PAGE, device="cuda")
    cache = PagedKVCache(1, num_pages, PAGE, kv_heads, dim, torch.bfloat16, "cuda")
    cache.data.normal_()
    tokens = batch.num_tokens
    q = (sharp * torch.randn(tokens, heads, dim, device="cuda")).bfloat16()
    k, v = (torch.randn(tokens, kv_heads, dim, device="cuda").bfloat16() for _ in range(2))
    cfg = EngineConfig(device="cuda", dtype="bfloat16", attention_backend="flashinfer", page_size=PAGE)
    outs = {}
    for name, attn, dtype in (
        ("torch", TorchAttention(), torch.bfloat16),
        ("flashinfer", FlashInferAttention(cfg), torch.bfloat16),
        ("float64", TorchAttention(), torch.float64),
    ):
        attn.plan(batch)
        outs[name] = attn.forward(0, q.to(dtype), k.to(dtype), v.to(dtype), cache.kv_layers[0].to(dtype).clone())
    rows = []
    for b in range(len(qo_lens)):
        s, e = batch.qo_indptr[b], batch.qo_indptr[b + 1]
        t, f, x = (outs[n][s:e] for n in ("torch", "flashinfer", "float64"))
        rows.append((ctx_lens[b], qo_lens[b], rel(t, x), rel(f, x), rel(f, t)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", default="9,3,64", help="query heads, KV heads, head dim")
    p.add_argument("--sharp", default="1,4", help="scales of q (sharper attention)")
    args = p.parse_args()
    heads, kv_heads, dim = (int(x) for x in args.heads.split(","))
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}; heads {heads}/{kv_heads}, head_dim {dim}")
    for sharp in (float(x) for x in args.sharp.split(",")):
        for kind, (qo_lens, ctx_lens) in BATCHES.items():
            print(f"{kind}, q x{sharp:g}: relative error against float64 (torch, FlashInfer) and FlashInfer vs torch")
            for ctx, q_len, t, f, ft in errors(qo_lens, ctx_lens, heads, kv_heads, dim, sharp):
                print(f"  context {ctx:5d}, {q_len:3d} queries: {t:.2e}  {f:.2e}  {ft:.2e}")


if __name__ == "__main__":
    main()
