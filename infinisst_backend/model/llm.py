"""The LLM: a Llama / Qwen2 decoder that runs flattened varlen batches over the paged KV cache.

Parameter names are Hugging Face's (``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.q_proj.weight``,
..., ``model.norm.weight``, ``lm_head.weight``), so HF checkpoints load with ``load_state_dict``. With tied
embeddings there is no ``lm_head`` module and no ``lm_head.weight`` key.

Numerics follow HF: RMSNorm in float32 (or the input dtype if wider) and scaled by its weight after the cast
back; attention softmax in float32 (float64 for float64 models); logits in the model dtype, returned as
float32 (float64 for float64 models), except 16-bit models on CUDA, whose logits come unrounded from the
GEMM's float32 accumulators (see ``LLM.logits``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infinisst_backend.config import LLMConfig
from infinisst_backend.kernels import llm_kernels
from infinisst_backend.kernels.attention import AttentionBackend
from infinisst_backend.model.kv_cache import PagedKVCache
from infinisst_backend.model.rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if self._fused(x):
            return llm_kernels.rms_norm(x, self.weight, self.eps)
        compute = torch.promote_types(x.dtype, torch.float32)
        h = x.to(compute)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def add_and_norm(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """``(norm(x + residual), x + residual)``; one kernel in the fused passes."""
        if self._fused(x):
            return llm_kernels.rms_norm(x, self.weight, self.eps, residual=residual)
        h = x + residual
        return self(h), h

    def _fused(self, x: Tensor) -> bool:
        return llm_kernels.active(x) and self.weight.dtype == x.dtype


class _Fused:
    """Several ``nn.Linear`` of the same input as one GEMM whose output is split back.

    The weights (and biases) are concatenated once; each module's parameter then becomes a view of the
    concatenation, so memory is not doubled and ``state_dict`` keeps its names. Not a module: the parameters stay
    registered where they were.
    """

    def __init__(self, linears: list[nn.Linear]):
        self.sizes = [m.out_features for m in linears]
        self.weight = torch.cat([m.weight.detach() for m in linears])
        has_bias = [m.bias is not None for m in linears]
        if any(has_bias) and not all(has_bias):
            raise ValueError("cannot fuse linears where only some have a bias")
        self.bias = torch.cat([m.bias.detach() for m in linears]) if all(has_bias) else None
        for m, w in zip(linears, self.weight.split(self.sizes)):
            m.weight = nn.Parameter(w, requires_grad=False)
        if self.bias is not None:
            for m, b in zip(linears, self.bias.split(self.sizes)):
                m.bias = nn.Parameter(b, requires_grad=False)

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.joint(x).split(self.sizes, dim=-1)

    def joint(self, x: Tensor) -> Tensor:
        """The GEMM's output before the split: the modules' outputs side by side."""
        return F.linear(x, self.weight, self.bias)


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

        self.qkv: _Fused | None = None  # set by fuse(): one GEMM for q, k and v

    def fuse(self) -> None:
        """Run q/k/v as one GEMM (fewer, larger kernels on GPU); the three weights become views of one tensor."""
        self.qkv = _Fused([self.q_proj, self.k_proj, self.v_proj])

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: PagedKVCache | None, attn: AttentionBackend) -> Tensor:
        num_tokens = x.shape[0]
        kv_layer = kv.kv_layers[self.layer] if kv is not None else None
        if self.qkv is not None and llm_kernels.active(x):  # one kernel: RoPE on q and k, k and v into the pages
            page, offset = attn.write_slots()
            qkv = self.qkv.joint(x)
            q = llm_kernels.rope_write_kv(qkv, cos, sin, page, offset, kv_layer, self.num_heads, self.num_kv_heads)
            return self.o_proj(attn.attend(self.layer, q, kv_layer).reshape(num_tokens, -1))
        if self.qkv is not None:
            q, k, v = self.qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attn.forward(self.layer, q, k, v, kv_layer)  # [T, Hq, D]
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

        self.gate_up: _Fused | None = None  # set by fuse(): one GEMM for gate and up

    def fuse(self) -> None:
        """Run gate/up as one GEMM; the two weights become views of one tensor."""
        self.gate_up = _Fused([self.gate_proj, self.up_proj])

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up is not None and llm_kernels.active(x):
            return self.down_proj(llm_kernels.silu_mul(self.gate_up.joint(x)))
        gate, up = self.gate_up(x) if self.gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, kv: PagedKVCache | None, attn: AttentionBackend) -> Tensor:
        a = self.self_attn(self.input_layernorm(h), cos, sin, kv, attn)
        x, h = self.post_attention_layernorm.add_and_norm(h, a)
        return h + self.mlp(x)


class Backbone(nn.Module):
    """The ``model.`` part of the state dict: embeddings, layers and the final norm."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LLM(nn.Module):
    """Llama / Qwen2 decoder over a :class:`PagedKVCache` (docs/design.md "Paged KV")."""

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

    def forward(self, embeds: Tensor, positions: Tensor, kv: PagedKVCache | None, attn: AttentionBackend) -> Tensor:
        """Run the decoder on a flattened batch and return the final-norm hidden states ``[T, H]``.

        ``embeds [T, H]`` are the new tokens of all sequences of the step (order of ``attn``'s planned batch),
        ``positions [T]`` their RoPE positions. Keys are stored rotated in ``kv`` by ``attn``; ``kv`` is None for
        a backend that keeps no cache (training's dense attention, which gets ``kv_layer=None``).
        """
        cos, sin = self.rope.cos_sin(positions, embeds.dtype)  # [T, D/2] each, shared by all layers
        h = embeds
        for layer in self.model.layers:
            h = layer(h, cos, sin, kv, attn)
        return self.model.norm(h)

    @property
    def head_weight(self) -> Tensor:
        """The LM head's weight ``[V', H]``: V' >= V rows when :meth:`pad_vocab` padded it."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def fuse_projections(self) -> None:
        """q/k/v and gate/up as one GEMM each in every layer (GPU: fewer kernel launches, better tiling).

        Idempotent. Call it once the model has its final device and dtype (``.to()`` does not move the fused
        tensors)."""
        for layer in self.model.layers:
            if layer.self_attn.qkv is None:
                layer.self_attn.fuse()
            if layer.mlp.gate_up is None:
                layer.mlp.fuse()

    def pad_vocab(self, multiple: int) -> None:
        """Pad an untied LM head with zero rows to a multiple of ``multiple`` (GEMM tiling; logits stay [N, V]).

        An odd row count (Llama-3.1 + InfiniSST's added tokens: 128,263) defeats the GEMM's tiling on GPUs. The
        padded rows are never returned. Tied embeddings are left alone (padding would copy the embedding table).
        """
        rows = self.head_weight.shape[0]
        if self.lm_head is None or rows % multiple == 0:
            return
        weight = self.lm_head.weight
        padded = torch.zeros(-(-rows // multiple) * multiple, weight.shape[1], dtype=weight.dtype, device=weight.device)
        padded[:rows] = weight.detach()
        self.lm_head.weight = nn.Parameter(padded, requires_grad=False)

    def logits(self, hidden: Tensor) -> Tensor:
        """Next-token logits ``[N, V]`` of ``hidden [N, H]``: float32, or float64 for a float64 model.

        On CUDA with a 16-bit model the GEMM writes its float32 accumulators directly: logits rounded to bf16 are
        multiples of 1/8 between 16 and 32, so the top two often tie exactly and any rounding upstream flips the
        greedy choice. (HF rounds the logits to the model dtype; the CPU path does too.)
        """
        weight = self.head_weight
        if hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16):
            logits = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
        else:
            logits = F.linear(hidden, weight)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return logits[:, : self.cfg.vocab_size]

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of K and V per cached token over all layers, for ``dtype`` (default: the model's dtype)."""
        dtype = dtype or self.model.embed_tokens.weight.dtype
        per_layer = 2 * self.cfg.num_key_value_heads * self.cfg.head_dim * dtype.itemsize
        return per_layer * self.cfg.num_hidden_layers
