"""A virtual clock for an engine stepped on the caller's thread (``Engine(..., clock=VirtualClock())``): real time
while the engine works, a jump over every idle wait. Latencies are then those of a real-time run whose idle waits
cost nothing."""

from __future__ import annotations

import time


class VirtualClock:
    """Real time while the engine works, jumps while it would wait; ``pinned`` stamps an arrival with its due time."""

    def __init__(self):
        self.offset = 0.0
        self.pinned: float | None = None

    def monotonic(self) -> float:
        return self.pinned if self.pinned is not None else time.perf_counter() + self.offset

    def skip_to(self, t: float) -> None:
        now = self.monotonic()
        if t > now:
            self.offset += t - now

    def sleep(self, seconds: float) -> None:  # a stepped engine never sleeps, but be complete
        self.offset += max(0.0, seconds)
