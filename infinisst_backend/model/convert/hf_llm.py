"""The Hugging Face directory of the LLM: our LLM config from its ``config.json``, the EOS set of its
``generation_config.json``, its tokenizer with InfiniSST's tokens added, and the prompt of the family."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from infinisst_backend.config import LLMConfig, PromptConfig
from infinisst_backend.model.checkpoint import load_tokenizer
from infinisst_backend.model.convert.keys import EMBED_KEY
from infinisst_backend.presets import CHATML_EOS_TOKENS, INTERPRETER_SYSTEM_TEXT

DEFAULT_LATENCY_TOKENS = 4  # the paper's <latency_1..4>

# Tokens InfiniSST's preprocess() appends (docs/model.md §1.4, §7.1): speech tokens, latency tokens (Llama), then the
# pad token the agent sets if the tokenizer lacks it (Qwen2.5 does: its ids end up 151665..151668).
SPEECH_TOKENS = ("<sp_patch>", "<sp_start>", "<sp_end>")
PAD_TOKEN = "<|finetune_right_pad_id|>"
LATENCY_TOKEN = "<latency_{}>"
PAPER_SYSTEM_TEXT = PromptConfig().system_text  # "... with latency {latency}." (release branch, Llama-3.1)
DEFAULT_EOS = {"llama3": PromptConfig().eos_tokens, "chatml": list(CHATML_EOS_TOKENS)}


def read_hf_config(llm_dir: Path) -> dict:
    """The LLM directory's config.json as a dict (``ValueError`` if absent or not JSON)."""
    file = llm_dir / "config.json"
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{llm_dir} has no config.json: expected the Hugging Face directory of the LLM") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return data


def llm_config(hf: dict, vocab_size: int) -> LLMConfig:
    """Our LLM config from a Hugging Face Llama/Qwen2 config.json (transformers 4.x or 5.x layout)."""
    arch = hf.get("model_type")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"config.json has model_type={arch!r}; supported: 'llama' (Llama-3.1), 'qwen2' (Qwen2.5)")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias", False):
        raise ValueError("config.json: only hidden_act='silu' without mlp_bias is supported")
    if arch == "qwen2" and hf.get("use_sliding_window", False):
        raise ValueError("config.json: use_sliding_window=true is not supported")
    # transformers 5 stores {"rope_theta", "rope_type", ...} in rope_parameters; 4.x has rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10_000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    try:
        cfg = _llm_config(
            hf, arch, vocab_size, float(theta), None if rope_type == "default" else {"rope_type": rope_type, **rope}
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"config.json: missing or invalid field: {e!r}") from e
    cfg.validate()
    return cfg


def _llm_config(hf: dict, arch: str, vocab_size: int, theta: float, scaling: dict | None) -> LLMConfig:
    heads = int(hf["num_attention_heads"])
    return LLMConfig(
        architecture=arch,
        vocab_size=vocab_size,
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_hidden_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=True if arch == "qwen2" else bool(hf.get("attention_bias", False)),
    )


def prompt_config(arch: str, tokenizer, eos_ids: list[int] | None, num_latency: int, system_text: str | None):
    """The prompt of the family: Llama-3 template with latency tokens, or chatml (docs/model.md §5, §7.4)."""
    template = "llama3" if arch == "llama" else "chatml"
    latency = [LATENCY_TOKEN.format(m) for m in range(1, num_latency + 1)] if template == "llama3" else []
    if system_text is None:
        system_text = PAPER_SYSTEM_TEXT if latency else INTERPRETER_SYSTEM_TEXT
    eos = DEFAULT_EOS[template]
    if eos_ids:
        eos = [tokenizer.convert_ids_to_tokens(i) for i in eos_ids]
    return PromptConfig(template=template, system_text=system_text, latency_tokens=latency, eos_tokens=eos)


def generation_eos_ids(llm_dir: Path) -> list[int] | None:
    """eos_token_id of generation_config.json (the EOS set of generate(), docs/model.md §5.4), if present."""
    try:
        eos = json.loads((llm_dir / "generation_config.json").read_text()).get("eos_token_id")
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    eos = [eos] if isinstance(eos, int) else eos
    return [int(i) for i in eos] if isinstance(eos, list) and eos else None


def infinisst_tokens(tokenizer, arch: str, trained_rows: int | None) -> list[str]:
    """The tokens InfiniSST appends, in its order: speech tokens, ``<latency_1..N>`` (Llama), then the pad token
    if the tokenizer lacks it. N is 4 (the paper) unless a trained embedding matrix says otherwise (the
    ``flashinfer`` branch trains with up to 12). A tokenizer saved after InfiniSST's preprocess keeps its own."""
    vocab = tokenizer.get_vocab()
    if SPEECH_TOKENS[0] in vocab:
        latency = itertools.takewhile(vocab.__contains__, (LATENCY_TOKEN.format(m) for m in itertools.count(1)))
        return [*SPEECH_TOKENS, *latency, PAD_TOKEN]
    base, needs_pad = len(tokenizer), PAD_TOKEN not in vocab
    num_latency = DEFAULT_LATENCY_TOKENS if arch == "llama" else 0
    if trained_rows is not None:
        num_latency = trained_rows - base - len(SPEECH_TOKENS) - int(needs_pad)
        if not 0 <= num_latency <= 16:
            raise ValueError(
                f"the checkpoint's {EMBED_KEY} has {trained_rows} rows but the tokenizer has {base} tokens: "
                f"InfiniSST adds 3 speech tokens, 0..16 latency tokens{' and a pad token' if needs_pad else ''}, "
                "so this tokenizer does not belong to this checkpoint"
            )
    latency = [LATENCY_TOKEN.format(m) for m in range(1, num_latency + 1)]
    return [*SPEECH_TOKENS, *latency, *([PAD_TOKEN] if needs_pad else [])]


def prepare_tokenizer(llm_dir: Path, arch: str, trained_rows: int | None):
    """(tokenizer, InfiniSST's tokens): the LLM's tokenizer with the tokens added at ids ``len(base)...``."""
    tokenizer = load_tokenizer(llm_dir)
    tokens = infinisst_tokens(tokenizer, arch, trained_rows)
    vocab = tokenizer.get_vocab()
    tokenizer.add_tokens([t for t in tokens if t not in vocab], special_tokens=True)
    tokenizer.pad_token = PAD_TOKEN  # as the reference agent does
    return tokenizer, tokens
