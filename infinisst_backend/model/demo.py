"""The deterministic demo checkpoint: a tiny random-weight InfiniSST with a real tokenizer.

No InfiniSST weights exist offline, so demos, server tests and benchmarks of the plumbing use this model:
Qwen2-style LLM with the chatml template and the SmolLM2 tokenizer (plus InfiniSST's tokens), a small
streaming speech encoder, seeded normal weights. Its "translations" are gibberish of realistic shape: the
``<|im_end|>`` row of the LM head is scaled up so that turns end early at varying lengths, like real ones.

Usage: ``python -m infinisst_backend.model.demo OUT_DIR [--seed N] [--force]``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from torch import nn

from infinisst_backend.config import ModelConfig
from infinisst_backend.model.checkpoint import CONFIG_FILE, FORMAT, FORMAT_VERSION, REQUIRED_FILES, save_checkpoint
from infinisst_backend.model.infinisst import InfiniSSTModel
from infinisst_backend.presets import demo_model_config
from infinisst_backend.text.tokenizers import add_infinisst_tokens, smollm2_tokenizer

logger = logging.getLogger(__name__)

# Bump when the recipe (this file and presets.demo_model_config) changes, so existing demo checkpoints are rebuilt.
DEMO_VERSION = 1
MARKER_FILE = "demo.json"
INIT_STD = 0.02
# Multiplies the lm_head row of <|im_end|> (sign included) so that EOS wins at a fraction of the decode steps. An
# unscaled random row never wins: its logit, ~N(0, 0.3), is far below the best of ~49k others (~1.4), and the
# repetition penalty hits it in every turn (EOS is in every turn's prompt). Decode-time hidden states share a
# large common part c (|c| ~ 14 of 16 after the final RMSNorm), so row . c sets the mean EOS logit and its sign
# decides between "never" and "often": the value is tuned for seed 0 only; other seeds give other turn lengths.
# Measured with the Engine (seed 0, greedy = the default decoding, the 27 pytest-audioeval clips as one 71 s
# stream): m=1: 4.8 emitted tokens per turn (at most 9; 11 of 75 turns empty, 20 full); m=2: 12.7 per turn.
# Beam search penalizes log-probs, which costs EOS more: with beam 4 turns run to max_new_tokens. The dynamics
# are chaotic in the scale (greedy m=1: -3.0: 7.0, -3.15: 6.3, -3.35: 4.5, -3.5: 2.9, -4: 1.6).
EOS_ROW_SCALE = -3.25


def demo_tokenizer():
    """SmolLM2's tokenizer with the chatml template's InfiniSST tokens added."""
    tokenizer = smollm2_tokenizer()
    add_infinisst_tokens(tokenizer, "chatml")
    return tokenizer


@torch.no_grad()
def init_random_weights(model: InfiniSSTModel, seed: int) -> None:
    """Deterministic init from one seeded generator, parameters in sorted-name order (equal seeds, equal bytes).

    Token embeddings, LM head and biases: normal with std 0.02. Other matrices and conv kernels: std
    1/sqrt(fan_in), which keeps activations input-dependent; with std 0.02 everywhere the speech encoder maps
    every chunk to nearly the same embeddings (cosine ~0.99) and the LLM's output ignores the speech. Norms:
    weight 1, bias 0. RoPE frequencies keep their values.
    """
    norm_params = {
        f"{prefix}.{name}"
        for prefix, module in model.named_modules()
        if isinstance(module, nn.LayerNorm | nn.GroupNorm) or type(module).__name__.endswith("Norm")
        for name, _ in module.named_parameters(recurse=False)
    }
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if name in norm_params:
            param.fill_(1.0 if name.endswith("weight") else 0.0)
            continue
        if name.endswith("rotary_emb.freqs"):
            continue  # frequencies, not weights
        if param.ndim < 2 or name.endswith(("embed_tokens.weight", "lm_head.weight")):
            std = INIT_STD
        else:
            std = param[0].numel() ** -0.5  # 1/sqrt(fan_in): in_features (x kernel size)
        param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32) * std)


def build_demo_model(cfg: ModelConfig, tokenizer, seed: int) -> InfiniSSTModel:
    """The demo model: seeded random weights with the ``<|im_end|>`` row scaled (float32, eval mode)."""
    torch_state = torch.random.get_rng_state()
    model = InfiniSSTModel(cfg)  # default init draws from the global RNG: restore it afterwards
    torch.random.set_rng_state(torch_state)
    init_random_weights(model, seed)
    with torch.no_grad():
        model.llm.lm_head.weight[tokenizer.convert_tokens_to_ids("<|im_end|>")] *= EOS_ROW_SCALE
    return model.eval()


def is_demo_checkpoint(out_dir, seed: int) -> bool:
    """Whether ``out_dir`` already holds the demo checkpoint of this seed and recipe version."""
    out_dir = Path(out_dir)
    if not all((out_dir / name).is_file() for name in REQUIRED_FILES) or not (out_dir / MARKER_FILE).is_file():
        return False
    try:
        marker = json.loads((out_dir / MARKER_FILE).read_text())
        config = json.loads((out_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    same_format = config.get("format") == FORMAT and config.get("format_version") == FORMAT_VERSION
    return same_format and marker == _marker(seed)


def build_demo_checkpoint(out_dir, seed: int = 0, force: bool = False) -> Path:
    """Write the demo checkpoint to ``out_dir`` unless it already holds the same one (or ``force``).

    Refuses (``ValueError``) to overwrite a different checkpoint without ``force``.
    """
    out_dir = Path(out_dir)
    if not force:
        if is_demo_checkpoint(out_dir, seed):
            logger.info("%s already holds the demo checkpoint (seed %d)", out_dir, seed)
            return out_dir
        if (out_dir / CONFIG_FILE).exists():
            raise ValueError(f"{out_dir} holds another checkpoint; pass force=True (--force) to overwrite it")
    tokenizer = demo_tokenizer()
    cfg = demo_model_config(len(tokenizer))
    model = build_demo_model(cfg, tokenizer, seed)
    (out_dir / MARKER_FILE).unlink(missing_ok=True)  # the marker is written last: it vouches for the rest
    save_checkpoint(out_dir, model, cfg, tokenizer, dtype="float32")
    (out_dir / MARKER_FILE).write_text(json.dumps(_marker(seed)) + "\n")
    logger.info("wrote the demo checkpoint (seed %d) to %s", seed, out_dir)
    return out_dir


def _marker(seed: int) -> dict:
    return {"demo_version": DEMO_VERSION, "seed": seed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the deterministic InfiniSST demo checkpoint.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT_DIR holds a checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        build_demo_checkpoint(args.out_dir, seed=args.seed, force=args.force)
    except ValueError as e:
        parser.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
