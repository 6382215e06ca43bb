"""Keeps the leases of running tasks alive: SQS visibility, requestId claims.

A ``LeaseKeeper`` renews each item it holds every ``period`` seconds from a thread of its
own, so a run of any length keeps its message invisible and its claim owned while the
worker lives, and both lapse soon after it dies. Renewals go in batches (one Redis script
for many claims, one ChangeMessageVisibilityBatch per ten messages): when an item is due,
every item due within the next half period goes with it, most urgent first, up to
``parallel`` batches at once. So 200 runs in flight cost a handful of round trips per
period, and a peer that answers in seconds still renews them all well inside a lease, where
one call per item on one thread would not. A batch that fails is retried after ``retry``
seconds instead of a whole period later: a lease missed once still has two thirds of its
time left. Items are added and discarded from any thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from loguru import logger

from nanogrid.common.errors import NanoGridError

T = TypeVar("T", bound=Hashable)


class LeaseKeeper(Generic[T]):
    def __init__(
        self,
        name: str,
        period: float,
        renew: Callable[[list[T]], None],
        retry: float = 1.0,
        *,
        batch: int = 100,
        parallel: int = 1,
    ) -> None:
        """``renew`` renews one batch (at most ``batch`` items) and raises when it failed as
        a whole."""
        self.name = name
        self.period = period
        self.retry = min(retry, period)
        self._renew = renew
        self._batch = max(1, batch)
        self._due: dict[T, float] = {}
        self._wakes_at = float("inf")
        """When the keeper's thread wakes next unless notified: an item due later needs no
        wake-up, so a task's add costs no thread switch while another item is pending."""
        self._cond = threading.Condition()
        self._closed = False
        self._batches = ThreadPoolExecutor(parallel, thread_name_prefix=f"{name}-renew")
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

    def __contains__(self, item: object) -> bool:
        with self._cond:
            return item in self._due

    def __len__(self) -> int:
        with self._cond:
            return len(self._due)

    def stop(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)
        self._batches.shutdown(wait=False, cancel_futures=True)

    def _next_round(self) -> list[T] | None:
        """Wait until an item is due; then it and every item due within half a period, most
        urgent first (each due again a period from now). None once stopped."""
        with self._cond:
            while not self._closed:
                if not self._due:
                    self._wakes_at = float("inf")
                    self._cond.wait()
                    continue
                now = time.monotonic()
                first = min(self._due.values())
                if first > now:
                    self._wakes_at = first
                    self._cond.wait(first - now)
                    continue
                horizon = now + self.period / 2
                due = sorted(
                    (at, n, item) for n, (item, at) in enumerate(self._due.items())
                    if at <= horizon
                )
                for _, _, item in due:
                    self._due[item] = now + self.period
                return [item for _, _, item in due]
            return None

    def _loop(self) -> None:
        while (items := self._next_round()) is not None:
            batches = [items[i:i + self._batch] for i in range(0, len(items), self._batch)]
            for done in [self._batches.submit(self._renew_batch, b) for b in batches]:
                done.result()

    def _renew_batch(self, batch: list[T]) -> None:
        try:
            self._renew(batch)
        except Exception as exc:  # noqa: BLE001 - the keeper outlives any one failure
            level = "WARNING" if isinstance(exc, NanoGridError) else "ERROR"
            logger.log(level, f"[{self.name}] renewal of {len(batch)} failed: {exc}; "
                              f"retrying in {self.retry:g}s")
            retry_at = time.monotonic() + self.retry
            with self._cond:
                for item in batch:
                    if item in self._due:
                        self._due[item] = retry_at
                if retry_at < self._wakes_at:
                    self._cond.notify()
