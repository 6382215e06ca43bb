"""How many runs overlapped, read from their results (the capacity benchmark and tests)."""

from __future__ import annotations

from datetime import datetime
from typing import Any


def most_at_once(results: list[dict[str, Any]]) -> int:
    """The most runs that overlapped, from each result's end and duration."""
    events = []
    for r in results:
        end = datetime.fromisoformat(r["finishedAt"].replace("Z", "+00:00")).timestamp()
        events += [(end - r["durationMillis"] / 1000, 1), (end, -1)]
    running = peak = 0
    for _, step in sorted(events):  # an end before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak
