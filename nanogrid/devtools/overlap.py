"""How many runs overlapped, read from their results (the capacity benchmark and tests)."""

from __future__ import annotations

from datetime import datetime
from typing import Any


def finished_at(result: dict[str, Any]) -> float:
    """When the run ended (epoch seconds), from its result's ``finishedAt``."""
    return datetime.fromisoformat(result["finishedAt"].replace("Z", "+00:00")).timestamp()


def started_at(result: dict[str, Any]) -> float:
    """When the run began (epoch seconds), from its result's end and duration."""
    return finished_at(result) - result["durationMillis"] / 1000


def most_at_once(results: list[dict[str, Any]]) -> int:
    """The most runs that overlapped, from each result's end and duration."""
    events = []
    for r in results:
        events += [(started_at(r), 1), (finished_at(r), -1)]
    running = peak = 0
    for _, step in sorted(events):  # an end before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak
