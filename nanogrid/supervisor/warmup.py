"""Warm before ready: at start and after a reload, READY=1 and /health UP wait until every
runtime that can start has its ``warm`` count of generic sandboxes on the host's board, made
by the current workers, or until ``pool.warm_timeout_seconds`` passed (then the agent serves
cold, and says so). The first calls after a deploy or a scale-out then find warm sandboxes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from loguru import logger

from nanogrid.runners.lending import IDLE, TAKEN, Entry

WARMING, WARM, TIMED_OUT = "warming", "warm", "timedOut"


class WarmUp:
    """One warm-up, from a start or a reload until warm or timed out."""

    def __init__(self, timeout_s: float, now: float | None = None) -> None:
        self.timeout_s = timeout_s
        self.since = time.monotonic() if now is None else now
        self.state = WARMING
        self.missing: dict[str, str] = {}
        """Runtime -> ``have/wanted`` generic sandboxes, while short of them."""
        self.took_s: float | None = None

    @property
    def done(self) -> bool:
        return self.state != WARMING

    def update(self, wanted: dict[str, int], entries: Iterable[Entry], owners: set[int],
               now: float) -> None:
        """Count the generic sandboxes of the workers ``owners`` (pids) per runtime, against
        ``wanted`` (the runtimes that can start -> their ``warm``)."""
        if self.done:
            return
        have = dict.fromkeys(wanted, 0)
        for entry in entries:
            generic = entry.code_key is None and entry.state in (IDLE, TAKEN)
            if generic and entry.owner_pid in owners and entry.runtime in have:
                have[entry.runtime] += 1
        self.missing = {runtime: f"{have[runtime]}/{count}"
                        for runtime, count in wanted.items() if have[runtime] < count}
        elapsed = now - self.since
        if not self.missing:
            self.state, self.took_s = WARM, elapsed
            logger.info(f"warm: every runtime has its generic sandboxes ({elapsed:.1f}s)")
        elif elapsed >= self.timeout_s:
            self.state, self.took_s = TIMED_OUT, elapsed
            logger.warning(f"serving before the pools are warm: {self._shortfall()} generic "
                           f"sandboxes after pool.warm_timeout_seconds ({self.timeout_s:g}s)")

    def status(self, now: float) -> dict[str, Any]:
        """/status ``warmUp``."""
        status: dict[str, Any] = {"state": self.state, "timeoutSeconds": self.timeout_s}
        if self.state == WARMING:
            status["secondsLeft"] = round(max(0.0, self.since + self.timeout_s - now), 1)
        else:
            status["tookSeconds"] = round(self.took_s or 0.0, 1)
        if self.missing:
            status["genericReady"] = dict(self.missing)
        return status

    def _shortfall(self) -> str:
        return ", ".join(f"{runtime} {count}" for runtime, count in self.missing.items())


def health_reason(warm_up: dict[str, Any]) -> str | None:
    """The /health reason while warming (from /status ``warmUp``), else None."""
    if warm_up.get("state") != WARMING:
        return None
    ready = ", ".join(f"{runtime} {count}" for runtime, count in
                      warm_up.get("genericReady", {}).items())
    return (f"warming: generic sandboxes ready {ready or 'being counted'} "
            f"(at most {warm_up.get('secondsLeft', 0):g}s more)")
