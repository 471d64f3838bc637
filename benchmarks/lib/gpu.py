"""The device under measurement: facts for the reports, synchronization, and timing a call."""

from __future__ import annotations

import contextlib
import platform
import time

import numpy as np
import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def total_memory(device: str) -> int:
    """Device memory in bytes (a nominal 16 GiB for the CPU smoke run)."""
    return torch.cuda.get_device_properties(0).total_memory if device.startswith("cuda") else 16 << 30


def gpu_info(device: str) -> dict:
    """The GPU (or the CPU of a smoke run) and the versions of torch, CUDA, Python, FlashInfer and transformers."""
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info = {"gpu": torch.cuda.get_device_name(0), "multiprocessors": props.multi_processor_count}
    else:
        info = {"gpu": f"none (CPU smoke run on {platform.machine()})"}
    info["gpu_memory_bytes"] = total_memory(device)
    info.update(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version())
    for name in ("flashinfer", "transformers"):
        with contextlib.suppress(Exception):
            info[name] = __import__(name).__version__
    return info


def median_time(fn, repeats: int, device: str, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeats`` synchronized calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times))
