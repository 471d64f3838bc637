"""Convert the released InfiniSST files into a checkpoint directory (docs/real-checkpoints.md).

Inputs (all local; nothing is downloaded):

* the Hugging Face directory of the LLM (``config.json``, ``*.safetensors`` shards, tokenizer files):
  Llama-3.1-8B-Instruct (the paper) or Qwen2.5-7B-Instruct (the ``flashinfer`` branch);
* the fairseq wav2vec 2.0 checkpoint (``wav2vec_vox_960h_pl.pt``): it supplies the encoder's architecture
  (``cfg.model.w2v_args``) and, as a last resort, encoder weights. It is read by a restricted unpickler that
  builds only tensors, containers and inert stand-ins for config objects, and refuses anything else;
* InfiniSST's ``pytorch_model.bin`` (``torch.load(weights_only=True)``): the whole model for the Llama release,
  the speech encoder, adapter and projection for Qwen's stage 1;
* for the Qwen variant, the stage-2 LoRA state dict, merged as ``W + (alpha / r) * B @ A``.

Weights are resolved per key in priority order: LoRA file (its full weights), ``pytorch_model.bin``, the LLM's
safetensors, the wav2vec 2.0 ``.pt``, which is what the reference's sequence of ``load_state_dict`` calls gives.
They are streamed one tensor at a time into ``model.safetensors``, so memory stays at about one tensor whatever
the model size.

Usage: ``python -m infinisst_backend.model.convert OUT_DIR --llm DIR --wav2vec FILE.pt --state-dict FILE.bin
[--lora FILE.bin] [--dtype bfloat16] ...`` (``--help`` lists every option).
"""

from __future__ import annotations

import _compat_pickle
import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import pickle
import re
import sys
import tarfile
import types
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm.auto import tqdm

from infinisst_backend.config import DTYPES, LLMConfig, ModelConfig, PromptConfig, SpeechEncoderConfig
from infinisst_backend.model.checkpoint import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    check_tokenizer,
    load_tokenizer,
    parameters_without_memory,
    read_config,
)
from infinisst_backend.model.infinisst import LM_HEAD_KEY, SPEECH_PREFIX, InfiniSSTModel

logger = logging.getLogger(__name__)

CONVERSION_FILE = "conversion.json"  # provenance: inputs, detected variants, dropped keys, added tokens
EMBED_KEY = "model.embed_tokens.weight"
VOCAB_KEYS = (EMBED_KEY, LM_HEAD_KEY)
ENCODER_PREFIX = SPEECH_PREFIX + "speech_encoder."  # our names of fairseq's Wav2Vec2Model
W2V_PREFIX = "w2v_encoder.w2v_model."  # the same module inside a fine-tuned fairseq checkpoint
LORA_PREFIX = "base_model.model."  # PEFT wraps the model: base_model (LoraModel) . model (the LLM)
DEFAULT_LORA_ALPHA = 16.0  # the reference's LoraConfig(lora_alpha=16)
DEFAULT_LATENCY_TOKENS = 4  # the paper's <latency_1..4>

# Tokens InfiniSST's preprocess() appends (docs/model.md §1.4, §7.1): speech tokens, latency tokens (Llama), then the
# pad token the agent sets if the tokenizer lacks it (Qwen2.5 does: its ids end up 151665..151668).
SPEECH_TOKENS = ("<sp_patch>", "<sp_start>", "<sp_end>")
PAD_TOKEN = "<|finetune_right_pad_id|>"
LATENCY_TOKEN = "<latency_{}>"
PAPER_SYSTEM_TEXT = PromptConfig().system_text  # "... with latency {latency}." (release branch, Llama-3.1)
INTERPRETER_SYSTEM_TEXT = "Translate the following speeches from English to {language} as a simultaneous interpreter."
DEFAULT_EOS = {
    "llama3": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    "chatml": ["<|im_end|>", "<|endoftext|>"],
}

