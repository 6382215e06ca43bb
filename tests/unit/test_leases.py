"""LeaseKeeper: renewals every period in batches, most urgent first, a failed batch retried
soon, many items renewed within a lease even when each call is slow."""

from __future__ import annotations

import itertools
import threading
import time

from helpers import wait_until

from nanogrid.common.errors import QueueUnavailable
from nanogrid.worker.leases import LeaseKeeper


class Recorder:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[tuple[float, list[str]]] = []
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, batch: list[str]) -> None:
        time.sleep(self.delay)
        with self._lock:
            self.calls.append((time.monotonic(), list(batch)))

    def count(self, item: str) -> int:
        return sum(batch.count(item) for _, batch in self.calls)


def test_items_are_renewed_every_period_until_discarded() -> None:
    renewed = Recorder()
    keeper = LeaseKeeper("test", 0.1, renewed)
    try:
        keeper.add("a")
        keeper.add("b")
        wait_until(lambda: renewed.count("a") >= 2, timeout=5)
        keeper.discard("a")  # a call with it may be under way: it ends within a period
        count_b = renewed.count("b")
        wait_until(lambda: renewed.count("b") >= count_b + 2, timeout=5)
        count_a, count_b = renewed.count("a"), renewed.count("b")
        wait_until(lambda: renewed.count("b") >= count_b + 2, timeout=5)
    finally:
        keeper.stop()
    assert renewed.count("a") == count_a  # none after discard
    renewals_of_b = [at for at, batch in renewed.calls if "b" in batch]
    gaps = [later - earlier for earlier, later in itertools.pairwise(renewals_of_b)]
    assert min(gaps) >= 0.05, gaps  # a period apart (one due soon may join a call: half)


def test_items_due_close_together_share_one_call_of_at_most_batch_items() -> None:
    renewed = Recorder()
    keeper = LeaseKeeper("test", 1.0, renewed, batch=3)
    try:
        for name in "abcdefg":  # added over ~70 ms: all within half a period of the first
            keeper.add(name)
            time.sleep(0.01)
        wait_until(lambda: sum(len(batch) for _, batch in renewed.calls) >= 7, timeout=5)
    finally:
        keeper.stop()
    first_round = [batch for at, batch in renewed.calls if at < renewed.calls[0][0] + 0.5]
    assert [len(batch) for batch in first_round] == [3, 3, 1]
    assert [name for batch in first_round for name in batch] == list("abcdefg")  # most urgent first


def test_a_failed_renewal_is_retried_soon_not_a_period_later() -> None:
    calls: list[float] = []

    def renew(batch: list[str]) -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise QueueUnavailable("SQS change_message_visibility_batch failed: read timeout")

    keeper = LeaseKeeper("test", 1.0, renew, retry=0.1)
    try:
        keeper.add("m")
        time.sleep(1.4)
    finally:
        keeper.stop()
    assert len(calls) == 2
    assert 0.08 <= calls[1] - calls[0] < 0.5  # the retry, not the next period


def test_two_hundred_leases_renew_within_a_lease_against_a_slow_peer() -> None:
    """A lease of 3 s renewed every 1 s; each call takes 0.2 s (a peer answering slowly)
    and carries 10 items (SQS's batch size): 20 calls, 4 at a time, take about 1 s."""
    renewed = Recorder(delay=0.2)
    keeper = LeaseKeeper("test", 1.0, renewed, batch=10, parallel=4)
    added = time.monotonic()
    try:
        for n in range(200):
            keeper.add(f"m{n}")
        time.sleep(2.5)
    finally:
        keeper.stop()
    last_renewal: dict[str, float] = {}
    for at, batch in renewed.calls:
        for item in batch:
            last_renewal.setdefault(item, at)
    assert len(last_renewal) == 200
    assert max(last_renewal.values()) - added < 3.0  # every one before its lease ran out
