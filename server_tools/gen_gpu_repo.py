"""Write a GPU model repository: one model per language-pair checkpoint, one KIND_GPU instance per GPU.

    python -m server_tools.gen_gpu_repo --out build/gpu_repository --model en-de=/ckpt/en-de \\
        --model en-zh=/ckpt/en-zh [--gpus 0,1,2,3] [--set beam_size=4 --set default_latency_multiplier=2 ...]

``--model NAME=CHECKPOINT`` makes the model ``infinisst_<NAME>`` (``-`` becomes ``_``) whose default target
language is the part of NAME after the last ``-``; a bare ``--model CHECKPOINT`` makes the model ``infinisst``.
Each model directory gets a copy of model_repository/infinisst/1/model.py and a ``config.pbtxt`` that is
model_repository/infinisst/config.pbtxt (the one source of the model's configuration, comments included) with one
KIND_GPU instance per GPU, the GPU values of :data:`GPU_DEFAULTS` and the ``--set`` values. Serve it with
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

from server_tools.model_config import CONFIG, MODEL_PY, config_parameters, rewrite_config

# Where a GPU repository differs from model_repository/infinisst/config.pbtxt (the CPU demo configuration); every
# other value is that file's. Keys: its parameters, and Triton's fields by the names of TRITON_FIELDS.
GPU_DEFAULTS = {
    "triton_max_batch_size": "256",
    "dtype": "bfloat16",
    "attention_backend": "flashinfer",
    "engine_max_batch_size": "256",
    "max_prefill_tokens": "8192",
    "batch_timeout_s": "0.05",
    "num_pages": "0",
    "kv_memory_fraction": "0.75",
    "max_streams": "512",
}
# --set keys for Triton's own fields -> their names in config.pbtxt
TRITON_FIELDS = {
    "triton_max_batch_size": "max_batch_size",
    "max_sequence_idle_microseconds": "max_sequence_idle_microseconds",
    "max_candidate_sequences": "max_candidate_sequences",
}
HEADER = """\
# Written by `python -m server_tools.gen_gpu_repo` from model_repository/infinisst/config.pbtxt, whose comments below
# say what each field means: one KIND_GPU instance per GPU, the GPU values of server_tools/gen_gpu_repo.py.
"""


def known_keys(source: str) -> list[str]:
    """What ``--set`` may set: the source's parameters (but the checkpoint, one per model) and Triton's fields."""
    return [*TRITON_FIELDS, *(k for k in config_parameters(source) if k != "checkpoint")]


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


def render(
    name: str,
    checkpoint: Path,
    language: str | None,
    gpus: list[int],
    overrides: dict[str, str],
    source: str | None = None,
) -> str:
    """The GPU config.pbtxt of one model: ``source`` (default: model_repository/infinisst/config.pbtxt's text) with
    its leading comment, name, instance group and the values of GPU_DEFAULTS and ``overrides`` replaced."""
    source = CONFIG.read_text() if source is None else source
    values = {**GPU_DEFAULTS, "default_language": language or "German", **overrides, "checkpoint": str(checkpoint)}
    fields = {TRITON_FIELDS[k]: values.pop(k) for k in list(values) if k in TRITON_FIELDS}
    body = source[re.search(r"^name:", source, flags=re.M).start() :]  # without the file's own leading comment
    return HEADER + rewrite_config(body, name, values, fields, instance_groups(gpus), add_missing=False)


def write(out: Path, models: list[tuple[str, Path, str | None]], gpus: list[int], overrides: dict[str, str]) -> None:
    if not gpus:
        raise ValueError("no GPUs: pass --gpus 0,1,... (nvidia-smi found none)")
    names = [m[0] for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must differ, got {names}")
    source = CONFIG.read_text()
    known = known_keys(source)
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"unknown --set key(s) {unknown}; known: {sorted(known)}")
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
        (model_dir / "config.pbtxt").write_text(render(name, checkpoint, language, gpus, overrides, source))
        shutil.copy(MODEL_PY, model_dir / "1" / "model.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server_tools.gen_gpu_repo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="model repository folder to write")
    parser.add_argument("--model", action="append", required=True, help="NAME=CHECKPOINT (repeat) or CHECKPOINT")
    parser.add_argument("--gpus", default=None, help="comma-separated GPU indices (default: all from nvidia-smi)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a value of config.pbtxt (a parameter, or triton_max_batch_size, ...)",
    )
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
