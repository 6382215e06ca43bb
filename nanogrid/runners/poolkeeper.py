"""The background half of one worker's pool (pool.py): a thread that keeps the pool's own
sandboxes, off every call's path.

Each tick (or sooner, when woken) it destroys this worker's doomed sandboxes (broken, over
the host's idle bound, or left taken by a call whose worker died), retires idle ones past
``idle_expiry_s`` (generic ones only beyond the generic target), has node sandboxes idle long
end the Worker they keep started (``pool.node_worker_idle_seconds``), pauses those the runner
pauses while idle, applies the host's idle bound (``pool.max_idle``, ``pool.max_idle_mb``)
to every worker's idle sandboxes, and refills the generic ones: the pool's ``size`` (its
share of the runtime's ``warm``), plus one for each call that had to wait for a new sandbox
lately. Generic sandboxes are made apart from the calls' own (fewer at once, on threads of
their own, so that no call's sandbox waits behind them) and primed before they go to the
board.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from loguru import logger

from nanogrid.common.errors import SandboxError

from .base import Sandbox, SandboxMaker
from .lending import DOOMED, IDLE, TAKEN, Entry, SandboxBoard, Ticket

TICK_S = 0.25
WAKE_GAP_S = 0.05
"""Woken (a sandbox made, doomed), the keeper still tends at most this often: a burst's
hundreds of creates each wake it, and a tend reads every record of the host's board."""
SURGE_WINDOW_S = 30.0
"""A call that had to wait for a new sandbox raises the pool's generic target by one for
this long, or the idle expiry when shorter (up to twice its share): after a burst's first
misses, sandboxes are made ahead of the next calls."""
FILL_BACKOFF_S = 2.0
"""After a failed refill, the keeper waits this long before it tries again."""


class KeptPool(Protocol):
    """What the keeper needs of its pool (pool.py's WarmPool): its owner's side."""

    runtime: str
    size: int
    board: SandboxBoard
    maker: SandboxMaker
    marker: str
    lock: threading.Condition
    making: int
    """Sandboxes being made, under ``lock``."""
    closed: bool

    def owned(self) -> list[Entry]: ...

    def own(self, entry: Entry) -> Sandbox | None: ...

    def room(self) -> int: ...

    def withdraw(self, entry: Entry) -> Sandbox | None: ...

    def give_back(self, sandbox: Sandbox, ticket: Ticket, *, healthy: bool,
                  shrunk: bool = False, idle_since_ns: int | None = None) -> None: ...

    def put(self, sandbox: Sandbox, *, taken: bool) -> Ticket | None: ...

    def destroy_doomed(self, index: int, generation: int) -> None: ...

    def safe_destroy(self, sandbox: Sandbox) -> None: ...


