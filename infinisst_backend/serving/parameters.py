"""The model's ``config.pbtxt`` parameters: parsed, checked and turned into the engine's config; test and benchmark
switches (fault injection, forced turn lengths); the instance's device; the stub's NumPy check."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infinisst_backend.config import DecodingConfig, EngineConfig

# config.pbtxt parameter -> EngineConfig field, where the names differ (Triton has its own max_batch_size).
_RENAMED = {"engine_max_batch_size": "max_batch_size"}
# EngineConfig fields that are not parameters: the device follows the instance_group (KIND_CPU / KIND_GPU).
_NOT_PARAMETERS = {"device", "decoding"}


class ConfigError(ValueError):
    """A config.pbtxt parameter is missing, unknown or invalid; the message names it."""


@dataclass(slots=True)
class ServingConfig:
    """Everything the Triton layer reads from config.pbtxt parameters."""

    engine: EngineConfig
    checkpoint: Path  # resolved, absolute
    metrics_interval_s: float = 1.0  # how often the metrics thread reads engine.stats()
    cancel_poll_interval_s: float = 0.1  # how often the response thread asks whether requests were cancelled
    shutdown_timeout_s: float = 20.0  # engine.shutdown() budget in finalize (keep below Triton's exit timeout)
    # TEST ONLY (docs/reliability.md): "ID" or "ID@N", comma-separated; the stream of sequence ID raises an
    # injected error in its N-th decoding step (default 1). Empty in every real deployment.
    test_fault_sequence_ids: str = ""
    # BENCHMARK ONLY (dummy weights never emit EOT): a seed; every turn's length is drawn from the benchmark's
    # seeded distribution (forced_turns.TurnLengths). Empty in every real deployment.
    benchmark_forced_turn_seed: str = ""


_LAYER_FIELDS = {f.name for f in dataclasses.fields(ServingConfig)} - {"engine", "checkpoint"}


def _parameter_fields() -> dict[str, tuple[object, str]]:
    """Parameter name -> (config object default, field name) for every settable field."""
    engine, decoding, layer = EngineConfig(), DecodingConfig(), ServingConfig(EngineConfig(), Path())
    fields: dict[str, tuple[object, str]] = {}
    for f in dataclasses.fields(EngineConfig):
        if f.name not in _NOT_PARAMETERS:
            param = next((p for p, name in _RENAMED.items() if name == f.name), f.name)
            fields[param] = (engine, f.name)
    for f in dataclasses.fields(DecodingConfig):
        fields[f.name] = (decoding, f.name)
    for name in _LAYER_FIELDS:
        fields[name] = (layer, name)
    return fields


PARAMETERS = _parameter_fields()


def parameters_from_model_config(model_config: dict) -> dict[str, str]:
    """``{key: string_value}`` of the ``parameters`` section of Triton's model config (as JSON-decoded)."""
    params = {}
    for key, value in (model_config.get("parameters") or {}).items():
        params[key] = value.get("string_value", "") if isinstance(value, dict) else str(value)
    return params


def _convert(param: str, text: str, default: object) -> object:
    text = text.strip()
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}[type(default)]
        raise ConfigError(f"config.pbtxt parameter {param!r}: invalid value {text!r}, expected {kind}") from None
    return text


def resolve_checkpoint(value: str, project_root: Path) -> Path:
    """A checkpoint path: absolute, or relative to the project root (the folder holding infinisst_backend/)."""
    if not value.strip():
        raise ConfigError("config.pbtxt parameter 'checkpoint' is empty: give a checkpoint directory")
    path = Path(value.strip()).expanduser()
    if not path.is_absolute():
        path = project_root / path
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"config.pbtxt parameter 'checkpoint': no checkpoint at {path} (no config.json there); "
            "`make setup` builds the demo checkpoint, or give an absolute path"
        )
    return path


def serving_config_from_parameters(params: dict[str, str], device: str, project_root: Path) -> ServingConfig:
    """Build and validate the configuration; every problem raises ConfigError naming the parameter.

    Empty values mean "use the default". Upper-case keys (Triton's own, e.g. EXECUTION_ENV_PATH) are ignored;
    any other unknown key is an error, so a typo cannot silently fall back to a default.
    """
    unknown = sorted(k for k in params if k not in PARAMETERS and k != "checkpoint" and not k.isupper())
    if unknown:
        raise ConfigError(f"unknown config.pbtxt parameter(s) {unknown}; known: {sorted([*PARAMETERS, 'checkpoint'])}")
    engine, decoding = EngineConfig(device=device), DecodingConfig()
    layer: dict[str, Any] = {}
    for param, text in params.items():
        if param not in PARAMETERS or not text.strip():
            continue
        default_obj, name = PARAMETERS[param]
        value = _convert(param, text, getattr(default_obj, name))
        if isinstance(default_obj, EngineConfig):
            setattr(engine, name, value)
        elif isinstance(default_obj, DecodingConfig):
            setattr(decoding, name, value)
        else:
            layer[name] = value
    engine.decoding = decoding
    try:
        engine.validate()
    except ValueError as e:
        raise ConfigError(f"config.pbtxt parameter {_parameter_named_in(str(e))!r}: {e}") from None
    for name, value in layer.items():
        if isinstance(value, (int, float)) and value <= 0:
            raise ConfigError(f"config.pbtxt parameter {name!r}: invalid value {value!r}, expected > 0")
    parse_fault_ids(layer.get("test_fault_sequence_ids", ""))
    parse_forced_turn_seed(layer.get("benchmark_forced_turn_seed", ""))
    checkpoint = resolve_checkpoint(params.get("checkpoint", ""), project_root)
    return ServingConfig(engine=engine, checkpoint=checkpoint, **layer)


