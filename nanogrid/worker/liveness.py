"""A worker's heartbeat to the arbiter, beaten only while its main thread keeps its word.

Each blocking step of the main thread (a long poll, a wait for room, a drain) first moves
the deadline past its own bound (``until``); a thread of its own beats once a second while
the deadline has not passed. A main thread stuck beyond its step's bound stops the beats,
and the arbiter kills and replaces the worker. The beats carry why the worker takes no new
work (the fault board's reasons) and, once it has them, its running totals of errors per
peer. (The pools' counts the arbiter reads from the host's board of sandboxes itself.)
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .faults import FaultBoard

if TYPE_CHECKING:
    from .status import StatusReporter

BEAT_S = 1.0
BOOT_BOUND_S = 60.0
"""How long a worker may take to boot before its beats stop."""


class Liveness:
    def __init__(self, status: StatusReporter | None, board: FaultBoard) -> None:
        self._status = status
        self._board = board
        self._alive_until = time.monotonic() + BOOT_BOUND_S
        self._counts: Callable[[], dict[str, int]] | None = None

    def start(self) -> None:
        """Beat from now on (nothing to beat to without an arbiter)."""
        if self._status is not None:
            threading.Thread(target=self._beat, name="heartbeat", daemon=True).start()

    def until(self, seconds: float) -> None:
        """The main thread's next step ends within ``seconds`` (plus the beats' slack)."""
        self._alive_until = time.monotonic() + seconds

    def forever(self) -> None:
        """The main thread waits without a bound of its own (the arbiter's drain bounds it)."""
        self._alive_until = math.inf

    def report_counts(self, counts: Callable[[], dict[str, int]]) -> None:
        """Send the worker's running totals (errors per peer, dead letters) with each beat."""
        self._counts = counts

    def _beat(self) -> None:
        assert self._status is not None
        while True:
            if time.monotonic() < self._alive_until:
                counts = self._counts() if self._counts is not None else None
                self._status.heartbeat(self._board.reasons, counts)
            time.sleep(BEAT_S)
