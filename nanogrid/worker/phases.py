"""Where one task's time went: the phases of its ``timings``, on one monotonic clock."""

from __future__ import annotations

import time

from .result import Timings

PHASES = ("fetch", "unpack", "sandbox")


class PhaseClock:
    """Times the phases of one task, from when its message was received."""

    def __init__(self, received_mono: float, queued_ms: float) -> None:
        self._received = received_mono
        self._queued_ms = queued_ms
        self._ms = dict.fromkeys(PHASES, 0.0)
        self._started: dict[str, float] = {}

    def start(self, phase: str) -> None:
        self._started[phase] = time.monotonic()

    def stop(self, phase: str) -> None:
        """Add the time since ``start(phase)`` to ``phase``."""
        self._ms[phase] += (time.monotonic() - self._started.pop(phase)) * 1000

    def ms(self, phase: str) -> float:
        return self._ms[phase]

    def timings(self, run_ms: float = 0.0) -> Timings:
        """The timings so far; ``total_ms`` ends now."""
        return Timings(
            queued_ms=self._queued_ms,
            fetch_ms=self._ms["fetch"],
            unpack_ms=self._ms["unpack"],
            sandbox_ms=self._ms["sandbox"],
            run_ms=run_ms,
            total_ms=(time.monotonic() - self._received) * 1000,
        )
