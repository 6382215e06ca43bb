"""Where one task's time went: the phases of its ``timings``, on one monotonic clock."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from .result import Timings


class PhaseClock:
    """Times the phases of one task, from when its message was received."""

    def __init__(self, received_mono: float, queued_ms: float) -> None:
        self._received = received_mono
        self._queued_ms = queued_ms
        self._ms = {"fetch": 0.0, "unpack": 0.0, "sandbox": 0.0}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the time spent in the ``with`` block to phase ``name``."""
        started = time.monotonic()
        try:
            yield
        finally:
            self._ms[name] += (time.monotonic() - started) * 1000

    def ms(self, name: str) -> float:
        return self._ms[name]

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
