"""The fairseq wav2vec 2.0 checkpoint: the speech encoder's architecture and, as a last resort, its weights.

The file is read by the restricted unpickler (:mod:`.unpickler`); its config becomes our
:class:`~infinisst_backend.config.SpeechEncoderConfig`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from infinisst_backend.config import SpeechEncoderConfig
from infinisst_backend.model.convert.keys import W2V_PREFIX
from infinisst_backend.model.convert.unpickler import load_restricted, plain

# fairseq Wav2Vec2Config defaults, for fields a checkpoint leaves out (fairseq fills them the same way).
_FAIRSEQ_DEFAULTS = {
    "extractor_mode": "default",
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "conv_feature_layers": "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
    "conv_bias": False,
}
_EXTRACTOR_MODES = {"layer_norm": "layer_norm", "default": "group_norm"}  # fairseq name -> ours


@dataclass(slots=True)
class FairseqCheckpoint:
    """What a fairseq wav2vec 2.0 checkpoint supplies: the encoder hyper-parameters and its weights."""

    encoder_args: dict  # Wav2Vec2Config fields (encoder_embed_dim, conv_feature_layers, ...)
    weights: dict[str, Tensor]  # Wav2Vec2Model state dict (no prefix)


def read_fairseq_checkpoint(path) -> FairseqCheckpoint:
    """Read a fairseq wav2vec 2.0 ``.pt`` without fairseq and without running code from it.

    Accepts fine-tuned (``w2v_encoder.w2v_model.*`` weights, encoder config in ``cfg.model.w2v_args``) and
    pretrained checkpoints, with the config as plain dicts, omegaconf objects or an ``argparse.Namespace``
    (``args``, older fairseq). Raises ``ValueError`` naming the problem.
    """
    path = Path(path)
    state = load_restricted(path)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ValueError(f"{path} is not a fairseq checkpoint: expected a dict with a 'model' state dict")
    cfg, args = plain(state.get("cfg")), plain(state.get("args"))
    model_cfg = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model_cfg, dict):
        model_cfg = args  # fairseq before hydra: one flat Namespace
    if not isinstance(model_cfg, dict):
        raise ValueError(f"{path} has neither cfg['model'] nor args: cannot tell the encoder's architecture")
    w2v_args = model_cfg.get("w2v_args")
    if isinstance(w2v_args, dict):  # fine-tuned: the pretraining config, hydra-style ({'model': ...}) or flat
        encoder_args = w2v_args["model"] if isinstance(w2v_args.get("model"), dict) else w2v_args
    elif "encoder_embed_dim" in model_cfg or "conv_feature_layers" in model_cfg:  # a pretrained checkpoint
        encoder_args = model_cfg
    else:
        raise ValueError(f"{path}: cfg['model'] has no w2v_args (the encoder config) and no encoder fields")
    weights = state["model"]
    if any(k.startswith(W2V_PREFIX) for k in weights):
        weights = {k[len(W2V_PREFIX) :]: v for k, v in weights.items() if k.startswith(W2V_PREFIX)}
    weights = {k: v for k, v in weights.items() if isinstance(v, Tensor)}
    return FairseqCheckpoint(encoder_args=encoder_args, weights=weights)


def parse_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """fairseq's ``conv_feature_layers`` string, e.g. ``"[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"``.

    A tiny parser instead of eval: a sum of terms, each a list of (dim, kernel, stride) tuples, optionally
    repeated (``[...] * n`` or ``n * [...]``).
    """
    tokens = re.findall(r"\d+|\S", spec)
    pos = 0

    def take(expected: str | None = None) -> str:
        nonlocal pos
        found = tokens[pos] if pos < len(tokens) else None
        if found is None or (expected is not None and found != expected) or (expected is None and not found.isdigit()):
            raise ValueError(
                f"invalid conv_feature_layers {spec!r}: expected {repr(expected) if expected else 'a number'}, "
                f"found {repr(found) if found else 'the end'}"
            )
        pos += 1
        return found

    def peek(token: str) -> bool:
        return pos < len(tokens) and tokens[pos] == token

    def layer() -> tuple[int, int, int]:
        take("(")
        dim = int(take())
        take(",")
        kernel = int(take())
        take(",")
        stride = int(take())
        if peek(","):
            take(",")
        take(")")
        return dim, kernel, stride

    def term() -> list[tuple[int, int, int]]:
        repeat = 1
        if pos < len(tokens) and tokens[pos].isdigit():
            repeat = int(take())
            take("*")
        take("[")
        layers = [layer()]
        while peek(","):
            take(",")
            layers.append(layer())
        take("]")
        while peek("*"):
            take("*")
            repeat *= int(take())
        return layers * repeat

    layers = term()
    while pos < len(tokens):
        take("+")
        layers += term()
    if not layers:
        raise ValueError(f"invalid conv_feature_layers {spec!r}: no layers")
    return layers


def speech_config(
    encoder_args: dict, rope_variant: str, adapter_layers: int, max_cache_frames: int = 576
) -> SpeechEncoderConfig:
    """Our encoder config from fairseq's Wav2Vec2Config fields (missing fields get fairseq's defaults)."""
    args = {**_FAIRSEQ_DEFAULTS, **{k: v for k, v in encoder_args.items() if v is not None}}
    for name in _FAIRSEQ_DEFAULTS:
        if isinstance(args[name], str) and (args[name].startswith("${") or args[name] == "???"):
            raise ValueError(f"wav2vec 2.0 config field {name}={args[name]!r} is unresolved (interpolation or ???)")
    if not args["layer_norm_first"]:
        raise ValueError("wav2vec 2.0 config has layer_norm_first=False; InfiniSST's encoder is pre-LN (True)")
    if args["activation_fn"] != "gelu":
        raise ValueError(f"wav2vec 2.0 config has activation_fn={args['activation_fn']!r}; only 'gelu' is supported")
    if args["extractor_mode"] not in _EXTRACTOR_MODES:
        raise ValueError(f"wav2vec 2.0 config has extractor_mode={args['extractor_mode']!r}: unknown")
    conv_layers = parse_conv_layers(str(args["conv_feature_layers"]))
    try:
        cfg = _speech_config(args, conv_layers, rope_variant, adapter_layers, max_cache_frames)
    except (TypeError, ValueError) as e:
        raise ValueError(f"wav2vec 2.0 config: invalid field: {e}") from e
    return cfg


def _speech_config(args: dict, conv_layers, rope_variant: str, adapter_layers: int, max_cache_frames: int):
    cfg = SpeechEncoderConfig(
        conv_layers=conv_layers,
        conv_bias=bool(args["conv_bias"]),
        extractor_mode=_EXTRACTOR_MODES[args["extractor_mode"]],
        embed_dim=int(args["encoder_embed_dim"]),
        num_layers=int(args["encoder_layers"]),
        num_heads=int(args["encoder_attention_heads"]),
        ffn_dim=int(args["encoder_ffn_embed_dim"]),
        rope_variant=rope_variant,
        max_cache_frames=max_cache_frames,
        adapter_layers=adapter_layers,
    )
    cfg.validate()
    return cfg
