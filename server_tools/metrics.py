"""The server's Prometheus metrics (``/metrics`` on the metrics port), parsed with ``prometheus_client``."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def label_string(labels: dict[str, str]) -> str:
    """Labels as the exposition text writes them: ``{instance="infinisst_0_0",model="infinisst"}`` ('' for none)."""
    if not labels:
        return ""
    escaped = (v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, escaped)) + "}"


def metric_values(text: str, name: str) -> dict[str, float]:
    """The samples named ``name`` in Prometheus text: {label string (:func:`label_string`): value}.

    ``name`` is the sample's name as the text writes it (``infinisst_chunk_latency_seconds_count``,
    ``nv_inference_request_success``); the parser names a counter's samples ``<family>_total`` even where the text
    has no ``_total``, so a counter's family name matches too.
    """
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            counter = family.type == "counter" and family.name == name and sample.name == name + "_total"
            if sample.name == name or counter:
                values[label_string(sample.labels)] = sample.value
    return values


def model_metric(text: str, name: str, model: str) -> float:
    """One metric summed over the instances of ``model``."""
    return sum(v for labels, v in metric_values(text, name).items() if f'model="{model}"' in labels)
