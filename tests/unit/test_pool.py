"""WarmPool: reuse rule, cold starts, bounds, refill and expiry (with fake sandboxes)."""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import wait_until

from runners.base import Sandbox
from runners.pool import WarmPool


class Factory:
    def __init__(self) -> None:
        self.seq = itertools.count()
        self.destroyed: list[str] = []

    def create(self) -> Sandbox:
        return Sandbox(runtime="python", name=f"s{next(self.seq)}", code_dir=Path("/nonexistent"))

    def destroy(self, sandbox: Sandbox) -> None:
        self.destroyed.append(sandbox.name)


def make_pool(size: int, expiry: float = 60.0) -> tuple[WarmPool, Factory]:
    factory = Factory()
    pool = WarmPool("python", size, factory.create, factory.destroy, idle_expiry_s=expiry)
    return pool, factory


def test_fills_to_size_then_serves_warm() -> None:
    pool, _ = make_pool(2)
    try:
        wait_until(lambda: pool.stats() == {"warm": 2, "busy": 0}, timeout=5)
        sandbox = pool.acquire("f@1")
        assert sandbox.cold_start is False and pool.stats() == {"warm": 1, "busy": 1}
    finally:
        pool.close()


def test_a_sandbox_serves_only_the_function_it_ran() -> None:
    pool, _ = make_pool(2)
    try:
        wait_until(lambda: pool.stats()["warm"] == 2, timeout=5)
        a = pool.acquire("a@1")
        a.code_key = "a@1"
        pool.release(a)
        b = pool.acquire("b@1")
        assert b is not a and b.code_key is None
        b.code_key = "b@1"
        pool.release(b)
        assert pool.acquire("a@1") is a
    finally:
        pool.close()


def test_cold_start_when_empty_evicts_lru_to_stay_in_bounds() -> None:
    pool, factory = make_pool(1)
    try:
        wait_until(lambda: pool.stats()["warm"] == 1, timeout=5)
        a = pool.acquire("a@1")
        a.code_key = "a@1"
        pool.release(a)
        b = pool.acquire("b@1")
        assert b.cold_start is True and factory.destroyed == [a.name]
        b.code_key = "b@1"
        pool.release(b)
        assert pool.stats() == {"warm": 1, "busy": 0}
    finally:
        pool.close()


def test_unhealthy_sandboxes_are_destroyed_and_replaced() -> None:
    pool, factory = make_pool(1)
    try:
        sandbox = pool.acquire("f@1")
        sandbox.healthy = False
        pool.release(sandbox)
        assert sandbox.name in factory.destroyed
        wait_until(lambda: pool.stats()["warm"] == 1, timeout=5)
    finally:
        pool.close()


def test_idle_function_sandboxes_expire_into_generic_ones() -> None:
    pool, factory = make_pool(1, expiry=0.2)
    try:
        a = pool.acquire("a@1")
        a.code_key = "a@1"
        pool.release(a)
        wait_until(lambda: a.name in factory.destroyed, timeout=5)
        wait_until(lambda: pool.stats()["warm"] == 1, timeout=5)
        assert pool.acquire("b@1").code_key is None
    finally:
        pool.close()


def test_close_destroys_everything() -> None:
    pool, factory = make_pool(3)
    wait_until(lambda: pool.stats()["warm"] == 3, timeout=5)
    busy = pool.acquire("x")
    pool.close()
    assert sorted(factory.destroyed) == ["s0", "s1", "s2"] and busy.name in factory.destroyed
    time.sleep(0.3)
    assert len(factory.destroyed) == 3


def test_grows_on_demand_in_parallel_then_shrinks_back_to_size() -> None:
    factory = Factory()
    started: list[float] = []

    def slow_create() -> Sandbox:
        started.append(time.monotonic())
        time.sleep(0.3)
        return factory.create()

    pool = WarmPool("python", 1, slow_create, factory.destroy, idle_expiry_s=0.5, limit=6)
    try:
        wait_until(lambda: pool.stats()["warm"] == 1, timeout=5)
        started.clear()
        with ThreadPoolExecutor(6) as threads:
            sandboxes = list(threads.map(lambda _: pool.acquire("f@1"), range(6)))
        assert len({s.name for s in sandboxes}) == 6 and pool.stats() == {"warm": 0, "busy": 6}
        assert len(started) == 5 and max(started) - min(started) < 0.25  # made at once
        for sandbox in sandboxes:
            sandbox.code_key = "f@1"
            pool.release(sandbox)
        assert pool.stats() == {"warm": 6, "busy": 0}  # kept while the load may come back
        again = pool.acquire("f@1")
        assert again.cold_start is False
        pool.release(again)
        wait_until(lambda: len(factory.destroyed) == 6, timeout=5)  # idle past the expiry
        wait_until(lambda: pool.stats() == {"warm": 1, "busy": 0}, timeout=5)  # back to size
    finally:
        pool.close()


