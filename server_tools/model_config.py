"""Read and rewrite a ``config.pbtxt`` written in this repository's style (``model_repository/infinisst/``): one
``{ key: "..." value: { string_value: "..." } }`` per line in ``parameters``, one ``instance_group [...]``.

``model_repository/infinisst/config.pbtxt`` is the one source of the model's configuration: the GPU repository
(:mod:`server_tools.gen_gpu_repo`) and the server tests' repositories are this file with values replaced.
"""

from __future__ import annotations

import re
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parents[1] / "model_repository" / "infinisst"
CONFIG = MODEL_DIR / "config.pbtxt"
MODEL_PY = MODEL_DIR / "1" / "model.py"

_PARAM = re.compile(r'(\{ key: "(\w+)" value: \{ string_value: ")([^"]*)(" \} \})')
# Scalar fields outside ``parameters`` that a rewrite may set (Triton's names).
FIELDS = ("max_batch_size", "max_sequence_idle_microseconds", "max_candidate_sequences")
_INSTANCE_GROUP = re.compile(r"^instance_group \[[^\[\]]*\]", flags=re.M)  # the repository's one-line CPU group


def config_parameters(text: str) -> dict[str, str]:
    """The ``parameters`` of a config.pbtxt, in their order."""
    return {m.group(2): m.group(3) for m in _PARAM.finditer(text)}


def config_field(text: str, field: str) -> str:
    """The value of a top-level or ``sequence_batching`` scalar field (one of :data:`FIELDS`)."""
    match = re.search(rf"^\s*{field}: (\S+)$", text, flags=re.M)
    if match is None:
        raise ValueError(f"config.pbtxt has no {field}")
    return match.group(1)


def rewrite_config(
    text: str,
    name: str,
    parameters: dict[str, str],
    fields: dict[str, str] | None = None,
    instance_groups: str | None = None,
    add_missing: bool = True,
) -> str:
    """config.pbtxt with another model name, some parameter values replaced, scalar :data:`FIELDS` replaced and,
    given ``instance_groups`` (the entries, one per line), another ``instance_group``.

    A parameter the text does not have is added at the end of ``parameters`` (``add_missing``), or is an error.
    """
    text = re.sub(r'^name: "[^"]*"', f'name: "{name}"', text, count=1, flags=re.M)
    for field, value in (fields or {}).items():
        config_field(text, field)  # it must exist
        text = re.sub(rf"^(\s*{field}: )\S+$", rf"\g<1>{value}", text, count=1, flags=re.M)
    if instance_groups is not None:
        if _INSTANCE_GROUP.search(text) is None:
            raise ValueError("config.pbtxt has no one-line instance_group to replace")
        text = _INSTANCE_GROUP.sub(lambda m: f"instance_group [\n{instance_groups}\n]", text, count=1)
    missing = dict(parameters)

    def replace(m: re.Match) -> str:
        value = missing.pop(m.group(2), m.group(3))
        return f"{m.group(1)}{value}{m.group(4)}"

    text = _PARAM.sub(replace, text)
    if missing and not add_missing:
        raise ValueError(f"config.pbtxt has no parameter(s) {sorted(missing)}")
    if missing:
        extra = ",\n".join(f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in missing.items())
        text = re.sub(r"\n\]\s*$", f",\n{extra}\n]\n", text)
    return text
