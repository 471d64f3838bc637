"""Export a training DIR as the shipped file: ``python -m training.export DIR OUT.safetensors [--dtype bfloat16]``.

The file holds only what was trained, for :func:`infinisst_backend.model.demo.build_trained_demo_checkpoint`:

* the speech frontend under the checkpoint's names (``model.speech_encoder.*``, as ``InfiniSSTModel`` names them);
* the LoRA pairs under PEFT's names (``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``, ...),
  which the converter's ``split_lora`` reads and merges as ``W + alpha / r * B @ A``;
* metadata (JSON strings): the model config, the LoRA's rank, alpha and targets, the base LLM, the step, the
  training recipe (arguments, schedule, totals) and the data description.

The CTC head (training only) is left out. At most 40 MiB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from infinisst_backend.config import dtype_name, torch_dtype
from infinisst_backend.model.demo import SHIPPED_FORMAT
from infinisst_backend.model.infinisst import SPEECH_PREFIX
from training.checkpoint import load_run
from training.lora import PEFT_PREFIX, TARGETS

logger = logging.getLogger(__name__)

MAX_SHIPPED_BYTES = 40 * 2**20


def shipped_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A run's trained tensors under the shipped file's names (the CTC head left out)."""
    out = {}
    for name, tensor in tensors.items():
        if name.startswith("speech."):
            out[SPEECH_PREFIX + name.removeprefix("speech.")] = tensor
        elif name.startswith("llm.") and (".lora_A." in name or ".lora_B." in name):
            out[PEFT_PREFIX + name.removeprefix("llm.")] = tensor
        elif not name.startswith("ctc_head."):
            raise ValueError(f"unexpected trained tensor {name!r}")
    return out


def export(run_dir, out_file, dtype: str | torch.dtype = "bfloat16", max_bytes: int = MAX_SHIPPED_BYTES) -> Path:
    """Write the shipped file of the run in ``run_dir`` to ``out_file``; ``ValueError`` if it passes ``max_bytes``."""
    run_dir, out_file = Path(run_dir), Path(out_file)
    state, tensors = load_run(run_dir)
    stored = torch_dtype(dtype)
    out = {k: v.to(stored).contiguous() for k, v in shipped_tensors(tensors).items()}
    size = sum(t.numel() * t.element_size() for t in out.values())
    if size > max_bytes:
        raise ValueError(f"the shipped tensors take {size / 2**20:.1f} MiB, more than {max_bytes / 2**20:.0f} MiB")
    args = state.get("args", {})
    metadata = {
        "format": SHIPPED_FORMAT,
        "config": json.dumps(state["config"]),
        "lora": json.dumps({**state["lora"], "targets": list(TARGETS)}),
        "base_llm": json.dumps(state["base_llm"]),
        "step": str(state["step"]),
        "dtype": dtype_name(stored),
        "recipe": json.dumps(
            {
                "command": "python -m training.train " + " ".join(_command_args(args)),
                "args": args,
                "schedule": state.get("schedule"),
                "totals": state.get("totals"),
                "seeds": state.get("seeds"),
            }
        ),
        "data": json.dumps(state.get("data")),
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    save_file(out, str(tmp), metadata=metadata)
    tmp.chmod(0o644)
    tmp.replace(out_file)
    digest = hashlib.sha256(out_file.read_bytes()).hexdigest()
    mib = size / 2**20
    logger.info("wrote %s: %d tensors, %.1f MiB, step %s, sha256 %s", out_file, len(out), mib, state["step"], digest)
    return out_file


def _command_args(args: dict) -> list[str]:
    skip = {"out", "device", "workers", "minutes"}
    parts = []
    for key, value in sorted(args.items()):
        if key in skip or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a training run as the shipped trained-demo file.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_file", type=Path)
    parser.add_argument("--dtype", default="bfloat16", help="storage dtype (default bfloat16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export(args.run_dir, args.out_file, args.dtype)
    except ValueError as e:
        parser.exit(1, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
