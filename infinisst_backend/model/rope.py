"""Rotary position embeddings of the LLM (docs/model.md §2.2), in the half-rotation ("rotate_half") layout.

Feature ``i`` of the first half of a head pairs with feature ``i + D/2``; the pair is rotated by the angle
``position * inv_freq[i]``. Keys are stored rotated in the paged cache, so eviction re-rotates the retained
tail by a position delta (:func:`rerotate`; :func:`rerotate_tokens` takes one delta per token): angles are
linear in the position, so rotating a key stored at position ``p`` by ``-delta`` gives exactly the key at
position ``p - delta``.

Frequencies and angles are computed in float64 and cast once to the compute dtype, so a re-rotated key equals
a freshly rotated one to float64 rounding (HF computes them in float32; the difference is far below bf16).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from infinisst_backend.config import LLMConfig

# The table covers this many positions before it first grows. Positions are compact cache indices, which the
# eviction window keeps near S + 1000 + one turn (docs/design.md "Paged KV").
_INITIAL_POSITIONS = 4096


def inv_freq(cfg: LLMConfig) -> Tensor:
    """Inverse frequencies ``[head_dim // 2]`` (float64, CPU) for ``cfg.rope_theta`` and ``cfg.rope_scaling``.

    Supports no scaling, ``{"rope_type": "linear", "factor"}`` and HF's ``"llama3"`` frequency-dependent scaling.
    """
    if cfg.head_dim % 2:
        raise ValueError(f"invalid llm.head_dim={cfg.head_dim}: RoPE needs an even head_dim")
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.float64, device="cpu") / cfg.head_dim
    base = 1.0 / (cfg.rope_theta**exponents)
    scaling = cfg.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return base
    if rope_type == "linear":
        return base / _param(scaling, "factor")
    if rope_type == "llama3":
        return _llama3_scaling(base, scaling)
    raise ValueError(f"invalid llm.rope_scaling={cfg.rope_scaling!r}: expected None, 'linear' or 'llama3'")


def _llama3_scaling(freq: Tensor, scaling: dict) -> Tensor:
    """Llama 3.1 scaling: long wavelengths slow down by ``factor``, short ones stay, the band between blends."""
    factor = _param(scaling, "factor")
    low_freq_factor = _param(scaling, "low_freq_factor")
    high_freq_factor = _param(scaling, "high_freq_factor")
    context = _param(scaling, "original_max_position_embeddings")
    wavelen = 2 * math.pi / freq
    # Blend weight: 0 at wavelen == context / low_freq_factor, 1 at wavelen == context / high_freq_factor.
    smooth = (context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * freq / factor + smooth * freq
    out = torch.where(wavelen > context / low_freq_factor, freq / factor, blended)
    return torch.where(wavelen < context / high_freq_factor, freq, out)


def _param(scaling: dict, name: str) -> float:
    if name not in scaling:
        raise ValueError(f"invalid llm.rope_scaling={scaling!r}: missing {name!r}")
    return float(scaling[name])


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the half pairs of ``x [..., D]`` by angles given as ``cos``/``sin`` broadcastable to ``[..., D/2]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [T, H, D]`` with ``[T, D/2]`` tables from :meth:`RotaryEmbedding.cos_sin` (in ``x``'s dtype)."""
    return _rotate(x, cos[:, None, :], sin[:, None, :])


def rerotation_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype re-rotation computes in: float32, or float64 for float64 data."""
    return torch.promote_types(dtype, torch.float32)


def rerotation_cos_sin(delta: int, freq: Tensor) -> Tensor:
    """cos and sin ``[2, D/2]`` (float64, on ``freq``'s device) of the angles ``delta * freq`` of a re-rotation."""
    angle = delta * freq.to(torch.float64)
    return torch.stack((angle.cos(), angle.sin()))


def rerotate(x: Tensor, delta: int, freq: Tensor) -> Tensor:
    """Rotate already-rotated vectors ``x [..., D]`` by ``delta`` positions (negative moves them back).

    Computed in float32 (float64 for float64 input) and cast back once, so a bf16 cache loses one rounding.
    """
    cos, sin = rerotation_cos_sin(delta, freq).to(device=x.device, dtype=rerotation_compute_dtype(x.dtype))
    return _rotate(x.to(cos.dtype), cos, sin).to(x.dtype)


def rerotate_tokens(x: Tensor, cos_sin: Tensor) -> Tensor:
    """Rotate ``x [T, ..., D]`` token by token: ``cos_sin [T, 2, D/2]`` holds each token's own re-rotation.

    ``cos_sin`` rows are :func:`rerotation_cos_sin` cast to :func:`rerotation_compute_dtype` on ``x``'s
    device. Every element is computed as :func:`rerotate` computes it (products and sums in the compute
    dtype, one cast back), so the results are identical; the halves are written in place of a concatenation.
    """
    half = x.shape[-1] // 2
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos, sin = cos_sin[:, 0].reshape(shape), cos_sin[:, 1].reshape(shape)
    x1, x2 = x[..., :half], x[..., half:]  # promoted to the compute dtype inside each product (exactly)
    out = torch.empty_like(x)
    torch.sub(x1 * cos, x2 * sin, out=out[..., :half])
    torch.add(x2 * cos, x1 * sin, out=out[..., half:])
    return out


class RotaryEmbedding:
    """cos/sin tables of the LLM, per (device, dtype), grown on demand (apply them with :func:`apply_rotary`).

    A plain object, not an ``nn.Module``: ``LLM.to(torch.bfloat16)`` must not round the frequencies.
    """

    def __init__(self, cfg: LLMConfig):
        self.inv_freq = inv_freq(cfg)  # [D/2] float64, CPU
        self._num_positions = 0
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def reserve(self, num_positions: int) -> None:
        """Make the tables cover positions ``0 .. num_positions - 1`` (doubling, so growth is rare)."""
        if num_positions <= self._num_positions:
            return
        self._num_positions = max(num_positions, 2 * self._num_positions, _INITIAL_POSITIONS)
        self._tables.clear()

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin ``[T, D/2]`` in ``dtype`` for integer ``positions [T]``, on the device of ``positions``.

        Reads ``positions.max()`` to grow the table (one host sync); a CUDA-graph caller should ``reserve()``
        beforehand and pass positions within it.
        """
        if positions.numel() and not _capturing(positions):
            low, high = torch.stack(torch.aminmax(positions)).tolist()
            if low < 0:
                raise ValueError(f"RoPE positions must be >= 0, got {low}")
            self.reserve(high + 1)
        cos, sin = self._table(positions.device, dtype)
        return cos[positions], sin[positions]

    def _table(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self._num_positions == 0:
            self.reserve(_INITIAL_POSITIONS)
        key = (device, dtype)
        if key not in self._tables:
            # [P, D/2] angles in float64: exact products of an integer and a float64 frequency, rounded once.
            angles = (
                torch.arange(self._num_positions, dtype=torch.float64, device=self.inv_freq.device)[:, None]
                * self.inv_freq[None, :]
            )
            self._tables[key] = (angles.cos().to(device, dtype), angles.sin().to(device, dtype))
        return self._tables[key]


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()
