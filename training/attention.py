"""The training attention backend: dense causal attention per sequence, differentiable, no KV cache.

``LLM.forward(embeds, positions, kv=None, attn)`` runs every layer through :meth:`DenseCausalAttention.forward`,
which ignores the (absent) paged cache: each sequence attends causally to its own tokens only, as a server
prefill of the whole sequence would. Sequences of equal length (a padded batch, padding at the end) run as one
``scaled_dot_product_attention`` call (FlashAttention on GPUs); unequal ones one call each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from infinisst_backend.kernels.attention import AttentionBackend, AttentionBatch


class DenseCausalAttention(AttentionBackend):
    """Causal SDPA over each sequence of a flattened batch ``[T, H, D]``; plan with :meth:`plan_lengths`."""

    def __init__(self) -> None:
        self.lengths: list[int] = []

    def plan(self, batch: AttentionBatch) -> None:
        """Take the sequences' lengths from a step's metadata (no cache: each ``kv_len`` equals its ``q_len``)."""
        if batch.qo_lens != batch.kv_lens:
            raise ValueError("DenseCausalAttention keeps no cache: every sequence must be fed whole (q_len == kv_len)")
        self.plan_lengths(batch.qo_lens)

    def plan_lengths(self, lengths: list[int]) -> None:
        """The flattened batch holds these sequences, in order."""
        if not lengths or min(lengths) <= 0:
            raise ValueError(f"invalid sequence lengths {lengths}")
        self.lengths = list(lengths)

    def forward(self, layer: int, q: Tensor, k: Tensor, v: Tensor, kv_layer: Tensor | None) -> Tensor:
        """q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` (rotated) -> ``[T, Hq, D]`` in q's dtype; ``kv_layer`` is ignored."""
        if sum(self.lengths) != q.shape[0]:
            raise ValueError(f"q has {q.shape[0]} tokens, the planned sequences {sum(self.lengths)}")
        out_dtype = q.dtype
        device = q.device.type
        # Under autocast RoPE returns float32 q/k (its tables follow the float32 residual stream): run in the autocast
        # dtype, which FlashAttention takes.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        group = q.shape[1] // k.shape[1]
        if len(set(self.lengths)) == 1:
            out = self._causal(*(x.unflatten(0, (len(self.lengths), -1)) for x in (q, k, v)), group)
            return out.flatten(0, 1).to(out_dtype)
        pieces = [
            self._causal(qs[None], ks[None], vs[None], group)[0]
            for qs, ks, vs in zip(q.split(self.lengths), k.split(self.lengths), v.split(self.lengths))
        ]
        return torch.cat(pieces).to(out_dtype)

    @staticmethod
    def _causal(q: Tensor, k: Tensor, v: Tensor, group: int) -> Tensor:
        """[B, L, H, D] each (k/v with H / group heads) -> [B, L, Hq, D]."""
        k, v = (x.repeat_interleave(group, dim=2) if group > 1 else x for x in (k, v))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return out.transpose(1, 2)

    def write_slots(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("DenseCausalAttention keeps no KV cache")

    def attend(self, layer: int, q: Tensor, kv_layer: Tensor) -> Tensor:
        raise NotImplementedError("DenseCausalAttention keeps no KV cache")
