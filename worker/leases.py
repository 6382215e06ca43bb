"""Keeps the leases of running tasks alive: SQS visibility, requestId claims.

A ``LeaseKeeper`` renews each item it holds every ``period`` seconds from a thread of its
own, so a run of any length keeps its message invisible and its claim owned while the
worker lives, and both lapse soon after it dies. A renewal that fails is retried after
``retry`` seconds instead of a whole period later: a lease missed once still has two thirds
of its time left. Items are added and discarded from any thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from loguru import logger

from common.errors import NanoGridError

T = TypeVar("T", bound=Hashable)


class LeaseKeeper(Generic[T]):
    def __init__(
        self, name: str, period: float, renew: Callable[[T], None], retry: float = 1.0
    ) -> None:
        self.name = name
        self.period = period
        self.retry = min(retry, period)
        self._renew = renew
        self._due: dict[T, float] = {}
        self._wakes_at = float("inf")
        """When the keeper's thread wakes next unless notified: an item due later needs no
        wake-up, so a task's add costs no thread switch while another item is pending."""
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def add(self, item: T) -> None:
        """Renew ``item`` every period from now on."""
        with self._cond:
            due = self._due[item] = time.monotonic() + self.period
            if due < self._wakes_at:
                self._cond.notify()

    def discard(self, item: T) -> None:
        """Stop renewing ``item`` (its run ended)."""
        with self._cond:
            self._due.pop(item, None)

    def stop(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _next(self) -> T | None:
        """Wait for the next item due; None once stopped."""
        with self._cond:
            while not self._closed:
                if not self._due:
                    self._wakes_at = float("inf")
                    self._cond.wait()
                    continue
                item, at = min(self._due.items(), key=lambda entry: entry[1])
                wait = at - time.monotonic()
                if wait <= 0:
                    self._due[item] = time.monotonic() + self.period
                    return item
                self._wakes_at = at
                self._cond.wait(wait)
            return None

    def _loop(self) -> None:
        while (item := self._next()) is not None:
            try:
                self._renew(item)
            except Exception as exc:  # noqa: BLE001 - the keeper outlives any one failure
                level = "WARNING" if isinstance(exc, NanoGridError) else "ERROR"
                logger.log(level, f"[{self.name}] renewal failed: {exc}; retrying in "
                                  f"{self.retry:g}s")
                with self._cond:
                    if item in self._due:
                        self._due[item] = time.monotonic() + self.retry
