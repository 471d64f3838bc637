"""Latency percentiles of a list of seconds (numpy's), as the reports print them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def percentiles(
    values: Iterable[float], qs: Sequence[float] = (50, 90, 95, 99), *, count: bool = True, maximum: bool = True
) -> dict[str, float | None]:
    """``{"n": ..., "p50": ..., ..., "max": ...}`` (``count`` / ``maximum``: with n / max); None for an empty list."""
    v = np.asarray(list(values), dtype=np.float64)
    out: dict[str, float | None] = {"n": int(v.size)} if count else {}
    out.update({f"p{q:g}": float(np.percentile(v, q)) if v.size else None for q in qs})
    if maximum:
        out["max"] = float(v.max()) if v.size else None
    return out
