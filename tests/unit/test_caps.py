"""A message of a function at its cap: how long it waits in SQS, and when the worker asks
Redis again."""

from __future__ import annotations

import time

import pytest

from nanogrid.worker import caps
from nanogrid.worker.caps import CapGate, delay_for


def test_the_delay_grows_with_the_receives_within_its_jitter_and_bounds() -> None:
    for receives, (lo, hi) in {1: (1, 1), 4: (1, 3), 10: (5, 10), 40: (21, 39)}.items():
        delays = {delay_for(receives) for _ in range(500)}
        assert lo <= min(delays) and max(delays) <= hi, receives
    assert len({delay_for(10) for _ in range(500)}) >= 3  # jittered: a burst spreads out
    assert max(delay_for(1000) for _ in range(500)) <= caps.MAX_DELAY_S * (1 + caps.JITTER)


def test_redis_is_asked_again_a_moment_after_a_function_was_found_at_its_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = CapGate()
    assert not gate.known_at_cap("f")
    gate.at_cap("f", 3, 3)
    assert gate.known_at_cap("f") and not gate.known_at_cap("g")
    now = time.monotonic()
    monkeypatch.setattr(caps.time, "monotonic", lambda: now + caps.ASK_AGAIN_S + 0.01)
    assert not gate.known_at_cap("f")


def test_a_slot_taken_ends_the_wait_at_once() -> None:
    gate = CapGate()
    gate.at_cap("f", 3, 3)
    gate.took_slot("f", 3, 3)
    assert not gate.known_at_cap("f")