def test_never_more_than_limit_sandboxes() -> None:
    pool, factory = make_pool(0)
    pool.limit = 2
    try:
        a, b = pool.acquire("a@1"), pool.acquire("b@1")
        a.code_key, b.code_key = "a@1", "b@1"
        pool.release(a)
        c = pool.acquire("c@1")  # full: the idle a@1 makes room
        assert c.cold_start and factory.destroyed == [a.name]
        pool.release(b)
        pool.release(c)
        assert pool.stats() == {"warm": 2, "busy": 0}
    finally:
        pool.close()


def test_a_run_takes_a_released_sandbox_before_its_own_new_one() -> None:
    factory = Factory()
    made = threading.Event()

    def slow_create() -> Sandbox:
        made.wait(5)
        return factory.create()

    pool = WarmPool("python", 0, slow_create, factory.destroy, idle_expiry_s=60, limit=4)
    try:
        made.set()
        first = pool.acquire("f@1")
        made.clear()
        first.code_key = "f@1"
        with ThreadPoolExecutor(1) as threads:
            waiting = threads.submit(pool.acquire, "f@1")
            time.sleep(0.2)
            assert not waiting.done()  # its sandbox is still being made
            pool.release(first)
            assert waiting.result(timeout=2) is first and first.cold_start is False
        made.set()  # the sandbox ordered meanwhile comes out idle, and its first run is cold
        wait_until(lambda: pool.stats() == {"warm": 1, "busy": 1}, timeout=5)
        fresh = pool.acquire("g@1")
        assert fresh is not first and fresh.code_key is None and fresh.cold_start is True
    finally:
        made.set()
        pool.close()


def test_makes_at_most_max_making_at_once() -> None:
    factory = Factory()
    lock = threading.Lock()
    making = [0, 0]  # now, most

    def slow_create() -> Sandbox:
        with lock:
            making[0] += 1
            making[1] = max(making[1], making[0])
        time.sleep(0.1)
        with lock:
            making[0] -= 1
        return factory.create()

    pool = WarmPool(
        "python", 0, slow_create, factory.destroy, idle_expiry_s=60, limit=8, max_making=2
    )
    try:
        with ThreadPoolExecutor(6) as threads:
            sandboxes = list(threads.map(lambda _: pool.acquire("f@1"), range(6)))
        assert len({s.name for s in sandboxes}) == 6 and making[1] == 2
        assert all(s.cold_start for s in sandboxes)
    finally:
        pool.close()


def test_a_failed_make_is_raised_to_the_run_that_ordered_it() -> None:
    def broken() -> Sandbox:
        raise RuntimeError("engine down")

    pool = WarmPool("python", 0, broken, lambda s: None, idle_expiry_s=60, limit=2)
    try:
        with pytest.raises(RuntimeError, match="engine down"):
            pool.acquire("f@1")
        assert pool.stats() == {"warm": 0, "busy": 0}
    finally:
        pool.close()


def test_close_waits_for_sandboxes_being_made_and_removes_them() -> None:
    factory = Factory()
    made = threading.Event()

    def slow_create() -> Sandbox:
        made.wait(5)
        time.sleep(0.2)
        return factory.create()

    pool = WarmPool("python", 0, slow_create, factory.destroy, idle_expiry_s=60, limit=4)
    made.set()
    first = pool.acquire("f@1")
    made.clear()
    with ThreadPoolExecutor(1) as threads:
        waiting = threads.submit(pool.acquire, "f@1")
        time.sleep(0.1)
        pool.release(first)  # the waiting run takes it; its order is still being made
        assert waiting.result(timeout=2) is first
    made.set()
    pool.close()  # returns once the ordered sandbox is made, and removes it
    assert sorted(factory.destroyed) == ["s0", "s1"]


def test_an_order_not_begun_when_its_run_was_served_is_not_made() -> None:
    factory = Factory()
    gate = threading.Event()

    def gated_create() -> Sandbox:
        gate.wait(5)
        return factory.create()

    pool = WarmPool(
        "python", 0, gated_create, factory.destroy, idle_expiry_s=60, limit=4, max_making=1
    )
    try:
        gate.set()
        first = pool.acquire("f@1")
        gate.clear()
        first.code_key = "f@1"
        with ThreadPoolExecutor(2) as threads:
            making = threads.submit(pool.acquire, "g@1")  # its order holds the one maker
            time.sleep(0.1)
            queued = threads.submit(pool.acquire, "f@1")  # its order waits for the maker
            time.sleep(0.1)
            pool.release(first)
            assert queued.result(timeout=2) is first
            gate.set()
            assert making.result(timeout=2).cold_start
        time.sleep(0.2)
        assert next(factory.seq) == 2  # s0, s1: the queued order was never made
    finally:
        gate.set()
        pool.close()
