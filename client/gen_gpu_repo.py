"""Write a GPU model repository: one model per language-pair checkpoint, one KIND_GPU instance per GPU.

    python -m client.gen_gpu_repo --out build/gpu_repository --model en-de=/ckpt/en-de --model en-zh=/ckpt/en-zh \\
        [--gpus 0,1,2,3] [--set beam_size=4 --set default_latency_multiplier=2 ...]

``--model NAME=CHECKPOINT`` makes the model ``infinisst_<NAME>`` (``-`` becomes ``_``) whose default target
language is the part of NAME after the last ``-``; a bare ``--model CHECKPOINT`` makes the model ``infinisst``.
Each model directory gets ``config.pbtxt`` from client/templates/config.pbtxt.in (``${var}`` fields) and a copy
of model_repository/infinisst/1/model.py. Serve it with
``tritonserver --model-repository OUT`` (inside Dockerfile.triton's image, or with this repository's venv).

KV memory: with ``num_pages`` 0 each instance sizes its pool from the GPU memory free when it loads, times
``kv_memory_fraction``; with several models per GPU the fraction is split evenly by default (the instances
loaded later see less free memory, so set ``num_pages`` for an exact split).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from string import Template

TEMPLATE = Path(__file__).parent / "templates" / "config.pbtxt.in"
MODEL_PY = Path(__file__).resolve().parents[1] / "model_repository" / "infinisst" / "1" / "model.py"

# GPU defaults for every template field except name, checkpoint, instance_groups and default_language.
GPU_DEFAULTS = {
    "triton_max_batch_size": "256",
    "max_sequence_idle_microseconds": "600000000",
    "max_candidate_sequences": "4096",
    "dtype": "bfloat16",
    "attention_backend": "flashinfer",
    "cuda_graphs": "true",
    "kv_cache_dtype": "auto",
    "fused_kernels": "true",
    "share_system_prompt": "true",
    "decode_tensor_cores": "false",
    "engine_max_batch_size": "256",
    "max_prefill_tokens": "8192",
    "batch_timeout_s": "0.05",
    "scheduling": "iteration",
    "page_size": "16",
    "num_pages": "0",
    "kv_memory_fraction": "0.75",
    "max_streams": "512",
    "max_llm_cache_tokens": "1000",
    "default_latency_multiplier": "1",
    "beam_size": "1",
    "repetition_penalty": "1.2",
    "no_repeat_ngram_size": "5",
    "encoder_no_repeat_ngram_size": "5",
    "ngram_lookback": "100",
    "max_request_seconds": "60",
    "stream_idle_timeout_s": "600",
    "metrics_interval_s": "1.0",
    "cancel_poll_interval_s": "0.1",
    "shutdown_timeout_s": "20",
    "benchmark_forced_turn_seed": "",
}


def parse_model(spec: str) -> tuple[str, Path, str | None]:
    """``NAME=CHECKPOINT`` -> (model name, checkpoint, default language); ``CHECKPOINT`` -> ("infinisst", ...)."""
    name, sep, path = spec.partition("=")
    if not sep:
        return "infinisst", Path(spec).resolve(), None
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"model name {name!r} must be letters, digits, '-' or '_'")
    return f"infinisst_{name.replace('-', '_')}", Path(path).resolve(), name.rsplit("-", 1)[-1]


def parse_overrides(items: list[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = value
    return overrides


def detect_gpus() -> list[int]:
    """GPU indices from ``nvidia-smi -L`` (empty when there is none)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(m.group(1)) for m in re.finditer(r"^GPU (\d+):", out, flags=re.M)]


def instance_groups(gpus: list[int]) -> str:
    return ",\n".join(f"  {{ count: 1 kind: KIND_GPU gpus: [ {g} ] }}" for g in gpus)


def render(name: str, checkpoint: Path, language: str | None, gpus: list[int], overrides: dict[str, str]) -> str:
    values = {**GPU_DEFAULTS, "default_language": language or "German", **overrides}
    values.update(name=name, checkpoint=str(checkpoint), instance_groups=instance_groups(gpus))
    try:
        return Template(TEMPLATE.read_text()).substitute(values)
    except KeyError as e:
        raise ValueError(f"the template needs a value for {e.args[0]!r} (--set {e.args[0]}=...)") from None


def write(out: Path, models: list[tuple[str, Path, str | None]], gpus: list[int], overrides: dict[str, str]) -> None:
    if not gpus:
        raise ValueError("no GPUs: pass --gpus 0,1,... (nvidia-smi found none)")
    names = [m[0] for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must differ, got {names}")
    unknown = sorted(set(overrides) - set(GPU_DEFAULTS) - {"default_language"})
    if unknown:
        raise ValueError(f"unknown --set key(s) {unknown}; known: {sorted([*GPU_DEFAULTS, 'default_language'])}")
    if "kv_memory_fraction" not in overrides and len(models) > 1:
        overrides = {
            **overrides,
            "kv_memory_fraction": f"{float(GPU_DEFAULTS['kv_memory_fraction']) / len(models):.3f}",
        }
    for name, checkpoint, language in models:
        if not (checkpoint / "config.json").is_file():
            raise ValueError(f"no checkpoint at {checkpoint} (config.json missing)")
        model_dir = out / name
        (model_dir / "1").mkdir(parents=True, exist_ok=True)
        (model_dir / "config.pbtxt").write_text(render(name, checkpoint, language, gpus, overrides))
        shutil.copy(MODEL_PY, model_dir / "1" / "model.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.gen_gpu_repo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="model repository folder to write")
    parser.add_argument("--model", action="append", required=True, help="NAME=CHECKPOINT (repeat) or CHECKPOINT")
    parser.add_argument("--gpus", default=None, help="comma-separated GPU indices (default: all from nvidia-smi)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a template field")
    args = parser.parse_args(argv)
    try:
        gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else detect_gpus()
        overrides = parse_overrides(args.set)
        models = [parse_model(spec) for spec in args.model]
        write(args.out, models, gpus, overrides)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {args.out}: models {[m[0] for m in models]}, one KIND_GPU instance on each of GPUs {gpus}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
