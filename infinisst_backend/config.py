"""Configuration objects shared by every part of the backend.

Two kinds of configuration live here:

* :class:`ModelConfig` describes a checkpoint (speech encoder, length adapter, LLM, prompt). It is stored as
  ``config.json`` in a checkpoint directory and never changes at run time.
* :class:`EngineConfig` describes how one engine instance serves streams (batch sizes, memory, windows,
  defaults). The Triton layer builds it from ``config.pbtxt`` parameters.

Every ``validate()`` raises ``ValueError`` with a message that names the offending field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

SAMPLE_RATE = 16_000
# One latency unit: 0.96 s of 16 kHz audio. A chunk holds m units.
SAMPLES_PER_UNIT = 15_360
# Speech-encoder frames per latency unit (20 ms frames) and LLM speech embeddings per unit (80 ms each).
FRAMES_PER_UNIT = 48
EMBEDDINGS_PER_UNIT = 12
# Max new tokens per turn = TOKENS_PER_UNIT * m.
TOKENS_PER_UNIT = 10
MAX_LATENCY_MULTIPLIER = 4

# The dtypes a checkpoint, the compute or the KV cache may use: config name -> torch dtype.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_name(dtype: str | torch.dtype) -> str:
    """The config name of a torch dtype or dtype name ("bfloat16" for torch.bfloat16); an unsupported one raises."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"invalid dtype={dtype!r}: expected one of {tuple(DTYPES)}")
    return name


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a dtype name or torch dtype (torch.bfloat16 for "bfloat16"); an unsupported one raises."""
    return DTYPES[dtype_name(dtype)]


def _fail(name: str, value: Any, expected: str) -> None:
    raise ValueError(f"invalid {name}={value!r}: expected {expected}")


@dataclass(slots=True)
class SpeechEncoderConfig:
    """wav2vec 2.0-style streaming encoder with RoPE and a chunk-causal window (docs/model.md §2.1, §3)."""

    # (channels, kernel, stride) per CNN layer. Kernels/strides fix the 20 ms frame grid; channels may shrink.
    conv_layers: list[tuple[int, int, int]] = field(
        default_factory=lambda: [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
    )
    conv_bias: bool = True
    extractor_mode: str = "layer_norm"  # "layer_norm" (every conv layer) or "group_norm" (layer 0 only)
    embed_dim: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_dim: int = 4096
    rope_variant: str = "interleaved"  # "interleaved" (rotary-embedding-torch) or "half" (HF rotate_half)
    rope_theta: float = 10_000.0
    block_size: int = FRAMES_PER_UNIT  # frames per chunk at m=1
    max_cache_frames: int = 576  # per-layer K/V window
    layer_norm_eps: float = 1e-5
    adapter_layers: int = 2  # length adapter: Conv1d(k=2, s=2) blocks, 2 blocks = 4x down

    def validate(self) -> None:
        if self.embed_dim % self.num_heads:
            _fail("speech_encoder.embed_dim", self.embed_dim, "a multiple of num_heads")
        if self.extractor_mode not in ("layer_norm", "group_norm"):
            _fail("speech_encoder.extractor_mode", self.extractor_mode, "'layer_norm' or 'group_norm'")
        if self.rope_variant not in ("interleaved", "half"):
            _fail("speech_encoder.rope_variant", self.rope_variant, "'interleaved' or 'half'")
        if self.max_cache_frames <= 0:
            _fail("speech_encoder.max_cache_frames", self.max_cache_frames, "> 0")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


@dataclass(slots=True)
class LLMConfig:
    """Decoder-only LLM of the Llama family (``llama``) or the Qwen2 family (``qwen2``: q/k/v bias).

    Field names follow Hugging Face configs so that ``to_hf_dict()`` builds an equivalent
    ``LlamaConfig``/``Qwen2Config`` (tests compare against transformers on the same weights).
    """

    architecture: str = "llama"  # "llama" | "qwen2"
    vocab_size: int = 128_263
    hidden_size: int = 4096
    intermediate_size: int = 14_336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    # None, or HF's llama3 dict: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; {"rope_type": "linear", "factor"} is accepted too.
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # True for qwen2 (q/k/v only)
    hidden_act: str = "silu"

    def validate(self) -> None:
        if self.architecture not in ("llama", "qwen2"):
            _fail("llm.architecture", self.architecture, "'llama' or 'qwen2'")
        if self.num_attention_heads % self.num_key_value_heads:
            _fail("llm.num_key_value_heads", self.num_key_value_heads, "a divisor of num_attention_heads")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in ("llama3", "linear", "default"):
            _fail("llm.rope_scaling", self.rope_scaling, "None or a llama3/linear rope_scaling dict")

    def to_hf_dict(self) -> dict:
        """A dict for ``transformers.LlamaConfig(**d)`` / ``Qwen2Config(**d)``."""
        d = {
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,  # HF edits it in place
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": 131_072,
        }
        if self.architecture == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = False
        return d


@dataclass(slots=True)
class PromptConfig:
    """The paper's multi-turn prompt (docs/model.md §5, §7.4)."""

    template: str = "llama3"  # "llama3" | "chatml"
    # {language} is the target-language name; {latency} the latency token (e.g. "<latency_1>") or "".
    system_text: str = "Translate the following speech from English to {language} with latency {latency}."
    speech_token: str = "<sp_patch>"
    # Latency tokens by m (index 0 is m=1); empty list when the template has none.
    latency_tokens: list[str] = field(default_factory=lambda: [f"<latency_{i}>" for i in range(1, 5)])
    # Any of these ends an assistant turn.
    eos_tokens: list[str] = field(default_factory=lambda: ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
    # Code -> name. Names are accepted too (case-insensitive).
    languages: dict[str, str] = field(
        default_factory=lambda: {
            "de": "German",
            "es": "Spanish",
            "zh": "Chinese",
            "fr": "French",
            "it": "Italian",
            "pt": "Portuguese",
            "nl": "Dutch",
            "ro": "Romanian",
            "ru": "Russian",
            "ja": "Japanese",
        }
    )

    def validate(self) -> None:
        if self.template not in ("llama3", "chatml"):
            _fail("prompt.template", self.template, "'llama3' or 'chatml'")
        if not self.eos_tokens:
            _fail("prompt.eos_tokens", self.eos_tokens, "at least one token")


@dataclass(slots=True)
class ModelConfig:
    """Everything ``config.json`` of a checkpoint directory holds."""

    speech_encoder: SpeechEncoderConfig = field(default_factory=SpeechEncoderConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    # The dtype the weights are stored in; the engine's dtype may differ.
    dtype: str = "bfloat16"

    def validate(self) -> None:
        self.speech_encoder.validate()
        self.llm.validate()
        self.prompt.validate()
        if self.dtype not in DTYPES:
            _fail("dtype", self.dtype, f"one of {tuple(DTYPES)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        def build(klass, sub: dict, name: str):
            known = {f.name for f in dataclasses.fields(klass)}
            unknown = set(sub) - known
            if unknown:
                raise ValueError(f"unknown field(s) in {name}: {sorted(unknown)}")
            return klass(**sub)

        speech = dict(d.get("speech_encoder", {}))
        if "conv_layers" in speech:
            speech["conv_layers"] = [tuple(x) for x in speech["conv_layers"]]
        cfg = cls(
            speech_encoder=build(SpeechEncoderConfig, speech, "speech_encoder"),
            llm=build(LLMConfig, dict(d.get("llm", {})), "llm"),
            prompt=build(PromptConfig, dict(d.get("prompt", {})), "prompt"),
            dtype=d.get("dtype", "bfloat16"),
        )
        cfg.validate()
        return cfg


@dataclass(slots=True)
class DecodingConfig:
    """Per-stream decoding options (docs/model.md §6). beam_size 1 is greedy with the same processors."""

    beam_size: int = 1
    repetition_penalty: float = 1.2
    no_repeat_ngram_size: int = 5
    # Bans an n-gram that occurs in the last `ngram_lookback` target tokens of earlier turns.
    encoder_no_repeat_ngram_size: int = 5
    ngram_lookback: int = 100

    def validate(self) -> None:
        if not 1 <= self.beam_size <= 8:
            _fail("beam_size", self.beam_size, "1..8")
        if self.repetition_penalty < 1.0:
            _fail("repetition_penalty", self.repetition_penalty, ">= 1.0")
        for name in ("no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "ngram_lookback"):
            if getattr(self, name) < 0:
                _fail(name, getattr(self, name), ">= 0")


@dataclass(slots=True)
class EngineConfig:
    """How one engine instance serves streams."""

    device: str = "cpu"
    dtype: str = "float32"  # compute dtype; float64 in tests, bfloat16 on GPU
    attention_backend: str = "torch"  # "torch" | "flashinfer"
    max_batch_size: int = 32  # rows per step (a beam-4 stream counts 4 rows in decode)
    max_prefill_tokens: int = 4096  # token budget of one prefill step
    page_size: int = 16
    num_pages: int = 4096  # LLM KV pages in the pool (0: size from free device memory)
    kv_memory_fraction: float = 0.9  # used when num_pages == 0 on GPU
    max_streams: int = 256
    max_llm_cache_tokens: int = 1000  # the paper's max_llm_cache_size
    # A ready prefill waits up to this long after its oldest chunk for more streams to join (decode steps run
    # meanwhile); a full batch runs at once.
    batch_timeout_s: float = 0.005
    cuda_graphs: bool = True  # GPU with flashinfer: replay decode steps from CUDA graphs (batch-size buckets)
    # dtype of the LLM's KV cache ("auto": the compute dtype). float16 under a bfloat16 model: the same bytes, and
    # FlashInfer's kernels then round their softmax weights and split-k partial outputs to float16 (3 more bits)
    # instead of bfloat16; K/V values convert exactly unless they exceed float16's range (65504) or are tiny.
    kv_cache_dtype: str = "auto"
    # GPU with flashinfer: decode attention through FlashInfer's tensor-core (prefill) kernels instead of its
    # CUDA-core decode kernel; faster when each KV head serves several query heads (GQA), the same math.
    decode_tensor_cores: bool = False
    # GPU with CUDA graphs: the captured steps run each layer's RMSNorm (with the residual add), RoPE with the K/V
    # write, and SwiGLU as fused Triton kernels (kernels.llm_kernels) instead of ~44 small torch kernels.
    fused_kernels: bool = True
    # A stream's first turn shares the KV pages of the system prompt with a live stream that has the same system
    # prompt (the same token ids at the same positions: the same keys and values) and prefills only the rest of its
    # turn, as later turns do. Saves S tokens of prefill per new stream, which matters when many streams start at once.
    # It leaves as many system tokens unshared as make that rest as long as a later turn (graphed prefill shapes).
    share_system_prompt: bool = True
    default_language: str = "German"
    default_latency_multiplier: int = 1
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    max_request_seconds: float = 60.0  # longest audio piece in one request
    stream_idle_timeout_s: float = 600.0  # streams silent this long are freed

    @property
    def kv_dtype(self) -> str:
        """The KV cache's dtype name (``kv_cache_dtype`` resolved)."""
        return self.dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            _fail("dtype", self.dtype, f"one of {tuple(DTYPES)}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in DTYPES:
            _fail("kv_cache_dtype", self.kv_cache_dtype, f"'auto' or one of {tuple(DTYPES)}")
        if self.attention_backend not in ("torch", "flashinfer"):
            _fail("attention_backend", self.attention_backend, "'torch' or 'flashinfer'")
        for name in ("max_batch_size", "max_prefill_tokens", "page_size", "max_streams", "max_llm_cache_tokens"):
            if getattr(self, name) <= 0:
                _fail(name, getattr(self, name), "> 0")
        if self.num_pages < 0:
            _fail("num_pages", self.num_pages, ">= 0")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            _fail("kv_memory_fraction", self.kv_memory_fraction, "in (0, 1]")
        if self.batch_timeout_s < 0:
            _fail("batch_timeout_s", self.batch_timeout_s, ">= 0")
        if not 1 <= self.default_latency_multiplier <= MAX_LATENCY_MULTIPLIER:
            _fail("default_latency_multiplier", self.default_latency_multiplier, f"1..{MAX_LATENCY_MULTIPLIER}")
        if self.max_request_seconds <= 0:
            _fail("max_request_seconds", self.max_request_seconds, "> 0")
        if self.stream_idle_timeout_s <= 0:
            _fail("stream_idle_timeout_s", self.stream_idle_timeout_s, "> 0")
        self.decoding.validate()
