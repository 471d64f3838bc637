"""LoRA on the LLM's linears: ``W x + (alpha / r) * B (A x)``, A ``[r, in]`` and B ``[out, r]``, base frozen.

Module names follow PEFT's (``<linear>.lora_A.weight``, ``<linear>.lora_B.weight``), so the exported pairs, prefixed
``base_model.model.``, are what the converter's :func:`~infinisst_backend.model.convert.sources.split_lora` reads
and merges as ``W + alpha / r * B @ A``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# The LLM's linears that get a LoRA: attention and MLP projections of every layer.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update; A starts as PEFT's (Kaiming uniform), B at zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"invalid LoRA rank {rank}: expected > 0")
        self.base = base
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    def delta(self) -> Tensor:
        """``(alpha / r) * B @ A`` in float32, the update a merge adds to the base weight."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Wrap every ``nn.Linear`` of ``model`` named in :data:`TARGETS` in a :class:`LoRALinear`, in place; returns the
    wrapped modules' names. Call it after the base weights are loaded (the base's keys gain ``.base``)."""
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError("no LoRA target linear found")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The :class:`LoRALinear` modules of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def peft_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The LoRA pairs under PEFT's names: ``base_model.model.<module>.lora_{A,B}.weight`` (module names relative to
    ``model``, i.e. the LLM's own: ``model.layers.0.self_attn.q_proj``)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight
    return out


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state dict with every LoRA merged (``W + delta``, float32) under the plain linear names."""
    merged = {}
    modules = lora_modules(model)
    for key, tensor in model.state_dict().items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        owner, _, leaf = key.rpartition(".base.")
        if owner and owner in modules:
            key = f"{owner}.{leaf}"
            if leaf == "weight":
                tensor = tensor.float() + modules[owner].delta().to(tensor.device)
        merged[key] = tensor
    return merged
