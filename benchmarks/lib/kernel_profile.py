"""The CUDA kernels of a step, by name and by kind (GEMM, attention, elementwise, ...), from torch.profiler
(``profile_llm``, ``profile_encoder``)."""

from __future__ import annotations

import re
from collections import defaultdict

import torch

KINDS = [  # (kind, pattern over the kernel name), first match wins
    ("attention", r"flashinfer|BatchDecode|BatchPrefill|Attention|fmha|flash"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|sm90_|splitK|Kernel2"),
    ("reduce", r"reduce|norm|mean"),
    ("copy/cat/index", r"copy|cat|index|gather|scatter|Cat"),
    ("elementwise", r"elementwise|vectorized|unrolled"),
]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def kernel_profile(fn, steps: int) -> dict:
    """CUDA kernels of ``steps`` calls of ``fn``, in microseconds per call: by name and by kind."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type != DeviceType.CUDA:
            continue
        entry = by_name[event.name]
        entry[0] += event.time_range.elapsed_us() / steps
        entry[1] += 1 / steps
    by_kind: dict[str, float] = defaultdict(float)
    for name, (us, _) in by_name.items():
        by_kind[kind_of(name)] += us
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    return {
        "total_us": sum(us for us, _ in by_name.values()),
        "kernels_per_step": sum(n for _, n in by_name.values()),
        "by_kind_us": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "top": [{"name": n[:110], "us": us, "calls": c, "kind": kind_of(n)} for n, (us, c) in top[:25]],
    }


def print_profile(title: str, prof: dict) -> None:
    print(f"--- {title}: {prof['total_us'] / 1e3:.2f} ms of kernels, {prof['kernels_per_step']:.0f} kernels per step")
    print("    by kind: " + ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in prof["by_kind_us"].items()))
    for row in prof["top"]:
        print(f"    {row['us']:9.1f} us {row['calls']:6.0f}x  [{row['kind']}] {row['name']}")
