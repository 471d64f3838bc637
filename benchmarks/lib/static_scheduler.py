"""The static batching baseline (benchmark only): while any turn runs, only decode steps run, so a batch runs to the
end of its turns before new work joins. The engine as served schedules at the iteration level (new work joins at
the next step: :class:`~infinisst_backend.engine.scheduler.Scheduler`)."""

from __future__ import annotations

from infinisst_backend.config import EngineConfig
from infinisst_backend.engine.scheduler import ScheduledStep, Scheduler
from infinisst_backend.engine.stream import Stream

SCHEDULINGS = ("iteration", "static")  # the reports' names of the two policies


class StaticScheduler(Scheduler):
    def schedule(self, streams: list[Stream], system_len_hint: int, now: float) -> ScheduledStep | None:
        decoding = sorted((s for s in streams if s.turn is not None), key=lambda s: s.turn.started)
        if decoding:
            return self.decode_step(decoding)  # no new work joins a running batch
        return super().schedule(streams, system_len_hint, now)


def scheduler_for(scheduling: str, cfg: EngineConfig) -> Scheduler:
    """The engine's scheduler for a report's ``scheduling``: "iteration" (as served) or "static" (the baseline)."""
    if scheduling not in SCHEDULINGS:
        raise ValueError(f"scheduling must be one of {SCHEDULINGS}, got {scheduling!r}")
    return StaticScheduler(cfg) if scheduling == "static" else Scheduler(cfg)