# Keys of InfiniSST's state dict that our model does not use (docs/model.md §1.2): the pretraining mask embedding,
# the convolutional positional embedding that RoPE replaced, HF rotary buffers (derived from the config).
_UNUSED_KEY = re.compile(
    r"^model\.speech_encoder\.speech_encoder\.(mask_emb|encoder\.pos_conv\..*)$|\.rotary_emb\.inv_freq$"
)
_FREQS_KEY = re.compile(r"^model\.speech_encoder\.speech_encoder\.encoder\.layers\.\d+\.self_attn\.rotary_emb\.freqs$")
_ADAPTER_KEY = re.compile(r"^model\.speech_encoder\.length_shrink\.conv_layers\.(\d+)\.")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")

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

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TORCH_DTYPES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


# ================================================================================================================
# Restricted unpickling of the fairseq checkpoint


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global that a checkpoint of tensors and configs never needs."""


class _Stub:
    """Inert stand-in for a class or function a fairseq pickle names (``argparse.Namespace``, omegaconf
    containers and nodes, enums, dataclass types, numpy scalars). It records the arguments and state the pickle
    gives it and never runs any code of the object it stands for; :func:`plain` turns it into plain data."""

    qualified_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state, obj.items = args, None, []
        return obj

    def __init__(self, *args, **kwargs):
        pass  # the arguments were recorded by __new__ (REDUCE calls both, NEWOBJ only __new__)

    def __setstate__(self, state):  # BUILD
        self.state = state

    def __setitem__(self, key, value):  # SETITEMS on a dict subclass
        self.items.append((key, value))

    def append(self, value):  # APPENDS on a list subclass
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)


_STUB_CLASSES: dict[str, type[_Stub]] = {}
# Modules whose globals become inert stubs: where fairseq's configs, enums and bookkeeping objects live.
_STUB_MODULES = ("omegaconf", "typing", "fairseq", "fairseq_cli", "hydra", "numpy", "enum", "pathlib", "__main__")
_STUB_NAMES = {("argparse", "Namespace"), ("operator", "getitem")}  # getitem: how typing generics pickle
# Real globals that are safe to call with any arguments: tensor rebuilding and plain containers.
_REAL_NAMES = {
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("_codecs", "encode"),  # how protocol-2 pickles store bytes
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
} | {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "str", "int", "float", "bool", "bytes")}


def _stub_class(qualified_name: str) -> type[_Stub]:
    if qualified_name not in _STUB_CLASSES:
        name = qualified_name.rsplit(".", 1)[-1]
        _STUB_CLASSES[qualified_name] = type(name, (_Stub,), {"qualified_name": qualified_name})
    return _STUB_CLASSES[qualified_name]


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose only globals are those listed above; torch's storage classes are resolved by
    ``torch.load``'s own wrapper before they reach :meth:`find_class`."""

    def find_class(self, module: str, name: str):
        # Protocol-2 pickles name Python 2 modules (__builtin__.unicode, copy_reg, ...): map them as pickle does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _REAL_NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _STUB_NAMES or module.split(".")[0] in _STUB_MODULES:
            return _stub_class(f"{module}.{name}")
        raise UnsafePickleError(
            f"the pickle references {module}.{name}, which a checkpoint of tensors and configs never needs; "
            "refusing to load it (the file is corrupt, or not what it claims to be)"
        )


def _restricted_load(file, **kwargs):
    return _RestrictedUnpickler(file, **kwargs).load()


# torch.load(pickle_module=...) takes a module-like object with Unpickler and load.
_RESTRICTED_PICKLE = types.ModuleType("infinisst_restricted_pickle")
_RESTRICTED_PICKLE.Unpickler = _RestrictedUnpickler
_RESTRICTED_PICKLE.load = _restricted_load


