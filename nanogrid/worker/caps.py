"""Per-function caps across all hosts, as one worker meets them.

The cap itself is enforced in Redis, in the claim's own script (claim.py): a function's runs
in flight are a sorted set of claim tokens scored by when each one's lease ends, so a dead
host's slots come back within one lease and a token is counted once. This module decides
what a message of a function at its cap does: it goes back to SQS untried (never an
attempt) for a delay that grows with the times it came back already (1 s, x1.25 a time, at
most 30 s, with +-30% jitter so a burst's messages do not come back together): a message
that just arrived asks again soon, one that waited long costs few SQS calls. For a moment
after finding a function at its cap, the worker hands its messages back without asking
Redis again. The other functions' messages flow on meanwhile. While Redis is away nothing
is claimed, so nothing runs over a cap: the worker takes no work then anyway (DEGRADED).
"""

from __future__ import annotations

import random
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .status import StatusReporter

FIRST_DELAY_S = 1.0
GROWTH = 1.25
MAX_DELAY_S = 30.0
JITTER = 0.3
ASK_AGAIN_S = 0.25
"""For this long after a function was found at its cap, its messages go back without a
Redis round trip of their own."""


class CapGate:
    def __init__(self, status: StatusReporter | None = None) -> None:
        self._status = status
        self._ask_again_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def known_at_cap(self, function_id: str) -> bool:
        """The function was found at its cap a moment ago: hand its message back without
        asking Redis (then told with ``deferred``)."""
        with self._lock:
            return time.monotonic() < self._ask_again_at.get(function_id, 0.0)

    def at_cap(self, function_id: str, cap: int, running: int) -> None:
        """Redis found ``function_id`` at its cap."""
        with self._lock:
            self._ask_again_at[function_id] = time.monotonic() + ASK_AGAIN_S
        self.deferred(function_id, cap, running)

    def deferred(self, function_id: str, cap: int | None = None, running: int | None = None
                 ) -> None:
        """A message of ``function_id`` goes back untried (``cap`` and ``running``: what
        Redis said, None when known from a moment ago)."""
        if self._status is not None:
            self._status.deferred(function_id, cap, running)

    def took_slot(self, function_id: str, cap: int | None, running: int) -> None:
        """A run of ``function_id`` was claimed (with a slot when it has a cap)."""
        with self._lock:
            self._ask_again_at.pop(function_id, None)
        if cap is not None and self._status is not None:
            self._status.slot(function_id, cap, running)


def delay_for(receives: int) -> int:
    """How long a message that came ``receives`` times (this one included, and those of the
    messages it was sent again from) waits in SQS before it asks again: whole seconds (SQS's
    unit), at least 1."""
    base = min(FIRST_DELAY_S * GROWTH ** max(0, receives - 1), MAX_DELAY_S)
    return max(1, round(base * random.uniform(1 - JITTER, 1 + JITTER)))
