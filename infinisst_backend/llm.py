"""The LLM: a Llama / Qwen2 decoder that runs flattened varlen batches over the paged KV cache.

Parameter names are Hugging Face's (``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.q_proj.weight``,
..., ``model.norm.weight``, ``lm_head.weight``), so HF checkpoints load with ``load_state_dict``. With tied
embeddings there is no ``lm_head`` module and no ``lm_head.weight`` key.

Numerics follow HF: RMSNorm in float32 (or the input dtype if wider) and scaled by its weight after the cast
back; attention softmax in float32 (float64 for float64 models); logits in the model dtype, returned as
float32 (float64 for float64 models).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionBackend
from .config import LLMConfig
from .kv_cache import PagedKVCache
from .rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        h = x.to(compute)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    """Self-attention with grouped KV heads. q/k/v have a bias for Qwen2 or ``attention_bias``."""

    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.architecture == "qwen2"
        # HF Llama puts attention_bias on o_proj too; Qwen2 never has an o_proj bias.
        o_bias = cfg.attention_bias and cfg.architecture == "llama"
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_size, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_size, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=o_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: PagedKVCache, attn: AttentionBackend) -> Tensor:
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attn.forward(self.layer, q, k, v, kv.kv_layers[self.layer])  # [T, Hq, D]
        return self.o_proj(out.reshape(num_tokens, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"invalid llm.hidden_act={cfg.hidden_act!r}: only 'silu' is supported")
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, kv: PagedKVCache, attn: AttentionBackend) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, kv, attn)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    """The ``model.`` part of the state dict: embeddings, layers and the final norm."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LLM(nn.Module):
    """Llama / Qwen2 decoder over a :class:`PagedKVCache` (design.md "Paged KV")."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg)

    @property
    def inv_freq(self) -> Tensor:
        """RoPE inverse frequencies ``[head_dim // 2]`` (float64), for ``PagedKVCache.compact``."""
        return self.rope.inv_freq

    def embed(self, ids: Tensor) -> Tensor:
        """Token embeddings ``[T, H]`` of ``ids [T]``."""
        return self.model.embed_tokens(ids)

    def forward(self, embeds: Tensor, positions: Tensor, kv: PagedKVCache, attn: AttentionBackend) -> Tensor:
        """Run the decoder on a flattened batch and return the final-norm hidden states ``[T, H]``.

        ``embeds [T, H]`` are the new tokens of all sequences of the step (order of ``attn``'s planned batch),
        ``positions [T]`` their RoPE positions. Keys are stored rotated in ``kv`` by ``attn``.
        """
        cos, sin = self.rope.cos_sin(positions, embeds.dtype)  # [T, D/2] each, shared by all layers
        h = embeds
        for layer in self.model.layers:
            h = layer(h, cos, sin, kv, attn)
        return self.model.norm(h)

    def logits(self, hidden: Tensor) -> Tensor:
        """Next-token logits ``[N, V]`` of ``hidden [N, H]``: float32, or float64 for a float64 model."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, weight)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of K and V per cached token over all layers, for ``dtype`` (default: the model's dtype)."""
        dtype = dtype or self.model.embed_tokens.weight.dtype
        per_layer = 2 * self.cfg.num_key_value_heads * self.cfg.head_dim * dtype.itemsize
        return per_layer * self.cfg.num_hidden_layers