def plain(obj, depth: int = 0):
    """Plain dicts/lists/scalars from unpickled config objects (Namespace, omegaconf containers, enums).

    omegaconf containers keep their entries in ``_content`` and value nodes their value in ``_val``; an enum
    member is pickled as a call ``Enum(value)``. Other stubs (metadata, types) become None.
    """
    if depth > 64:
        raise ValueError("config nested more than 64 levels deep")
    if isinstance(obj, _Stub):
        return _plain_stub(obj, depth)
    if isinstance(obj, dict):
        return {k: plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v, depth + 1) for v in obj]
    return obj


def _plain_stub(obj: _Stub, depth: int):
    state = obj.state
    if obj.qualified_name == "argparse.Namespace" and isinstance(state, dict):
        return plain(state, depth + 1)
    if isinstance(state, dict) and "_content" in state:  # DictConfig / ListConfig ("???" = missing)
        content = state["_content"]
        return None if content == "???" else plain(content, depth + 1)
    if isinstance(state, dict) and "_val" in state:  # AnyNode, StringNode, IntegerNode, EnumNode, ...
        return plain(state["_val"], depth + 1)
    if obj.items:
        if all(isinstance(item, tuple) and len(item) == 2 for item in obj.items):
            return {k: plain(v, depth + 1) for k, v in obj.items}
        return [plain(v, depth + 1) for v in obj.items]
    if len(obj.args) == 1 and state is None:  # Enum(value)
        return plain(obj.args[0], depth + 1)
    return None


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
    state = _torch_load_restricted(path)
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


def _torch_load_restricted(path: Path):
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        with zipfile.ZipFile(path) as archive:
            if any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist()):
                raise ValueError(f"{path} is a TorchScript archive, not a checkpoint; refusing to load it")
    elif tarfile.is_tarfile(path):
        raise ValueError(f"{path} uses torch's pre-1.0 tar format; re-save it with a recent torch")
    try:
        return torch.load(path, map_location="cpu", pickle_module=_RESTRICTED_PICKLE, weights_only=False, mmap=is_zip)
    except UnsafePickleError as e:
        raise ValueError(f"{path}: {e}") from None
    except Exception as e:  # corrupt or truncated file: torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise ValueError(f"cannot read {path}: {type(e).__name__}: {e}") from e


# ================================================================================================================
# Configuration


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


def _generation_eos_ids(llm_dir: Path) -> list[int] | None:
    """eos_token_id of generation_config.json (the EOS set of generate(), docs/model.md §5.4), if present."""
    try:
        eos = json.loads((llm_dir / "generation_config.json").read_text()).get("eos_token_id")
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    eos = [eos] if isinstance(eos, int) else eos
    return [int(i) for i in eos] if isinstance(eos, list) and eos else None


# ================================================================================================================
# Tokenizer


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


# ================================================================================================================
# Weight sources


@dataclass(slots=True)
class TensorSource:
    """The tensors of one input under our key names, read lazily (memory-mapped files)."""

    label: str  # names the input in messages
    entries: dict[str, tuple[str, tuple[int, ...], torch.dtype]]  # our key -> (key in the file, shape, dtype)
    reader: Callable[[str], Tensor]  # key in the file -> tensor
    trained: bool  # InfiniSST's own files: their vocabulary rows must match the tokenizer exactly

    @classmethod
    def from_state_dict(cls, label: str, sd: dict[str, Tensor], trained: bool) -> TensorSource:
        entries = {k: (k, tuple(v.shape), v.dtype) for k, v in sd.items()}
        return cls(label, entries, sd.__getitem__, trained)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key][2]

    def read(self, key: str) -> Tensor:
        return self.reader(self.entries[key][0])

    def renamed(self, rename: Callable[[str], str | None]) -> TensorSource:
        """The same tensors under ``rename(key)``; keys renamed to None are left out."""
        entries = {new: entry for key, entry in self.entries.items() if (new := rename(key)) is not None}
        return TensorSource(self.label, entries, self.reader, self.trained)


