"""Weight sources: the tensors of each input file under our key names, read lazily (memory-mapped), and the
LoRA pairs of a PEFT state dict."""

from __future__ import annotations

import contextlib
import json
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from infinisst_backend.model.convert.keys import LORA_KEY, LORA_PREFIX, listing
from infinisst_backend.model.convert.safetensors_file import TORCH_DTYPES

DEFAULT_LORA_ALPHA = 16.0  # the reference's LoraConfig(lora_alpha=16)


@dataclass(slots=True)
class TensorSource:
    """The tensors of one input under our key names, read lazily (memory-mapped files)."""

    label: str  # names the input in messages
    entries: dict[str, tuple[str, tuple[int, ...], torch.dtype]]  # our key -> (key in the file, shape, dtype)
    reader: Callable[[str], Tensor]  # key in the file -> tensor
    trained: bool  # InfiniSST's own files: their vocabulary rows must match the tokenizer exactly

    @classmethod
    def from_state_dict(cls, label: str, sd: dict[str, Tensor], trained: bool) -> TensorSource:
        entries = {k: (k, tuple(v.shape), v.dtype) for k, v in sd.items()}
        return cls(label, entries, sd.__getitem__, trained)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key][2]

    def read(self, key: str) -> Tensor:
        return self.reader(self.entries[key][0])

    def renamed(self, rename: Callable[[str], str | None]) -> TensorSource:
        """The same tensors under ``rename(key)``; keys renamed to None are left out."""
        entries = {new: entry for key, entry in self.entries.items() if (new := rename(key)) is not None}
        return TensorSource(self.label, entries, self.reader, self.trained)


def open_tensor_file(path: Path, stack: contextlib.ExitStack, trained: bool) -> TensorSource:
    """A flat state dict: a ``.safetensors`` file or a torch pickle (``weights_only=True``, memory-mapped)."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        return _safetensors_source(path.name, [path], stack, trained)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # UnpicklingError (a forbidden global), RuntimeError/EOFError (corrupt, truncated)
        raise ValueError(f"cannot read {path} as a state dict: {type(e).__name__}: {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise ValueError(f"{path} is not a flat state dict (a dict of name -> tensor)")
    return TensorSource.from_state_dict(path.name, sd, trained)


def hf_weights(llm_dir: Path, stack: contextlib.ExitStack) -> TensorSource:
    """The LLM directory's safetensors weights (sharded with model.safetensors.index.json, or not)."""
    index = llm_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e!r}") from e
        files = [llm_dir / name for name in names]
    else:
        files = sorted(llm_dir.glob("*.safetensors"))
    label = f"{llm_dir.name}/*.safetensors" if files else f"{llm_dir} (no *.safetensors)"
    return _safetensors_source(label, files, stack, trained=False)


def _safetensors_source(label: str, files: list[Path], stack: contextlib.ExitStack, trained: bool) -> TensorSource:
    entries, handles = {}, {}
    for file in files:
        try:
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            for key in handle.keys():
                info = handle.get_slice(key)
                dtype = TORCH_DTYPES.get(info.get_dtype())
                if dtype is None:
                    raise ValueError(f"{file}: {key} has unsupported dtype {info.get_dtype()}")
                entries[key] = (key, tuple(info.get_shape()), dtype)
                handles[key] = handle
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {file}: {e}") from e
    return TensorSource(label, entries, lambda key: handles[key].get_tensor(key), trained)


@dataclass(slots=True)
class LoRA:
    """LoRA pairs by target weight (our key): A [r, in], B [out, r]; merged as W + alpha / r * B @ A."""

    pairs: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    alpha: float = DEFAULT_LORA_ALPHA

    def delta(self, key: str, dtype: torch.dtype) -> Tensor | None:
        """alpha / r * B @ A in ``dtype`` for the weight ``key``, or None if it has no LoRA pair."""
        if key not in self.pairs:
            return None
        a, b = self.pairs[key]
        return (self.alpha / a.shape[0]) * (b.to(dtype) @ a.to(dtype))


def split_lora(source: TensorSource, alpha: float) -> tuple[LoRA, TensorSource]:
    """Split a PEFT state dict into LoRA pairs and the full weights it also holds, both under our key names.

    Keys look like ``base_model.model.<module>.lora_{A,B}[.<adapter>].weight``; full weights of the wrapped
    layers are ``base_model.model.<module>.base_layer.{weight,bias}``, others ``base_model.model.<name>``.
    """
    halves: dict[str, dict[str, Tensor]] = {}
    adapters, unsupported = set(), []
    for key in source.entries:
        name = key.removeprefix(LORA_PREFIX)
        match = LORA_KEY.match(name)
        if match:
            halves.setdefault(match["module"] + ".weight", {})[match["ab"]] = source.read(key)
            adapters.add(match["adapter"])
        elif re.search(r"\.lora_(embedding_[AB]|magnitude_vector)\b", name):
            unsupported.append(key)
    if unsupported:
        raise ValueError(f"{source.label}: unsupported LoRA tensors (embedding LoRA, DoRA): {listing(unsupported)}")
    if len(adapters) > 1:
        raise ValueError(f"{source.label}: holds several LoRA adapters {sorted(map(str, adapters))}; expected one")
    incomplete = sorted(k for k, h in halves.items() if set(h) != {"A", "B"})
    if incomplete:
        raise ValueError(f"{source.label}: LoRA weight(s) without their A or B half: {listing(incomplete)}")

    def full_name(key: str) -> str | None:
        name = key.removeprefix(LORA_PREFIX)
        return None if LORA_KEY.match(name) else name.replace(".base_layer.", ".")

    return LoRA({k: (h["A"], h["B"]) for k, h in halves.items()}, alpha), source.renamed(full_name)
