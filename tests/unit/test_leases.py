"""LeaseKeeper: renewals every period, a failed one retried soon, several items at once."""

from __future__ import annotations

import time

from common.errors import QueueUnavailable
from worker.leases import LeaseKeeper


def test_items_are_renewed_every_period_until_discarded() -> None:
    renewed: list[tuple[str, float]] = []
    keeper = LeaseKeeper("test", 0.1, lambda item: renewed.append((item, time.monotonic())))
    try:
        keeper.add("a")
        keeper.add("b")
        time.sleep(0.35)
        keeper.discard("a")
        count_a = sum(1 for item, _ in renewed if item == "a")
        time.sleep(0.25)
    finally:
        keeper.stop()
    assert 2 <= count_a <= 4
    assert sum(1 for item, _ in renewed if item == "a") == count_a  # none after discard
    assert sum(1 for item, _ in renewed if item == "b") >= 4


def test_a_failed_renewal_is_retried_soon_not_a_period_later() -> None:
    calls: list[float] = []

    def renew(item: str) -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise QueueUnavailable("SQS change_message_visibility failed: read timeout")

    keeper = LeaseKeeper("test", 1.0, renew, retry=0.1)
    try:
        keeper.add("m")
        time.sleep(1.4)
    finally:
        keeper.stop()
    assert len(calls) == 2
    assert 0.08 <= calls[1] - calls[0] < 0.5  # the retry, not the next period