def open_tensor_file(path: Path, stack: contextlib.ExitStack, trained: bool) -> TensorSource:
    """A flat state dict: a ``.safetensors`` file or a torch pickle (``weights_only=True``, memory-mapped)."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        return _safetensors_source(path.name, [path], stack, trained)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # UnpicklingError (a forbidden global), RuntimeError/EOFError (corrupt, truncated)
        raise ValueError(f"cannot read {path} as a state dict: {type(e).__name__}: {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise ValueError(f"{path} is not a flat state dict (a dict of name -> tensor)")
    return TensorSource.from_state_dict(path.name, sd, trained)


def hf_weights(llm_dir: Path, stack: contextlib.ExitStack) -> TensorSource:
    """The LLM directory's safetensors weights (sharded with model.safetensors.index.json, or not)."""
    index = llm_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e!r}") from e
        files = [llm_dir / name for name in names]
    else:
        files = sorted(llm_dir.glob("*.safetensors"))
    label = f"{llm_dir.name}/*.safetensors" if files else f"{llm_dir} (no *.safetensors)"
    return _safetensors_source(label, files, stack, trained=False)


def _safetensors_source(label: str, files: list[Path], stack: contextlib.ExitStack, trained: bool) -> TensorSource:
    entries, handles = {}, {}
    for file in files:
        try:
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            for key in handle.keys():
                info = handle.get_slice(key)
                dtype = _TORCH_DTYPES.get(info.get_dtype())
                if dtype is None:
                    raise ValueError(f"{file}: {key} has unsupported dtype {info.get_dtype()}")
                entries[key] = (key, tuple(info.get_shape()), dtype)
                handles[key] = handle
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {file}: {e}") from e
    return TensorSource(label, entries, lambda key: handles[key].get_tensor(key), trained)


@dataclass(slots=True)
class LoRA:
    """LoRA pairs by target weight (our key): A [r, in], B [out, r]; merged as W + alpha / r * B @ A."""

    pairs: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    alpha: float = DEFAULT_LORA_ALPHA

    def delta(self, key: str, dtype: torch.dtype) -> Tensor | None:
        """alpha / r * B @ A in ``dtype`` for the weight ``key``, or None if it has no LoRA pair."""
        if key not in self.pairs:
            return None
        a, b = self.pairs[key]
        return (self.alpha / a.shape[0]) * (b.to(dtype) @ a.to(dtype))


def split_lora(source: TensorSource, alpha: float) -> tuple[LoRA, TensorSource]:
    """Split a PEFT state dict into LoRA pairs and the full weights it also holds, both under our key names.

    Keys look like ``base_model.model.<module>.lora_{A,B}[.<adapter>].weight``; full weights of the wrapped
    layers are ``base_model.model.<module>.base_layer.{weight,bias}``, others ``base_model.model.<name>``.
    """
    halves: dict[str, dict[str, Tensor]] = {}
    adapters, unsupported = set(), []
    for key in source.entries:
        name = key.removeprefix(LORA_PREFIX)
        match = _LORA_KEY.match(name)
        if match:
            halves.setdefault(match["module"] + ".weight", {})[match["ab"]] = source.read(key)
            adapters.add(match["adapter"])
        elif re.search(r"\.lora_(embedding_[AB]|magnitude_vector)\b", name):
            unsupported.append(key)
    if unsupported:
        raise ValueError(f"{source.label}: unsupported LoRA tensors (embedding LoRA, DoRA): {_listing(unsupported)}")
    if len(adapters) > 1:
        raise ValueError(f"{source.label}: holds several LoRA adapters {sorted(map(str, adapters))}; expected one")
    incomplete = sorted(k for k, h in halves.items() if set(h) != {"A", "B"})
    if incomplete:
        raise ValueError(f"{source.label}: LoRA weight(s) without their A or B half: {_listing(incomplete)}")

    def full_name(key: str) -> str | None:
        name = key.removeprefix(LORA_PREFIX)
        return None if _LORA_KEY.match(name) else name.replace(".base_layer.", ".")

    return LoRA({k: (h["A"], h["B"]) for k, h in halves.items()}, alpha), source.renamed(full_name)


