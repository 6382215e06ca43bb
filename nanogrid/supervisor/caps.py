"""The per-function caps this host has met (nanogrid/worker/caps.py), for /status and /metrics: each
capped function's cap, its runs in flight on all hosts as this host last saw them, and how
many of its messages this host handed back untried."""

from __future__ import annotations

from typing import Any

from nanogrid.worker import status


class FunctionCaps:
    def __init__(self) -> None:
        self._functions: dict[str, dict[str, int]] = {}

    def apply(self, message: dict[str, Any]) -> str | None:
        """Take in a worker's status line; the functionId when it was a deferral."""
        kind = message.get("type")
        if kind not in (status.DEFERRED, status.SLOT):
            return None
        function_id = str(message.get("functionId"))
        seen = self._functions.setdefault(function_id, {"cap": 0, "running": 0, "deferrals": 0})
        for key in ("cap", "running"):
            if isinstance(message.get(key), int):
                seen[key] = message[key]
        if kind == status.DEFERRED:
            seen["deferrals"] += 1
            return function_id
        return None

    def status(self) -> dict[str, dict[str, int]]:
        """/status ``concurrency.functions``."""
        return {name: dict(seen) for name, seen in sorted(self._functions.items())}
