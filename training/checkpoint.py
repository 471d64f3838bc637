"""A training DIR: what ``python -m training.train`` saves and resumes from.

::

    state.json               step, model recipe (base LLM, config, LoRA), arguments, schedule, seeds, parts
    weights-NN.safetensors   the trained tensors (TrainingModel.trained_state_dict), split into parts of <= 16 MiB
    optimizer.pt             AdamW state (optional on resume: without it, a fresh optimizer and a short re-warmup)
    log.jsonl                one JSON line per logged step (loss, CE, CTC, lr, throughput, memory)
    loss.png                 the loss curves (when matplotlib is installed)

A device command carries back at most a few files of at most 16 MiB: state.json and the weight parts are the
checkpoint (at most :data:`MAX_PARTS` + 1 files); the weights are float32 when that fits, bfloat16 otherwise.
Files are written under temporary names and renamed; state.json goes last, so a DIR whose state.json lists its
parts is complete.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"
PART_NAME = "weights-{:02d}.safetensors"
MAX_PART_BYTES = 16 * 2**20 - 2**16  # 16 MiB less room for the safetensors header
MAX_PARTS = 5


def split_parts(tensors: dict[str, Tensor], max_bytes: int = MAX_PART_BYTES) -> list[dict[str, Tensor]]:
    """Tensors in name order, cut into parts of at most ``max_bytes`` (a larger tensor gets a part of its own)."""
    parts: list[dict[str, Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if parts[-1] and size + nbytes > max_bytes:
            parts.append({})
            size = 0
        parts[-1][name] = tensors[name]
        size += nbytes
    return parts


def save_run(out_dir, tensors: dict[str, Tensor], state: dict, optimizer_state: dict | None = None) -> dict:
    """Write the trained tensors, the optimizer state (if given) and ``state`` (+ its ``parts`` and
    ``weights_dtype``) to ``out_dir``; returns the state written. Parts of an earlier save not listed are removed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    parts = split_parts(cpu)
    dtype = "float32"
    if len(parts) > MAX_PARTS:
        dtype = "bfloat16"
        parts = split_parts({k: v.to(torch.bfloat16) for k, v in cpu.items()})
        if len(parts) > MAX_PARTS:
            logger.warning("the trained weights need %d parts of 16 MiB even in bf16 (limit %d)", len(parts), MAX_PARTS)
    names = [PART_NAME.format(i) for i in range(len(parts))]
    for name, part in zip(names, parts):
        tmp = out_dir / (name + ".tmp")
        save_file(part, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out_dir / name)
    if optimizer_state is not None:
        tmp = out_dir / (OPTIMIZER_FILE + ".tmp")
        torch.save(optimizer_state, tmp)
        os.replace(tmp, out_dir / OPTIMIZER_FILE)
    state = {**state, "parts": names, "weights_dtype": dtype}
    tmp = out_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, out_dir / STATE_FILE)
    for old in out_dir.glob("weights-*.safetensors"):
        if old.name not in names:
            old.unlink()
    return state


def has_run(out_dir) -> bool:
    """Whether ``out_dir`` holds a saved run (its state.json)."""
    return (Path(out_dir) / STATE_FILE).is_file()


def load_run(out_dir) -> tuple[dict, dict[str, Tensor]]:
    """(state, trained tensors in float32) of a saved run; ``ValueError`` naming a missing or unreadable file."""
    out_dir = Path(out_dir)
    try:
        state = json.loads((out_dir / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {out_dir / STATE_FILE}: {e}") from e
    tensors: dict[str, Tensor] = {}
    for name in state.get("parts", []):
        try:
            with safe_open(str(out_dir / name), framework="pt", device="cpu") as f:
                tensors.update({k: f.get_tensor(k).float() for k in f.keys()})
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {out_dir / name}: {e}") from e
    return state, tensors


def load_optimizer_state(out_dir) -> dict | None:
    """The saved optimizer state, or None if there is none (or it cannot be read)."""
    path = Path(out_dir) / OPTIMIZER_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: resume with a fresh optimizer
        logger.warning("cannot read %s (%s): a fresh optimizer it is", path, e)
        return None


def append_log(out_dir, record: dict) -> None:
    with open(Path(out_dir) / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(out_dir) -> list[dict]:
    path = Path(out_dir) / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(out_dir) -> Path | None:
    """Plot log.jsonl's losses to loss.png; None (with a message) when matplotlib is missing or nothing is logged."""
    records = [r for r in read_log(out_dir) if "loss" in r]
    if not records:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no %s", PLOT_FILE)
        return None
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in ("loss", "ce", "ctc"):
        ax.plot(steps, [r[key] for r in records], label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(out_dir) / PLOT_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