# ================================================================================================================
# Planning: which tensor of which source becomes which output tensor


@dataclass(slots=True)
class PlannedTensor:
    """One output tensor: its name, shape and dtype in the file, and the source it is read from."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: TensorSource


def plan_weights(
    expected: dict[str, tuple[int, ...]], sources: list[TensorSource], lora: LoRA, dtype: torch.dtype
) -> tuple[list[PlannedTensor], list[str]]:
    """Pick each expected tensor from the first source that has it; return (plan, problems).

    Floating tensors are stored in ``dtype``, others as they are.
    Vocabulary matrices may differ in rows when taken from the base LLM (resized like transformers'
    ``resize_token_embeddings``); InfiniSST's own files must match exactly. LoRA pairs must fit their target.
    """
    plan, problems, missing = [], [], []
    for name, shape in expected.items():
        source = next((s for s in sources if name in s.entries), None)
        if source is None:
            missing.append(name)
            continue
        got = source.shape(name)
        resizable = name in VOCAB_KEYS and not source.trained and got[1:] == shape[1:]
        if got != shape and not resizable:
            problems.append(f"{name}: {source.label} has shape {list(got)}, the model needs {list(shape)}")
        stored = dtype if source.dtype(name).is_floating_point else source.dtype(name)
        plan.append(PlannedTensor(name, shape, stored, source))
    if missing:
        searched = ", ".join(s.label for s in sources)
        problems.append(f"missing tensor(s) ({len(missing)}), in none of [{searched}]: {_listing(missing)}")
    for key, (a, b) in lora.pairs.items():
        shape = expected.get(key)
        if shape is None or len(shape) != 2 or key in VOCAB_KEYS:
            problems.append(f"LoRA target {key} is not a linear layer of the model")
        elif a.ndim != 2 or b.ndim != 2 or a.shape[1] != shape[1] or b.shape[0] != shape[0] or a.shape[0] != b.shape[1]:
            problems.append(
                f"LoRA {key}: A {list(a.shape)} and B {list(b.shape)} do not fit the weight {list(shape)} "
                "(expected A [r, in], B [out, r])"
            )
    return plan, problems


def materialize(item: PlannedTensor, lora: LoRA) -> Tensor:
    """The output tensor: read, resize vocabulary rows if needed, merge LoRA, cast (floating tensors only)."""
    tensor = item.source.read(item.name)
    if not tensor.is_floating_point():
        return tensor.contiguous()
    compute = torch.promote_types(item.dtype, torch.float32)  # resize and merge in >= fp32, then round once
    if tensor.shape[0] != item.shape[0]:
        tensor = resize_rows(tensor.to(compute), item.shape[0])
    delta = lora.delta(item.name, compute)
    if delta is not None:
        tensor = tensor.to(compute) + delta
    return tensor.to(item.dtype).contiguous()


def resize_rows(matrix: Tensor, rows: int) -> Tensor:
    """Vocabulary matrix with ``rows`` rows, as transformers' resize does: keep the first rows; new rows (only
    when the tokenizer outgrew the matrix) get the mean of the existing rows, a deterministic init."""
    if rows <= matrix.shape[0]:
        return matrix[:rows]
    mean = matrix.to(torch.float64).mean(dim=0, keepdim=True).to(matrix.dtype)
    return torch.cat([matrix, mean.expand(rows - matrix.shape[0], -1)])


# ================================================================================================================
# Streaming safetensors writer


def write_safetensors(path: Path, plan: list[PlannedTensor], produce: Callable[[int], Tensor], progress: bool) -> None:
    """Write a safetensors file whose i-th tensor is ``produce(i)``, holding one tensor in memory at a time.

    The header comes first, computed from the plan's names, shapes and dtypes (file order = plan order).
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; writing them on a big-endian host is not supported")
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for item in plan:
        nbytes = item.dtype.itemsize * math.prod(item.shape)
        header[item.name] = {
            "dtype": _SAFETENSORS_DTYPES[item.dtype],
            "shape": list(item.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned
    with (
        open(path, "wb") as f,
        tqdm(total=offset, unit="B", unit_scale=True, desc=WEIGHTS_FILE, disable=not progress) as bar,
    ):
        f.write(len(blob).to_bytes(8, "little") + blob)
        for i, item in enumerate(plan):
            tensor = produce(i)
            if tuple(tensor.shape) != item.shape or tensor.dtype != item.dtype:  # a bug, not a user error
                raise RuntimeError(
                    f"{item.name}: made {tensor.dtype}{list(tensor.shape)}, planned {item.dtype}{list(item.shape)}"
                )
            f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            bar.update(tensor.numel() * item.dtype.itemsize)


# ================================================================================================================
# Conversion


@dataclass(slots=True)
class _Inputs:
    """The opened inputs of one conversion."""

    hf_config: dict
    tokenizer: object
    tokens: list[str]  # InfiniSST's tokens in the tokenizer
    sources: list[TensorSource]  # priority order
    lora: LoRA
    encoder_args: dict  # the fairseq encoder config
    dropped: list[str]  # keys of InfiniSST's files that the model does not use


def convert(
    out_dir,
    *,
    llm_dir,
    wav2vec,
    state_dict,
    lora=None,
    dtype: str = "bfloat16",
    lora_alpha: float = DEFAULT_LORA_ALPHA,
    speech_rope: str = "auto",
    system_text: str | None = None,
    max_cache_frames: int = 576,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert the released files into a checkpoint directory at ``out_dir``; return its path.

    ``llm_dir``: Hugging Face directory of the LLM; ``wav2vec``: fairseq ``.pt``; ``state_dict``: InfiniSST's
    ``pytorch_model.bin``; ``lora``: the stage-2 LoRA state dict, if any. ``speech_rope`` is "auto"
    (interleaved if the state dict has ``rotary_emb.freqs`` keys, else half), "interleaved" or "half";
    ``system_text`` overrides the family's default prompt text. Raises ``ValueError`` naming every problem
    (unreadable or unsafe file, missing key, shape mismatch) before anything is written.
    """
    out_dir, llm_dir = Path(out_dir), Path(llm_dir)
    if dtype not in DTYPES:
        raise ValueError(f"invalid dtype={dtype!r}: expected one of {DTYPES}")
    if speech_rope not in ("auto", "interleaved", "half"):
        raise ValueError(f"invalid speech_rope={speech_rope!r}: expected 'auto', 'interleaved' or 'half'")
    if (out_dir / CONFIG_FILE).exists() and not force:
        raise ValueError(f"{out_dir} already holds a checkpoint; pass force=True (--force) to overwrite it")
    lora_path = Path(lora) if lora is not None else None
    with contextlib.ExitStack() as stack:
        inputs = _open_inputs(llm_dir, Path(wav2vec), Path(state_dict), lora_path, lora_alpha, stack)
        cfg = _model_config(inputs, llm_dir, dtype, speech_rope, system_text, max_cache_frames)
        expected = _expected_shapes(cfg)
        plan, problems = plan_weights(expected, inputs.sources, inputs.lora, getattr(torch, dtype))
        problems = _unexpected_keys(inputs.sources, expected) + problems
        if problems:
            raise ValueError("cannot convert:\n  " + "\n  ".join(problems))
        check_tokenizer(inputs.tokenizer, cfg, where=f"the tokenizer of {llm_dir}")
        _write(out_dir, cfg, inputs, plan, progress)
        provenance = {"llm_dir": llm_dir, "wav2vec": wav2vec, "state_dict": state_dict, "lora": lora}
        _write_provenance(out_dir, inputs, cfg, {k: v and str(v) for k, v in provenance.items()})
    _verify(out_dir, expected)
    logger.info("wrote %s (%d tensors, %s)", out_dir, len(plan), dtype)
    return out_dir


def _open_inputs(
    llm_dir: Path, wav2vec: Path, state_dict: Path, lora_path: Path | None, alpha: float, stack
) -> _Inputs:
    hf_config = read_hf_config(llm_dir)
    trained: list[TensorSource] = []  # InfiniSST's own files, the later training stage first
    lora = LoRA(alpha=alpha)
    if lora_path is not None:
        lora, full = split_lora(open_tensor_file(lora_path, stack, trained=True), alpha)
        trained.append(full)
    trained.append(open_tensor_file(state_dict, stack, trained=True))
    dropped = []
    for source in trained:  # keys the model does not use are dropped before anything looks at them
        unused = sorted(k for k in source.entries if _UNUSED_KEY.search(k))
        if hf_config.get("tie_word_embeddings") and LM_HEAD_KEY in source.entries:
            unused.append(LM_HEAD_KEY)  # a tied head is the embedding matrix
        dropped += [f"{source.label}: {k}" for k in unused]
        for k in unused:
            del source.entries[k]
    rows = next((s.shape(EMBED_KEY)[0] for s in trained if EMBED_KEY in s.entries), None)
    tokenizer, tokens = prepare_tokenizer(llm_dir, hf_config["model_type"], rows)
    if rows is not None and rows != len(tokenizer):
        raise ValueError(f"{EMBED_KEY} has {rows} rows but the tokenizer with InfiniSST's tokens has {len(tokenizer)}")
    fairseq = read_fairseq_checkpoint(wav2vec)
    speech = TensorSource.from_state_dict(wav2vec.name, fairseq.weights, trained=False)
    sources = [*trained, hf_weights(llm_dir, stack), speech.renamed(lambda k: ENCODER_PREFIX + k)]
    return _Inputs(hf_config, tokenizer, tokens, sources, lora, fairseq.encoder_args, dropped)


def _model_config(inputs: _Inputs, llm_dir: Path, dtype: str, speech_rope: str, system_text, max_cache_frames):
    trained_keys = [k for s in inputs.sources if s.trained for k in s.entries]
    has_freqs = any(_FREQS_KEY.match(k) for k in trained_keys)
    rope_variant = speech_rope if speech_rope != "auto" else ("interleaved" if has_freqs else "half")
    adapter_ids = {int(m[1]) for k in trained_keys if (m := _ADAPTER_KEY.match(k))}
    adapter_layers = max(adapter_ids) + 1 if adapter_ids else 2
    speech = speech_config(inputs.encoder_args, rope_variant, adapter_layers, max_cache_frames)
    llm = llm_config(inputs.hf_config, vocab_size=len(inputs.tokenizer))
    eos_ids = _generation_eos_ids(llm_dir)
    num_latency = sum(t.startswith("<latency_") for t in inputs.tokens)
    prompt = prompt_config(llm.architecture, inputs.tokenizer, eos_ids, num_latency, system_text)
    cfg = ModelConfig(speech_encoder=speech, llm=llm, prompt=prompt, dtype=dtype)
    cfg.validate()
    logger.info(
        "%s LLM (vocabulary %d), %d-layer speech encoder with %s RoPE%s",
        llm.architecture,
        llm.vocab_size,
        speech.num_layers,
        rope_variant,
        "" if speech_rope == "auto" else " (forced)",
    )
    return cfg


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the checkpoint tensors of ``cfg`` (from a model on the meta device: no memory)."""
    try:
        with parameters_without_memory():
            model = InfiniSSTModel(cfg)
    except ValueError as e:
        raise ValueError(f"the inputs describe a model this backend cannot build: {e}") from e
    return {k: tuple(v.shape) for k, v in model.checkpoint_state_dict().items()}


def _unexpected_keys(sources: list[TensorSource], expected: dict) -> list[str]:
    """InfiniSST's own files must hold nothing the model lacks (the reference loads them strictly)."""
    problems = []
    for source in sources:
        extra = sorted(set(source.entries) - set(expected)) if source.trained else []
        if extra:
            problems.append(f"{source.label} has tensor(s) the model does not have: {_listing(extra)}")
    return problems


def _write(out_dir: Path, cfg: ModelConfig, inputs: _Inputs, plan: list[PlannedTensor], progress: bool) -> None:
    """Weights and tokenizer first, config.json last: a directory with a config.json is complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).unlink(missing_ok=True)
    tmp = out_dir / (WEIGHTS_FILE + ".tmp")
    try:
        write_safetensors(tmp, plan, lambda i: materialize(plan[i], inputs.lora), progress)
        tmp.chmod(0o644)
        os.replace(tmp, out_dir / WEIGHTS_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    inputs.tokenizer.save_pretrained(str(out_dir))
    config = {**cfg.to_dict(), "format": FORMAT, "format_version": FORMAT_VERSION}
    tmp = out_dir / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out_dir / CONFIG_FILE)


def _write_provenance(out_dir: Path, inputs: _Inputs, cfg: ModelConfig, paths: dict) -> None:
    record = {
        "inputs": paths,
        "speech_rope": cfg.speech_encoder.rope_variant,
        "lora": {
            "alpha": inputs.lora.alpha,
            "ranks": sorted({a.shape[0] for a, _ in inputs.lora.pairs.values()}),
            "merged_weights": len(inputs.lora.pairs),
        },
        "vocab_size": cfg.llm.vocab_size,
        "infinisst_tokens": dict(zip(inputs.tokens, inputs.tokenizer.convert_tokens_to_ids(inputs.tokens))),
        "dropped_keys": inputs.dropped,
    }
    (out_dir / CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _verify(out_dir: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Re-read what was written: config, tokenizer, tensor names and shapes (no tensor data)."""
    cfg = read_config(out_dir)
    check_tokenizer(load_tokenizer(out_dir), cfg, where=str(out_dir))
    with safe_open(str(out_dir / WEIGHTS_FILE), framework="pt", device="cpu") as f:
        written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if written != expected:
        raise RuntimeError(f"{out_dir / WEIGHTS_FILE} does not hold the planned tensors")


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# ================================================================================================================
# Command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m infinisst_backend.model.convert",
        description="Convert the released InfiniSST files into a checkpoint directory (docs/real-checkpoints.md).",
    )
    parser.add_argument("out_dir", type=Path, help="the checkpoint directory to write")
    parser.add_argument("--llm", required=True, type=Path, help="Hugging Face directory of Llama-3.1 / Qwen2.5")
    parser.add_argument("--wav2vec", required=True, type=Path, help="fairseq wav2vec 2.0 checkpoint (.pt)")
    parser.add_argument("--state-dict", required=True, type=Path, help="InfiniSST's pytorch_model.bin (stage 1)")
    parser.add_argument("--lora", type=Path, help="stage-2 LoRA state dict (Qwen2.5 variant)")
    parser.add_argument("--lora-alpha", type=float, default=DEFAULT_LORA_ALPHA, help="LoRA alpha (default 16)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="storage dtype (default bfloat16)")
    parser.add_argument(
        "--speech-rope",
        default="auto",
        choices=("auto", "interleaved", "half"),
        help="speech-encoder RoPE (auto: interleaved if the state dict has rotary_emb.freqs keys, else half)",
    )
    parser.add_argument("--system-text", help="system prompt text with {language} (and {latency}) fields")
    parser.add_argument("--max-cache-frames", type=int, default=576, help="speech encoder window (default 576)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT_DIR if it holds a checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        convert(
            args.out_dir,
            llm_dir=args.llm,
            wav2vec=args.wav2vec,
            state_dict=args.state_dict,
            lora=args.lora,
            dtype=args.dtype,
            lora_alpha=args.lora_alpha,
            speech_rope=args.speech_rope,
            system_text=args.system_text,
            max_cache_frames=args.max_cache_frames,
            force=args.force,
            progress=not args.no_progress,
        )
    except ValueError as e:
        parser.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
