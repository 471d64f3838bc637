"""The model's custom Prometheus metrics (``pb_utils.MetricFamily``), refreshed from the engine's stats."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

LATENCY_BUCKETS = [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


class Metrics:
    """Custom metrics on Triton's metrics port (Prometheus), labelled by model and instance.

    Gauges come from ``engine.stats()``; the generated-token counter from the difference of its running total;
    the batch-size histogram from the engine's step records; chunk latency from TurnEnded events.
    """

    def __init__(self, pb: Any, labels: dict[str, str]):
        family = pb.MetricFamily

        def metric(name: str, description: str, kind: Any, extra: dict | None = None, **kw: Any) -> Any:
            fam = family(name=name, description=description, kind=kind)
            self._families.append(fam)
            return fam.Metric(labels={**labels, **(extra or {})}, **kw)

        self._families: list[Any] = []
        self.active_streams = metric("infinisst_active_streams", "Open audio streams", family.GAUGE)
        self.pending_chunks = metric(
            "infinisst_pending_chunks", "Audio chunks waiting for or in their translation turn", family.GAUGE
        )
        self.kv_pages_used = metric("infinisst_kv_pages_used", "LLM KV-cache pages in use", family.GAUGE)
        self.kv_pages_free = metric("infinisst_kv_pages_free", "LLM KV-cache pages free", family.GAUGE)
        self.generated_tokens = metric(
            "infinisst_generated_tokens_total", "Target tokens generated (EOS included)", family.COUNTER
        )
        batch_family = family(
            name="infinisst_batch_size", description="Rows per engine step, by phase", kind=family.HISTOGRAM
        )
        self._families.append(batch_family)
        self.batch_size = {
            phase: batch_family.Metric(labels={**labels, "phase": phase}, buckets=BATCH_BUCKETS)
            for phase in ("prefill", "decode")
        }
        self.chunk_latency = metric(
            "infinisst_chunk_latency_seconds",
            "From a chunk's last sample reaching the engine to the end of its translation turn",
            family.HISTOGRAM,
            buckets=LATENCY_BUCKETS,
        )
        self._tokens_seen = 0

    def update(self, stats: dict, step_phases_rows: Iterable[tuple[str, int]], latencies: Iterable[float]) -> None:
        self.active_streams.set(float(stats.get("active_streams", 0)))
        self.pending_chunks.set(float(stats.get("pending_chunks", 0)))
        self.kv_pages_used.set(float(stats.get("kv_pages_used", 0)))
        self.kv_pages_free.set(float(stats.get("kv_pages_free", 0)))
        tokens = int(stats.get("generated_tokens", 0))
        if tokens > self._tokens_seen:
            self.generated_tokens.increment(float(tokens - self._tokens_seen))
            self._tokens_seen = tokens
        for phase, rows in step_phases_rows:
            if phase in self.batch_size:
                self.batch_size[phase].observe(float(rows))
        for seconds in latencies:
            self.chunk_latency.observe(float(seconds))


def drain(items: deque) -> list:
    """Pop everything from a deque another thread appends to."""
    out = []
    while True:
        try:
            out.append(items.popleft())
        except IndexError:
            return out