class PoolKeeper:
    def __init__(
        self,
        pool: KeptPool,
        *,
        idle_expiry_s: float,
        idle_bound: tuple[int, int] | None,
        max_fills: int,
    ) -> None:
        self._pool = pool
        self._idle_expiry_s = idle_expiry_s
        self._idle_bound = idle_bound
        """The host's bound on idle sandboxes: (count, bytes); None: none."""
        self._misses: deque[float] = deque()
        """When calls of this pool last had to wait for a new sandbox."""
        self._fill_failed_at = -FILL_BACKOFF_S
        # A long-lived thread: a process sandbox dies with the thread that started it
        # (PR_SET_PDEATHSIG follows the parent thread), so none may be made on a passing one.
        self._fillers = ThreadPoolExecutor(
            max_fills, thread_name_prefix=f"pool-{pool.runtime}-fill"
        )
        self._wake = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"pool-{pool.runtime}", daemon=True
        )
        self._thread.start()

    def missed(self) -> None:
        """Under the pool's lock: a call had to wait for a new sandbox."""
        self._misses.append(time.monotonic())

    def wake(self) -> None:
        """Tend the pool now (a sandbox was doomed, or one was made)."""
        self._wake.set()

    def close(self) -> None:
        """Stop: the thread ends, and the fills under way end (what is not begun is not
        made). Call with the pool closed."""
        self._wake.set()
        self._thread.join(timeout=30)
        self._fillers.shutdown(wait=True)

    def generic_target(self) -> int:
        """Generic sandboxes to keep idle: the pool's share, plus one per call that had to
        wait for a new sandbox lately (``SURGE_WINDOW_S``; at most the share again)."""
        pool = self._pool
        with pool.lock:
            window = min(SURGE_WINDOW_S, self._idle_expiry_s)
            while self._misses and self._misses[0] < time.monotonic() - window:
                self._misses.popleft()
            return pool.size + min(len(self._misses), pool.size)

    def _run(self) -> None:
        while True:
            if self._wake.wait(TICK_S) and not self._pool.closed:
                time.sleep(WAKE_GAP_S)  # the wakes meanwhile join this tend
            self._wake.clear()
            if self._pool.closed:
                return
            try:
                self._tend()
            except Exception as exc:  # noqa: BLE001 - the pool outlives any one failure
                logger.warning(
                    f"{self._pool.marker} tending the {self._pool.runtime} pool failed: {exc!r}"
                )

    def _tend(self) -> None:
        pool = self._pool
        if self._idle_bound is not None:
            doomed = pool.board.doom_beyond(*self._idle_bound)
            if doomed:
                logger.debug(f"{pool.marker} {doomed} idle sandboxes over the host's bound")
        target = self.generic_target()
        now = time.monotonic_ns()
        generic = 0
        for entry in pool.owned():
            if entry.state == DOOMED or (entry.state == TAKEN and entry.taker_gone):
                pool.board.doom(entry)
                pool.destroy_doomed(entry.index, entry.generation)
            elif entry.state == IDLE:
                idle_s = (now - entry.idle_since_ns) / 1e9
                if entry.code_key is None:
                    generic += 1
                    if generic > target and idle_s >= self._idle_expiry_s:
                        self._retire(entry, "surplus generic")
                        generic -= 1
                elif idle_s >= self._idle_expiry_s:
                    self._retire(entry, f"of {entry.code_key}")
                else:
                    self._shrink_if_due(entry, idle_s)
                    self._pause_if_due(entry, idle_s)
        with pool.lock:
            wanted = target - generic - pool.making
            fills = max(0, min(wanted, pool.room()))
            if time.monotonic() - self._fill_failed_at < FILL_BACKOFF_S:
                fills = 0
            pool.making += fills
        for _ in range(fills):
            self._fillers.submit(self._fill_one)

    def _shrink_if_due(self, entry: Entry, idle_s: float) -> None:
        """A node sandbox idle long ends the Worker it keeps for its next call (once): held
        off the board meanwhile, it goes back with its idle time (its place in the
        least-recently-used order) and its smaller memory."""
        pool = self._pool
        sandbox = pool.own(entry)
        if entry.shrunk or sandbox is None or not pool.maker.shrinkable(sandbox, idle_s):
            return
        ticket = pool.board.hold(entry)
        if ticket is None:  # a call took it meanwhile
            return
        # As a take of its own (WarmPool._take): what another worker's call left it with.
        sandbox.code_key, sandbox.frozen = entry.code_key, ticket.frozen
        sandbox.limit_mb = ticket.limit_mb
        shrunk = False
        try:
            shrunk = pool.maker.shrink(sandbox) and not pool.closed
        finally:  # never left held: back to the board, or doomed
            pool.give_back(sandbox, ticket, healthy=shrunk, shrunk=True,
                           idle_since_ns=entry.idle_since_ns)

    def _pause_if_due(self, entry: Entry, idle_s: float) -> None:
        """A sandbox the runner pauses while idle (Docker without a freezer) leaves the board
        to be paused and comes back paused (its next taker unpauses it)."""
        pool = self._pool
        sandbox = pool.own(entry)
        if sandbox is None or not pool.maker.pausable(sandbox, idle_s):
            return
        if pool.withdraw(entry) is not None:
            pool.maker.pause(sandbox)
            with pool.lock:
                ticket = None if pool.closed else pool.put(sandbox, taken=False)
            if ticket is None:
                pool.safe_destroy(sandbox)

    def _fill_one(self) -> None:
        """One generic sandbox for the board (counted in the pool's ``making`` already)."""
        pool = self._pool
        try:
            sandbox = self._made_ahead()
        except Exception as exc:  # noqa: BLE001 - logged; a later tick tries again
            with pool.lock:
                pool.making -= 1
                if pool.closed:
                    return
                self._fill_failed_at = time.monotonic()
            logger.warning(f"{pool.marker} could not make a warm {pool.runtime} sandbox: {exc}")
            return
        with pool.lock:
            pool.making -= 1
            ticket = None if pool.closed else pool.put(sandbox, taken=False)
            pool.lock.notify_all()
        if ticket is None:
            pool.safe_destroy(sandbox)

    def _made_ahead(self) -> Sandbox:
        """A new generic sandbox, primed: made ahead of calls, its first run is not a call's
        (a sandbox made for a waiting call is not: the call's run would wait for it)."""
        pool = self._pool
        if pool.closed:
            raise SandboxError(f"the {pool.runtime} pool is closing")
        sandbox = pool.maker.create(pool.runtime)
        try:
            pool.maker.prime(sandbox)
        except BaseException:
            pool.safe_destroy(sandbox)
            raise
        return sandbox

    def _retire(self, entry: Entry, what: str) -> None:
        if (sandbox := self._pool.withdraw(entry)) is not None:
            logger.debug(f"{self._pool.marker} expired idle sandbox {sandbox.name} {what}")
            self._pool.safe_destroy(sandbox)
