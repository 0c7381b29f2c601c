"""Where a step's time goes, for the benchmarks: main-thread seconds by phase (cheap enough to stay
on), and, when asked for, the device's busy and idle time between steps from CUDA events."""

from __future__ import annotations

import time
from collections import defaultdict

import torch


class PhaseClock:
    """Laps of the engine's thread: each lap() adds the time since the last one to a phase."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._last = time.perf_counter()

    def start(self) -> None:
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now


class DeviceTimeline:
    """Events at the start and end of each step's device work. A step's busy time is start to end;
    the device idled between steps from one step's end to the next one's start (about 0 when the
    host queued the next step before the device finished the last)."""

    def __init__(self):
        self.busy_ms = self.idle_ms = 0.0
        self.steps = 0
        self._prev_end: torch.cuda.Event | None = None

    @staticmethod
    def mark() -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, start: torch.cuda.Event, end: torch.cuda.Event) -> None:
        """Both events have completed (the step was read)."""
        self.busy_ms += start.elapsed_time(end)
        if self._prev_end is not None:
            self.idle_ms += max(0.0, self._prev_end.elapsed_time(start))
        self._prev_end = end
        self.steps += 1

    def stats(self) -> dict:
        return {"steps": self.steps, "busy_s": self.busy_ms / 1e3, "idle_s": self.idle_ms / 1e3,
                "idle_ms_per_step": self.idle_ms / max(1, self.steps - 1)}
