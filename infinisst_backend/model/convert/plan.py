"""Planning: which tensor of which source becomes which output tensor, and how it is made (vocabulary rows
resized, LoRA merged, cast)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from infinisst_backend.model.convert.keys import VOCAB_KEYS, listing
from infinisst_backend.model.convert.sources import LoRA, TensorSource


@dataclass(slots=True)
class PlannedTensor:
    """One output tensor: its name, shape and dtype in the file, and the source it is read from."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: TensorSource


def plan_weights(
    expected: dict[str, tuple[int, ...]], sources: list[TensorSource], lora: LoRA, dtype: torch.dtype
) -> tuple[list[PlannedTensor], list[str]]:
    """Pick each expected tensor from the first source that has it; return (plan, problems).

    Floating tensors are stored in ``dtype``, others as they are.
    Vocabulary matrices may differ in rows when taken from the base LLM (resized like transformers'
    ``resize_token_embeddings``); InfiniSST's own files must match exactly. LoRA pairs must fit their target.
    """
    plan, problems, missing = [], [], []
    for name, shape in expected.items():
        source = next((s for s in sources if name in s.entries), None)
        if source is None:
            missing.append(name)
            continue
        got = source.shape(name)
        resizable = name in VOCAB_KEYS and not source.trained and got[1:] == shape[1:]
        if got != shape and not resizable:
            problems.append(f"{name}: {source.label} has shape {list(got)}, the model needs {list(shape)}")
        stored = dtype if source.dtype(name).is_floating_point else source.dtype(name)
        plan.append(PlannedTensor(name, shape, stored, source))
    if missing:
        searched = ", ".join(s.label for s in sources)
        problems.append(f"missing tensor(s) ({len(missing)}), in none of [{searched}]: {listing(missing)}")
    for key, (a, b) in lora.pairs.items():
        shape = expected.get(key)
        if shape is None or len(shape) != 2 or key in VOCAB_KEYS:
            problems.append(f"LoRA target {key} is not a linear layer of the model")
        elif a.ndim != 2 or b.ndim != 2 or a.shape[1] != shape[1] or b.shape[0] != shape[0] or a.shape[0] != b.shape[1]:
            problems.append(
                f"LoRA {key}: A {list(a.shape)} and B {list(b.shape)} do not fit the weight {list(shape)} "
                "(expected A [r, in], B [out, r])"
            )
    return plan, problems


def materialize(item: PlannedTensor, lora: LoRA) -> Tensor:
    """The output tensor: read, resize vocabulary rows if needed, merge LoRA, cast (floating tensors only)."""
    tensor = item.source.read(item.name)
    if not tensor.is_floating_point():
        return tensor.contiguous()
    compute = torch.promote_types(item.dtype, torch.float32)  # resize and merge in >= fp32, then round once
    if tensor.shape[0] != item.shape[0]:
        tensor = resize_rows(tensor.to(compute), item.shape[0])
    delta = lora.delta(item.name, compute)
    if delta is not None:
        tensor = tensor.to(compute) + delta
    return tensor.to(item.dtype).contiguous()


def resize_rows(matrix: Tensor, rows: int) -> Tensor:
    """Vocabulary matrix with ``rows`` rows, as transformers' resize does: keep the first rows; new rows (only
    when the tokenizer outgrew the matrix) get the mean of the existing rows, a deterministic init."""
    if rows <= matrix.shape[0]:
        return matrix[:rows]
    mean = matrix.to(torch.float64).mean(dim=0, keepdim=True).to(matrix.dtype)
    return torch.cat([matrix, mean.expand(rows - matrix.shape[0], -1)])
