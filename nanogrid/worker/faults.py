"""What is wrong on this worker now, and what went wrong: told to the arbiter.

``degrade``/``recover`` keep the reasons this worker takes no new work (Redis cannot take
results, SQS cannot be reached, a disk is full); they ride on every heartbeat, so /health
says DEGRADED naming them while they last. ``fault`` reports one event (a host fault, a
dead-letter copy that failed, an outbox entry set aside, a bug while handling a message, a
claim lost): counted in /metrics, the last of each kind shown in /status.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    from .status import StatusReporter

REDIS = "redis"
"""Degraded: results cannot be written to Redis."""
QUEUE = "queue"
"""Degraded: tasks cannot be received from SQS."""
DISK = "disk"
"""Degraded: the code cache's or the sandboxes' disk is full."""

HOST = "host"
DEAD_LETTER_COPY = "dead_letter_copy"
OUTBOX_SET_ASIDE = "outbox_set_aside"
UNEXPECTED = "unexpected"
CLAIM_LOST = "claim_lost"
"""A running task's claim was gone (taken again) or taken by another worker."""
FAULT_KINDS = (HOST, DEAD_LETTER_COPY, OUTBOX_SET_ASIDE, UNEXPECTED, CLAIM_LOST)
MAX_TEXT = 300
"""Reasons and fault messages are cut here: a status line stays under PIPE_BUF."""


class FaultBoard:
    def __init__(self, status: StatusReporter | None = None) -> None:
        self._status = status
        self._reasons: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def reasons(self) -> list[str]:
        """Why this worker is degraded; empty while all is well."""
        with self._lock:
            return list(self._reasons.values())

    def degraded(self, key: str) -> bool:
        with self._lock:
            return key in self._reasons

    def degrade(self, key: str, reason: str) -> None:
        """Mark ``key`` (e.g. REDIS) as failing; logged and told at once on the first time."""
        reason = reason[:MAX_TEXT]
        with self._lock:
            new = key not in self._reasons
            self._reasons[key] = reason
        if new:
            logger.warning(f"[DEGRADED] {reason}")
            self._tell()

    def recover(self, key: str) -> None:
        with self._lock:
            old = self._reasons.pop(key, None)
        if old is not None:
            logger.info(f"[DEGRADED] over: {key} works again")
            self._tell()

    def fault(self, kind: str, message: str) -> None:
        """Report one fault of ``kind`` (one of FAULT_KINDS); the caller logs it."""
        if self._status is not None:
            self._status.fault(kind, message[:MAX_TEXT])

    def _tell(self) -> None:
        if self._status is not None:
            self._status.heartbeat(self.reasons)
