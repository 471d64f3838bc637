"""The safetensors file format: its dtype codes, and a writer that streams one tensor at a time."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from infinisst_backend.model.checkpoint import WEIGHTS_FILE

# The file's dtype codes (its header's "dtype") of the torch dtypes, and back.
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class TensorSpec(Protocol):
    """What the writer needs of a planned tensor (:class:`.plan.PlannedTensor`)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def write_safetensors(path: Path, plan: Sequence[TensorSpec], produce: Callable[[int], Tensor], progress: bool) -> None:
    """Write a safetensors file whose i-th tensor is ``produce(i)``, holding one tensor in memory at a time.

    The header comes first, computed from the plan's names, shapes and dtypes (file order = plan order).
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; writing them on a big-endian host is not supported")
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for item in plan:
        nbytes = item.dtype.itemsize * math.prod(item.shape)
        header[item.name] = {
            "dtype": SAFETENSORS_DTYPES[item.dtype],
            "shape": list(item.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned
    with (
        open(path, "wb") as f,
        tqdm(total=offset, unit="B", unit_scale=True, desc=WEIGHTS_FILE, disable=not progress) as bar,
    ):
        f.write(len(blob).to_bytes(8, "little") + blob)
        for i, item in enumerate(plan):
            tensor = produce(i)
            if tuple(tensor.shape) != item.shape or tensor.dtype != item.dtype:  # a bug, not a user error
                raise RuntimeError(
                    f"{item.name}: made {tensor.dtype}{list(tensor.shape)}, planned {item.dtype}{list(item.shape)}"
                )
            f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            bar.update(tensor.numel() * item.dtype.itemsize)
