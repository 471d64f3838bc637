"""The checkpoint directory format (docs/design.md "Checkpoint directory").

::

    config.json          ModelConfig.to_dict() plus {"format": "infinisst-backend", "format_version": 1}
    model.safetensors    weights under the released InfiniSST key names (docs/model.md §1.2)
    tokenizer files      HF fast tokenizer, written by save_pretrained (tokenizer_config.json, tokenizer.json, ...)

Loading never runs a random init: parameters are created without memory, then become the tensors read from
``model.safetensors``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from infinisst_backend.config import ModelConfig, dtype_name, torch_dtype
from infinisst_backend.model.infinisst import InfiniSSTModel
from infinisst_backend.text.prompt import PromptBuilder

logger = logging.getLogger(__name__)

FORMAT = "infinisst-backend"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_CONFIG_FILE)
_CONFIG_KEYS = {f.name for f in dataclasses.fields(ModelConfig)} | {"format", "format_version"}


def save_checkpoint(path, model: InfiniSSTModel, cfg: ModelConfig, tokenizer, dtype=None) -> Path:
    """Write ``model`` as a checkpoint directory at ``path`` (created if needed); return its path.

    ``dtype`` (name or torch dtype; default ``cfg.dtype``) is the storage dtype of floating tensors and is
    recorded in config.json. Raises ``ValueError`` if ``cfg`` does not describe ``model`` or the tokenizer
    lacks the prompt's tokens.
    """
    path = Path(path)
    saved_dtype = dtype_name(cfg.dtype if dtype is None else dtype)
    cfg = ModelConfig.from_dict({**cfg.to_dict(), "dtype": saved_dtype})  # a validated copy
    if model.cfg.llm != cfg.llm or model.cfg.speech_encoder != cfg.speech_encoder:
        raise ValueError("cfg.llm / cfg.speech_encoder differ from the configuration the model was built with")
    check_tokenizer(tokenizer, cfg)

    stored = torch_dtype(saved_dtype)
    tensors = {
        name: (t.detach().to("cpu", stored) if t.is_floating_point() else t.detach().cpu()).contiguous()
        for name, t in model.checkpoint_state_dict().items()
    }
    path.mkdir(parents=True, exist_ok=True)
    # Weights and tokenizer first, config.json last: a directory with a config.json is complete.
    with _atomic_path(path / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.chmod(0o644)  # safetensors creates the file owner-only; servers often run as another user
    tokenizer.save_pretrained(str(path))
    config = {**cfg.to_dict(), "format": FORMAT, "format_version": FORMAT_VERSION}
    with _atomic_path(path / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    logger.info("saved checkpoint %s (%d tensors, %s)", path, len(tensors), saved_dtype)
    return path


def load_checkpoint(path, device="cpu", dtype=None) -> tuple[InfiniSSTModel, object, ModelConfig]:
    """Load a checkpoint directory: ``(model, tokenizer, cfg)``.

    The model is on ``device`` in ``dtype`` (name or torch dtype; default: the stored ``cfg.dtype``), in
    eval mode with ``requires_grad`` off. Raises ``ValueError`` naming the problem for a missing file, a
    bad config.json, a tokenizer without the prompt's tokens, or weights that do not match the config.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint directory {path} does not exist")
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise ValueError(f"checkpoint {path} is missing {name}")
    cfg = read_config(path)
    dtype = torch_dtype(cfg.dtype if dtype is None else dtype)
    tokenizer = load_tokenizer(path)
    check_tokenizer(tokenizer, cfg, where=str(path))

    with parameters_without_memory():
        model = InfiniSSTModel(cfg)
    sd = _read_weights(path / WEIGHTS_FILE, device, dtype)
    try:
        model.load_checkpoint_state_dict(sd, strict=True, assign=True)
    except ValueError as e:
        raise ValueError(f"{path / WEIGHTS_FILE}: {e}") from e
    # Parameters are already on the device; this moves the buffers computed at construction (on CPU).
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    logger.info("loaded checkpoint %s on %s (%s)", path, device, dtype)
    return model, tokenizer, cfg


def _read_weights(file: Path, device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, floating ones cast to ``dtype``, on ``device``.

    One tensor at a time (memory-mapped reads), so casting or moving never holds two copies of the weights.
    """
    sd = {}
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                sd[name] = tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {file}: {e}") from e
    return sd


def read_config(path) -> ModelConfig:
    """Parse and validate ``config.json`` of a checkpoint directory (``ValueError`` naming the problem)."""
    file = Path(path) / CONFIG_FILE
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"checkpoint {Path(path)} is missing {CONFIG_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, not {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise ValueError(f"{file}: format={data.get('format')!r}, expected {FORMAT!r} (not an {FORMAT} checkpoint)")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{file}: unsupported format_version={version!r}, expected {FORMAT_VERSION}")
    unknown = sorted(set(data) - _CONFIG_KEYS)
    if unknown:
        raise ValueError(f"{file}: unknown field(s) {unknown}")
    body = {k: v for k, v in data.items() if k not in ("format", "format_version")}
    try:
        return ModelConfig.from_dict(body)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: {e}") from e


def load_tokenizer(path):
    """The checkpoint's HF tokenizer, from local files only."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"cannot load the tokenizer of checkpoint {path}: {e}") from e


def check_tokenizer(tokenizer, cfg: ModelConfig, where: str = "the tokenizer") -> None:
    """``ValueError`` unless the tokenizer has every token the prompt needs and fits the LLM vocabulary."""
    try:
        PromptBuilder(tokenizer, cfg.prompt)  # checks the speech, EOS, latency and template tokens
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    if len(tokenizer) > cfg.llm.vocab_size:
        raise ValueError(f"{where}: tokenizer has {len(tokenizer)} tokens but llm.vocab_size={cfg.llm.vocab_size}")


@contextlib.contextmanager
def parameters_without_memory() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no init work).

    Buffers stay real, so values computed at construction (e.g. RoPE frequencies) survive. Fill the
    parameters with ``load_state_dict(..., assign=True)``. Not thread-safe: it patches
    ``nn.Module.register_parameter`` while active.
    """
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@contextlib.contextmanager
def _atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; move it onto ``target`` only if the block succeeds."""
    tmp = target.with_name(target.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
