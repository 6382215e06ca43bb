"""A worker's warm pool of sandboxes for one runtime, refilled in the background.

The pool keeps ``size`` sandboxes ready (the runtime's ``warm`` share) and follows the load
up to ``limit`` (idle + busy + being made): ``acquire`` prefers, in order, an idle sandbox
that already ran this function@version and a fresh generic one; else it orders a new one
(after evicting the least recently used idle sandbox of another function when at ``limit``)
and takes whichever comes first: its own new sandbox, or one that another run releases in
the meantime (the new one then stays idle for the next, or is not made if not begun yet).
At most ``max_making`` sandboxes are made at once: a few at a time come out one after
another and serve a burst early, where many at once would all come out late (a Docker
engine shares 2 cores among them).
Idle sandboxes of a function expire after ``idle_expiry_s``, and so do generic ones beyond
``size``: the pool shrinks back to ``size`` generic ones, so the reuse rule (a sandbox
serves one function only) never starves new functions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from loguru import logger

from common.errors import SandboxError

from .base import Sandbox

_TICK_S = 0.25


class WarmPool:
    def __init__(
        self,
        runtime: str,
        size: int,
        create: Callable[[], Sandbox],
        destroy: Callable[[Sandbox], None],
        *,
        idle_expiry_s: float,
        on_idle: Callable[[Sandbox, float], None] | None = None,
        marker: str = "[POOL]",
        limit: int | None = None,
        max_making: int | None = None,
    ) -> None:
        self.runtime = runtime
        self.size = size
        self.limit = max(size, limit or 0, 1)
        self._create = create
        self._destroy = destroy
        self._on_idle = on_idle
        self._idle_expiry_s = idle_expiry_s
        self._marker = marker
        self._idle: list[Sandbox] = []
        self._busy: set[Sandbox] = set()
        self._creating = 0
        self._fresh: set[int] = set()
        """ids of sandboxes made on demand and not yet used: their first run is cold."""
        self._lock = threading.Condition()
        # Long-lived threads: a process sandbox dies with the thread that started it
        # (PR_SET_PDEATHSIG follows the parent thread), so none may be made on a passing one.
        self._makers = ThreadPoolExecutor(
            max_making or self.limit, thread_name_prefix=f"pool-{runtime}-make"
        )
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._maintain, name=f"pool-{runtime}", daemon=True)
        self._thread.start()

    def acquire(self, code_key: str) -> Sandbox:
        with self._lock:
            sandbox = self._take(code_key)
            if sandbox is not None:
                return self._hand_out(sandbox)
            evicted = self._evict_for_room()
            self._creating += 1
            order = _Order()
        if evicted is not None:
            self._safe_destroy(evicted)
        self._makers.submit(self._make, order)
        with self._lock:
            while True:
                if order.sandbox is not None:
                    order.sandbox.cold_start = True
                    return order.sandbox
                if order.error is not None:
                    raise order.error
                sandbox = self._take(code_key)
                if sandbox is not None:  # released first: the order stays idle for the next
                    order.abandoned = True
                    return self._hand_out(sandbox)
                self._lock.wait()

    def _hand_out(self, sandbox: Sandbox) -> Sandbox:
        """Under the lock: ``sandbox`` (taken from idle) is now busy."""
        sandbox.cold_start = id(sandbox) in self._fresh
        self._fresh.discard(id(sandbox))
        self._busy.add(sandbox)
        return sandbox

    def _make(self, order: _Order) -> None:
        """Background: make the sandbox ``order`` asked for (a few at a time), and deliver it
        to the order, or to idle if its run was served by another one meanwhile."""
        sandbox: Sandbox | None = None
        error: BaseException | None = None
        # Not begun by the time its run was served by a released sandbox: no longer wanted (a
        # burst would otherwise go on making containers long after it was served).
        if not self._closed and not order.abandoned:
            try:
                sandbox = self._create()
            except BaseException as exc:  # delivered to the run that ordered it
                error = exc
        doomed = None
        with self._lock:
            self._creating -= 1
            if sandbox is None:
                if not order.abandoned:
                    order.error = error or SandboxError(f"the {self.runtime} pool is closing")
                elif error is not None and not self._closed:
                    logger.warning(
                        f"{self._marker} could not make a {self.runtime} sandbox: {error}"
                    )
            elif self._closed and order.abandoned:
                doomed = sandbox
            elif order.abandoned:
                sandbox.idle_since = time.monotonic()
                self._idle.append(sandbox)
                self._fresh.add(id(sandbox))
            else:
                self._busy.add(sandbox)
                order.sandbox = sandbox
            self._lock.notify_all()
        if doomed is not None:
            self._safe_destroy(doomed)
        self._wake.set()

    def release(self, sandbox: Sandbox) -> None:
        with self._lock:
            self._busy.discard(sandbox)
            keep = sandbox.healthy and not self._closed and self._count() < self.limit
            if keep:
                sandbox.idle_since = time.monotonic()
                self._idle.append(sandbox)
                self._lock.notify_all()
        if not keep:
            self._safe_destroy(sandbox)
            self._wake.set()

    def shed_idle(self) -> int:
        """Destroy the idle sandboxes that hold a function's code (the disk runs short: their
        unpacked code goes with them); generic ones stay. Returns how many went."""
        with self._lock:
            doomed = [s for s in self._idle if s.code_key is not None]
            for sandbox in doomed:
                self._idle.remove(sandbox)
                self._fresh.discard(id(sandbox))
        for sandbox in doomed:
            self._safe_destroy(sandbox)
        return len(doomed)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"warm": len(self._idle), "busy": len(self._busy)}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            doomed = self._idle + list(self._busy)
            self._idle.clear()
            self._busy.clear()
            self._fresh.clear()
        self._wake.set()
        self._thread.join(timeout=30)
        # What is being made goes to its run or is removed, before the runner tears down what
        # sandboxes stand on; what is not begun yet is not made.
        self._makers.shutdown(wait=True)
        for sandbox in doomed:
            self._safe_destroy(sandbox)

    def _take(self, code_key: str) -> Sandbox | None:
        for wanted in (code_key, None):
            for i in range(len(self._idle) - 1, -1, -1):
                if self._idle[i].code_key == wanted:
                    return self._idle.pop(i)
        return None

    def _evict_for_room(self) -> Sandbox | None:
        if self._count() < self.limit or not self._idle:
            return None
        evicted = self._idle.pop(
            min(range(len(self._idle)), key=lambda i: self._idle[i].idle_since)
        )
        self._fresh.discard(id(evicted))
        return evicted

    def _count(self) -> int:
        return len(self._idle) + len(self._busy) + self._creating

    def _maintain(self) -> None:
        """Background: keep the pool full, expire idle function sandboxes, run idle hooks."""
        while True:
            self._wake.wait(_TICK_S)
            self._wake.clear()
            if self._closed:
                return
            self._expire_idle()
            self._fill()

    def _expire_idle(self) -> None:
        now = time.monotonic()
        with self._lock:
            stale = [s for s in self._idle if now - s.idle_since >= self._idle_expiry_s]
            surplus = self._count() - self.size  # generic ones beyond ``size`` go too
            expired = []
            for sandbox in sorted(stale, key=lambda s: s.code_key is None):
                if sandbox.code_key is not None or surplus > 0:
                    expired.append(sandbox)
                    surplus -= 1
            for sandbox in expired:
                self._idle.remove(sandbox)
                self._fresh.discard(id(sandbox))
            if self._on_idle is not None:
                for sandbox in self._idle:
                    self._on_idle(sandbox, now - sandbox.idle_since)
        for sandbox in expired:
            logger.debug(
                f"{self._marker} expired idle sandbox {sandbox.name} of {sandbox.code_key}"
            )
            self._safe_destroy(sandbox)

    def _fill(self) -> None:
        while True:
            with self._lock:
                if self._closed or self._count() >= self.size:
                    return
                self._creating += 1
            try:
                sandbox = self._create()
            except Exception as exc:
                logger.warning(
                    f"{self._marker} could not make a warm {self.runtime} sandbox: {exc}"
                )
                with self._lock:
                    self._creating -= 1
                self._wake.wait(2.0)  # back off instead of retrying in a hot loop
                return
            with self._lock:
                self._creating -= 1
                if self._closed:
                    doomed = sandbox
                else:
                    doomed = None
                    sandbox.idle_since = time.monotonic()
                    self._idle.append(sandbox)
                    self._lock.notify_all()
            if doomed is not None:
                self._safe_destroy(doomed)
                return

    def _safe_destroy(self, sandbox: Sandbox) -> None:
        try:
            self._destroy(sandbox)
        except Exception as exc:
            logger.warning(f"{self._marker} could not remove sandbox {sandbox.name}: {exc}")


class _Order:
    """A sandbox one acquire asked to be made."""

    def __init__(self) -> None:
        self.sandbox: Sandbox | None = None
        self.error: BaseException | None = None
        self.abandoned = False
        """Its run took a released sandbox instead; the new one goes to idle."""


def warm_share(warm: int, workers: int, index: int) -> int:
    """This worker's slice of a runtime's warm pool size, split evenly across workers."""
    return warm // workers + (1 if index < warm % workers else 0)