def _parameter_named_in(message: str) -> str:
    """The parameter behind a ``validate()`` message ("invalid <field>=<value>: ...")."""
    match = re.match(r"invalid (\w+)=", message)
    field_name = match.group(1) if match else "?"
    return next((p for p, name in _RENAMED.items() if name == field_name), field_name)


def parse_fault_ids(text: str) -> dict[str, int]:
    """``"7, 9@3"`` -> ``{"7": 1, "9": 3}``: sequence id -> the decoding step (from 1) at which its stream fails."""
    faults = {}
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        ident, at, step = (part.strip() for part in token.partition("@"))
        if not ident or (at and not (step.isdigit() and int(step) >= 1)):
            raise ConfigError(
                f"config.pbtxt parameter 'test_fault_sequence_ids': invalid entry {token!r}, expected ID or ID@STEP "
                "(STEP >= 1), comma-separated"
            )
        faults[ident] = int(step) if at else 1
    return faults


def parse_forced_turn_seed(text: str) -> int | None:
    """The ``benchmark_forced_turn_seed`` parameter: None when empty, else a non-negative integer seed."""
    text = text.strip()
    if not text:
        return None
    if not text.isdigit():
        raise ConfigError(
            f"config.pbtxt parameter 'benchmark_forced_turn_seed': invalid value {text!r}, expected a non-negative "
            "integer seed, or empty (off)"
        )
    return int(text)


class InjectedFault(RuntimeError):
    """The error the test-only fault hook raises inside one stream's processing."""


class FaultInjector:
    """``Engine.fault_hook`` for the test-only ``test_fault_sequence_ids`` parameter.

    Called as ``hook(stream_id)`` on the engine thread in each decoding step of each stream; raises
    :class:`InjectedFault` in the configured step of the streams of the listed sequence ids (every stream that
    uses such an id, counted per stream), so that only that stream fails.
    """

    def __init__(self, faults: dict[str, int]):
        self.faults = faults
        self._steps: dict[object, int] = {}  # stream key -> decoding steps seen (listed ids only)

    def __call__(self, stream_id: object) -> None:
        corrid = str(getattr(stream_id, "corrid", stream_id))
        fail_at = self.faults.get(corrid)
        if fail_at is None:
            return
        step = self._steps.get(stream_id, 0) + 1
        self._steps[stream_id] = step
        if step >= fail_at:
            del self._steps[stream_id]  # the stream fails now and is freed
            raise InjectedFault(
                f"fault injected at decoding step {step} of sequence {corrid} (test_fault_sequence_ids)"
            )


ALLOW_NUMPY2_ENV = "INFINISST_ALLOW_NUMPY2"


def check_stub_numpy(version: str, environ: Mapping[str, str]) -> None:
    """ConfigError for NumPy 2 unless ``INFINISST_ALLOW_NUMPY2=1``.

    Triton 2.51's Python stub (release 24.10, the one nvidia-pytriton 0.7.0 carries) sizes the output tensors that
    a model builds from NumPy arrays with the NumPy 1 layout. Under NumPy 2 every output reached the client as an
    empty buffer (docs/benchmarks/notes.md): each TEXT, RESPONSE_INDEX and SOURCE_SECONDS was 0 bytes. A newer
    Triton whose stub supports NumPy 2 can set the variable.
    """
    major = int(version.split(".")[0])
    if major >= 2 and environ.get(ALLOW_NUMPY2_ENV) != "1":
        raise ConfigError(
            f"numpy {version} is loaded in the Python stub, and Triton 2.51's stub sends outputs built from NumPy 2 "
            f"arrays as empty tensors: install numpy<2 where the stub imports from (requirements-gpu.txt pins "
            f"1.26.4), or set {ALLOW_NUMPY2_ENV}=1 for a Triton whose stub supports NumPy 2"
        )


def device_for_instance(args: dict) -> str:
    """torch device of a Triton model instance: ``cuda:<id>`` for KIND_GPU, ``cpu`` otherwise."""
    if str(args.get("model_instance_kind", "CPU")).upper() == "GPU":
        return f"cuda:{int(args.get('model_instance_device_id', 0))}"
    return "cpu"
