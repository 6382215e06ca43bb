"""WarmPool: reuse rule, cold starts, bounds, refill, expiry, lending across workers (fake
sandboxes on a real board)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until

from nanogrid.common.errors import SandboxError
from nanogrid.runners.base import Sandbox
from nanogrid.runners.lending import IDLE, SandboxBoard
from nanogrid.runners.pool import WarmPool


class Maker:
    """A SandboxMaker of fake sandboxes; ``make`` may be swapped for a slow or failing one."""

    def __init__(self, idle_bytes: int = 0) -> None:
        self.seq = itertools.count()
        self.destroyed: list[str] = []
        self.primed: list[str] = []
        self.prime_error: SandboxError | None = None
        self.borrowed: list[dict[str, Any]] = []
        self.attached: list[str] = []
        self.gone: set[str] = set()
        self.bytes = idle_bytes
        self.shrunk: list[str] = []
        self.make: Callable[[], Sandbox] = self.new

    def new(self) -> Sandbox:
        return Sandbox(runtime="python", name=f"s{next(self.seq)}", code_dir=Path("/nonexistent"))

    def create(self, runtime: str) -> Sandbox:
        return self.make()

    def prime(self, sandbox: Sandbox) -> None:
        if self.prime_error is not None:
            raise self.prime_error
        self.primed.append(sandbox.name)

    def destroy(self, sandbox: Sandbox) -> None:
        self.destroyed.append(sandbox.name)

    def describe(self, sandbox: Sandbox) -> dict[str, Any]:
        return {"name": sandbox.name}

    def borrow(self, runtime: str, descriptor: dict[str, Any]) -> Sandbox:
        self.borrowed.append(descriptor)
        return Sandbox(runtime=runtime, name=descriptor["name"], code_dir=Path("/nonexistent"))

    def attach(self, sandbox: Sandbox) -> None:
        if sandbox.name in self.gone:
            raise SandboxError(f"{sandbox.name} is gone")
        self.attached.append(sandbox.name)

    def detach(self, sandbox: Sandbox) -> None:
        pass

    def idle_bytes(self, sandbox: Sandbox) -> int:
        return self.bytes

    def pausable(self, sandbox: Sandbox, idle_s: float) -> bool:
        return False

    def pause(self, sandbox: Sandbox) -> None:
        raise AssertionError("not pausable")

    shrink_after_s: float | None = None
    shrink_ok: bool | None = True
    """None: ``shrink`` raises."""

    def shrinkable(self, sandbox: Sandbox, idle_s: float) -> bool:
        after = self.shrink_after_s
        return after is not None and idle_s >= after

    def shrink(self, sandbox: Sandbox) -> bool:
        self.shrunk.append(sandbox.name)
        self.bytes //= 2
        if self.shrink_ok is None:
            raise RuntimeError("a bug while shrinking")
        return self.shrink_ok


@pytest.fixture
def board() -> Iterator[SandboxBoard]:
    board = SandboxBoard()
    yield board
    board.close()


def make_pool(board: SandboxBoard, size: int, maker: Maker | None = None, *, slot: int = 0,
              expiry: float = 60.0, limit: int = 8, max_making: int | None = None,
              idle_bound: tuple[int, int] | None = None) -> tuple[WarmPool, Maker]:
    maker = maker or Maker()
    pool = WarmPool("python", size, maker, board, slot, idle_expiry_s=expiry, limit=limit,
                    max_making=max_making, idle_bound=idle_bound)
    return pool, maker


def served(pool: WarmPool, key: str) -> Sandbox:
    """A call of ``key``: acquire, put the code in, release."""
    sandbox = pool.acquire(key)
    sandbox.code_key = key
    pool.release(sandbox)
    return sandbox


def test_fills_to_size_then_serves_warm(board: SandboxBoard) -> None:
    pool, _ = make_pool(board, 2)
    try:
        wait_until(lambda: pool.stats() == {"warm": 2, "busy": 0}, timeout=5)
        sandbox = pool.acquire("f@1")
        assert sandbox.cold_start is False and pool.stats() == {"warm": 1, "busy": 1}
    finally:
        pool.close()


def test_a_sandbox_serves_only_the_function_it_ran(board: SandboxBoard) -> None:
    pool, _ = make_pool(board, 2)
    try:
        wait_until(lambda: pool.stats()["warm"] == 2, timeout=5)
        a = served(pool, "a@1")
        b = pool.acquire("b@1")
        assert b is not a and b.code_key is None
        b.code_key = "b@1"
        pool.release(b)
        assert pool.acquire("a@1") is a
    finally:
        pool.close()


def test_a_generic_sandbox_given_a_function_is_replaced_off_the_call_path(
        board: SandboxBoard) -> None:
    pool, maker = make_pool(board, 2)
    try:
        wait_until(lambda: pool.stats()["warm"] == 2, timeout=5)
        for key in ("a@1", "b@1", "c@1"):
            sandbox = served(pool, key)
            assert sandbox.cold_start is False  # a generic one, made before the call
            wait_until(lambda: sum(e.code_key is None for e in board.entries()) == 2, timeout=5)
        assert next(maker.seq) == 5  # 2 at start, one refill per function
    finally:
        pool.close()


def test_cold_start_when_empty_evicts_lru_to_stay_in_bounds(board: SandboxBoard) -> None:
    pool, maker = make_pool(board, 1, limit=1)
    try:
        wait_until(lambda: pool.stats()["warm"] == 1, timeout=5)
        a = served(pool, "a@1")
        b = pool.acquire("b@1")
        assert b.cold_start is True and maker.destroyed == [a.name]
        b.code_key = "b@1"
        pool.release(b)
        assert pool.stats() == {"warm": 1, "busy": 0}
    finally:
        pool.close()


def test_unhealthy_sandboxes_are_destroyed_and_replaced(board: SandboxBoard) -> None:
    pool, maker = make_pool(board, 1)
    try:
        wait_until(lambda: pool.stats()["warm"] == 1, timeout=5)
        sandbox = pool.acquire("f@1")
        sandbox.healthy = False
        pool.release(sandbox)
        assert sandbox.name in maker.destroyed
        wait_until(lambda: pool.stats()["warm"] == 1, timeout=5)
    finally:
        pool.close()


def test_idle_function_sandboxes_expire_into_generic_ones(board: SandboxBoard) -> None:
    pool, maker = make_pool(board, 1, expiry=0.2)
    try:
        a = served(pool, "a@1")
        wait_until(lambda: a.name in maker.destroyed, timeout=5)
        wait_until(lambda: pool.stats()["warm"] == 1, timeout=5)
        assert pool.acquire("b@1").code_key is None
    finally:
        pool.close()


def test_close_destroys_everything(board: SandboxBoard) -> None:
    pool, maker = make_pool(board, 3)
    wait_until(lambda: pool.stats()["warm"] == 3, timeout=5)
    busy = pool.acquire("x")
    pool.close()
    assert sorted(maker.destroyed) == ["s0", "s1", "s2"] and busy.name in maker.destroyed
    time.sleep(0.3)
    assert len(maker.destroyed) == 3 and board.entries() == []


def test_close_waits_for_a_sandbox_another_worker_took_while_it_closed(
    board: SandboxBoard, monkeypatch: pytest.MonkeyPatch,
) -> None:
    owner, maker = make_pool(board, 1, slot=0)
    other, _ = make_pool(board, 0, slot=1)
    wait_until(lambda: owner.stats()["warm"] == 1, timeout=5)
    taken: list[Sandbox] = []
    withdraw = board.withdraw

    def losing_the_race(entry: Any) -> bool:  # the other worker's call takes it first
        if not taken:
            taken.append(other.acquire("f@1"))
        return withdraw(entry)

    monkeypatch.setattr(board, "withdraw", losing_the_race)
    closing = threading.Thread(target=owner.close)
    closing.start()
    try:
        time.sleep(0.3)
        assert closing.is_alive() and maker.destroyed == []  # the lent run goes on
        other.release(taken[0])
        closing.join(5)
        assert not closing.is_alive() and maker.destroyed == ["s0"]
    finally:
        other.close()


def test_grows_on_demand_in_parallel_then_shrinks_back_to_size(board: SandboxBoard) -> None:
    maker = Maker()
    started: list[tuple[float, str]] = []

    def slow_new() -> Sandbox:
        started.append((time.monotonic(), threading.current_thread().name))
        time.sleep(0.3)
        return maker.new()

    maker.make = slow_new
    pool, _ = make_pool(board, 1, maker, expiry=0.5, limit=6)
    try:
        wait_until(lambda: pool.stats()["warm"] == 1, timeout=5)
        started.clear()
        with ThreadPoolExecutor(6) as threads:
            sandboxes = list(threads.map(lambda _: pool.acquire("f@1"), range(6)))
        assert len({s.name for s in sandboxes}) == 6 and pool.stats()["busy"] == 6
        # The calls' own sandboxes are made at once (a filler's refill may start apart, and
        # serve one of them: that call's own is then not begun).
        for_calls = [at for at, thread in started if thread.startswith("pool-python-make")]
        assert len(for_calls) >= 4 and max(for_calls) - min(for_calls) < 0.25
        for sandbox in sandboxes:
            sandbox.code_key = "f@1"
            pool.release(sandbox)
        assert pool.acquire("f@1").cold_start is False  # kept while the load may come back
        wait_until(lambda: len(maker.destroyed) >= 5, timeout=5)  # idle past the expiry
        wait_until(lambda: pool.stats()["warm"] == 1, timeout=5)  # back to size
    finally:
        pool.close()


def test_calls_that_waited_for_a_sandbox_make_the_pool_keep_more_generic_ones(
    board: SandboxBoard,
) -> None:
    maker = Maker()

    def new_slowly_ahead_of_calls() -> Sandbox:
        # A filler slower than a call's own make: a call that missed gets its own sandbox, not
        # one made ahead meanwhile (else how many calls waited depends on the scheduler).
        if threading.current_thread().name.startswith("pool-python-fill"):
            time.sleep(0.3)
        return maker.new()

    maker.make = new_slowly_ahead_of_calls
    pool, _ = make_pool(board, 2, maker, expiry=5.0)
    try:
        wait_until(lambda: generic_idle(board) == 2, timeout=5)
        with ThreadPoolExecutor(4) as threads:  # 2 take the generic ones, 2 wait for new ones
            sandboxes = list(threads.map(lambda i: pool.acquire(f"f{i}@1"), range(4)))
        assert sum(s.cold_start for s in sandboxes) == 2
        # Made ahead of the next calls: the share (2) plus one per miss (at most the share).
        wait_until(lambda: generic_idle(board) == 4, timeout=5)
        for i, sandbox in enumerate(sandboxes):
            sandbox.code_key = f"f{i}@1"
            pool.release(sandbox)
        time.sleep(0.6)
        assert generic_idle(board) == 4 and maker.destroyed == []  # no churn meanwhile
    finally:
        pool.close()


def generic_idle(board: SandboxBoard) -> int:
    return sum(e.state == IDLE and e.code_key is None for e in board.entries())


def test_never_more_than_limit_sandboxes(board: SandboxBoard) -> None:
    pool, maker = make_pool(board, 0, limit=2)
    try:
        a, b = pool.acquire("a@1"), pool.acquire("b@1")
        a.code_key, b.code_key = "a@1", "b@1"
        pool.release(a)
        c = pool.acquire("c@1")  # full: the idle a@1 makes room
        assert c.cold_start and maker.destroyed == [a.name]
        pool.release(b)
        pool.release(c)
        assert pool.stats() == {"warm": 2, "busy": 0}
    finally:
        pool.close()


def test_a_run_takes_a_released_sandbox_before_its_own_new_one(board: SandboxBoard) -> None:
    maker = Maker()
    made = threading.Event()

    def slow_new() -> Sandbox:
        made.wait(5)
        return maker.new()

    maker.make = slow_new
    pool, _ = make_pool(board, 0, maker, limit=4)
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
        made.set()  # the sandbox ordered meanwhile comes out idle: the next call finds it ready
        wait_until(lambda: pool.stats() == {"warm": 1, "busy": 1}, timeout=5)
        fresh = pool.acquire("g@1")
        assert fresh is not first and fresh.code_key is None and fresh.cold_start is False
    finally:
        made.set()
        pool.close()


def test_a_call_that_waited_and_took_a_sandbox_made_ahead_meanwhile_is_cold(
    board: SandboxBoard,
) -> None:
    """coldStart (DESIGN.md): no warm sandbox was ready and one had to be made. A filler's
    generic sandbox made after the call missed is one made for it, whoever made it."""
    maker = Maker()
    fill, own = threading.Event(), threading.Event()

    def new() -> Sandbox:
        filler = threading.current_thread().name.startswith("pool-python-fill")
        (fill if filler else own).wait(5)
        return maker.new()

    maker.make = new
    fill.set()
    pool, _ = make_pool(board, 1, maker)
    try:
        wait_until(lambda: generic_idle(board) == 1, timeout=5)
        fill.clear()
        assert pool.acquire("f@1").cold_start is False  # the one ready
        with ThreadPoolExecutor(1) as threads:
            waiting = threads.submit(pool.acquire, "g@1")
            wait_until(lambda: pool.making >= 2, timeout=5)  # its own and the refill
            fill.set()  # the filler's comes first; the call's own is still being made
            taken = waiting.result(timeout=5)
        assert taken.cold_start is True and taken.code_key is None
    finally:
        own.set()
        pool.close()


def test_makes_at_most_max_making_at_once(board: SandboxBoard) -> None:
    maker = Maker()
    lock = threading.Lock()
    making = [0, 0]  # now, most

    def slow_new() -> Sandbox:
        with lock:
            making[0] += 1
            making[1] = max(making[1], making[0])
        time.sleep(0.1)
        with lock:
            making[0] -= 1
        return maker.new()

    maker.make = slow_new
    pool, _ = make_pool(board, 0, maker, limit=8, max_making=2)
    try:
        with ThreadPoolExecutor(6) as threads:
            sandboxes = list(threads.map(lambda _: pool.acquire("f@1"), range(6)))
        assert len({s.name for s in sandboxes}) == 6 and making[1] == 2
        assert all(s.cold_start for s in sandboxes)
    finally:
        pool.close()


def test_a_failed_make_is_raised_to_the_run_that_ordered_it(board: SandboxBoard) -> None:
    def broken() -> Sandbox:
        raise RuntimeError("engine down")

    maker = Maker()
    maker.make = broken
    pool, _ = make_pool(board, 0, maker, limit=2)
    try:
        with pytest.raises(RuntimeError, match="engine down"):
            pool.acquire("f@1")
        assert pool.stats() == {"warm": 0, "busy": 0}
    finally:
        pool.close()


def test_close_waits_for_sandboxes_being_made_and_removes_them(board: SandboxBoard) -> None:
    maker = Maker()
    made = threading.Event()

    def slow_new() -> Sandbox:
        made.wait(5)
        time.sleep(0.2)
        return maker.new()

    maker.make = slow_new
    pool, _ = make_pool(board, 0, maker, limit=4)
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
    assert sorted(maker.destroyed) == ["s0", "s1"]


def test_an_order_not_begun_when_its_run_was_served_is_not_made(board: SandboxBoard) -> None:
    maker = Maker()
    gate = threading.Event()

    def gated_new() -> Sandbox:
        gate.wait(5)
        return maker.new()

    maker.make = gated_new
    pool, _ = make_pool(board, 0, maker, limit=4, max_making=1)
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
        assert next(maker.seq) == 2  # s0, s1: the queued order was never made
    finally:
        gate.set()
        pool.close()


# -- lending across workers ------------------------------------------------------------------


def test_a_call_runs_in_another_workers_warm_sandbox(board: SandboxBoard) -> None:
    owner, owner_maker = make_pool(board, 1, slot=0)
    taker, taker_maker = make_pool(board, 0, slot=1)
    try:
        wait_until(lambda: owner.stats()["warm"] == 1, timeout=5)
        made = served(owner, "f@1")
        lent = taker.acquire("f@1")
        assert lent.borrowed and lent.name == made.name and lent.code_key == "f@1"
        assert lent.cold_start is False and taker_maker.borrowed == [{"name": made.name}]
        wait_until(lambda: owner.stats() == {"warm": 1, "busy": 1}, timeout=5)  # refill, lent
        lent.code_key = "f@1"
        taker.release(lent)
        again = owner.acquire("f@1")
        assert again is made  # given back to the host, the owner's own call takes it
        assert next(taker_maker.seq) == 0  # the taker made none
    finally:
        taker.close()
        owner.close()


def test_a_broken_borrowed_sandbox_is_destroyed_by_its_owner(board: SandboxBoard) -> None:
    owner, owner_maker = make_pool(board, 0, slot=0)
    taker, _ = make_pool(board, 0, slot=1)
    try:
        made = served(owner, "f@1")
        lent = taker.acquire("f@1")
        lent.healthy = False
        taker.release(lent)
        wait_until(lambda: made.name in owner_maker.destroyed, timeout=5)
        assert board.entries() == []
    finally:
        taker.close()
        owner.close()


def test_an_idle_sandbox_found_gone_is_skipped(board: SandboxBoard) -> None:
    pool, maker = make_pool(board, 0)
    try:
        made = served(pool, "f@1")
        maker.gone.add(made.name)
        fresh = pool.acquire("f@1")
        assert fresh is not made and fresh.cold_start
        wait_until(lambda: made.name in maker.destroyed, timeout=5)
    finally:
        pool.close()


def test_a_closing_owner_waits_for_its_lent_sandbox(board: SandboxBoard) -> None:
    owner, owner_maker = make_pool(board, 0, slot=0)
    taker, _ = make_pool(board, 0, slot=1)
    made = served(owner, "f@1")
    lent = taker.acquire("f@1")
    closing = threading.Thread(target=owner.close)
    closing.start()
    time.sleep(0.2)
    assert made.name not in owner_maker.destroyed  # not under the call
    taker.release(lent)
    closing.join(timeout=5)
    assert made.name in owner_maker.destroyed and board.entries() == []
    taker.close()


def test_the_hosts_idle_bound_dooms_the_least_recently_used_across_workers(
        board: SandboxBoard) -> None:
    bound = (2, 10**9)
    first, first_maker = make_pool(board, 0, slot=0, idle_bound=bound)
    second, second_maker = make_pool(board, 0, slot=1, idle_bound=bound)
    try:
        a = served(first, "a@1")
        b = served(second, "b@1")
        served(second, "c@1")
        served(first, "d@1")
        wait_until(lambda: len(board.entries()) == 2, timeout=5)
        assert {e.code_key for e in board.entries()} == {"c@1", "d@1"}
        assert first_maker.destroyed == [a.name] and second_maker.destroyed == [b.name]
    finally:
        second.close()
        first.close()


def test_the_idle_bound_counts_memory(board: SandboxBoard) -> None:
    maker = Maker(idle_bytes=40)
    pool, _ = make_pool(board, 0, maker, idle_bound=(100, 100))
    try:
        for key in ("a@1", "b@1", "c@1"):
            served(pool, key)
        wait_until(lambda: len(board.entries()) == 2, timeout=5)
        assert {e.code_key for e in board.entries()} == {"b@1", "c@1"}
    finally:
        pool.close()


def test_a_record_reused_while_its_sandbox_is_taken_off_is_not_mistaken_for_it(
    board: SandboxBoard,
) -> None:
    """Shedding frees a record, then forgets its sandbox. A sandbox made by another thread in
    between gets the same record: the shed destroys the old sandbox, never the new one (a
    call's, whose connection it would close under the run)."""
    pool, maker = make_pool(board, 0)
    try:
        old = served(pool, "f@1")
        withdraw = board.withdraw
        new: list[Sandbox] = []

        def withdraw_then_fill(entry: Any) -> bool:
            taken = withdraw(entry)
            if taken and not new:  # a maker thread puts its sandbox on the record just freed
                made = maker.new()
                with pool.lock:
                    assert pool.put(made, taken=True) is not None
                new.append(made)
            return taken

        board.withdraw = withdraw_then_fill  # type: ignore[method-assign]
        assert pool.shed_idle() == 1
        assert maker.destroyed == [old.name]
        assert new[0].ticket is not None and board.holds(new[0].ticket)
        pool.release(new[0])
        assert [e.state for e in board.owned(0)] == [IDLE]
    finally:
        pool.close()
    assert sorted(maker.destroyed) == sorted([old.name, new[0].name])


def settling_after_a_call(pool: WarmPool, key: str) -> Sandbox:
    """A call of ``key`` in the pool's generic sandbox, whose server is now getting its next
    call ready (settling: kept off the board); a new generic one is idle again."""
    wait_until(lambda: pool.stats()["warm"] == 1, timeout=5)
    sandbox = pool.acquire(key)
    sandbox.code_key = key
    sandbox.settling = True
    pool.release(sandbox)
    wait_until(lambda: pool.stats()["warm"] == 1, timeout=5)
    return sandbox


def test_a_call_waits_briefly_for_its_functions_settling_sandbox_rather_than_a_generic_one(
    board: SandboxBoard,
) -> None:
    """Node calls back to back: the last call's sandbox is getting its server's next Worker
    ready (settling). The next call of that function waits for it (its imports are preloaded
    there) rather than start the function anew in the generic sandbox that is idle; a call of
    another function takes the generic one at once."""
    pool, _ = make_pool(board, 1)
    try:
        first = settling_after_a_call(pool, "node@1")

        def settle_later() -> None:
            time.sleep(0.05)
            first.settling = False
            pool.settled(first)

        started = time.monotonic()  # before the thread starts its 50 ms: not after, part gone
        threading.Thread(target=settle_later).start()
        second = pool.acquire("node@1")
        assert second is first and not second.cold_start
        assert time.monotonic() - started >= 0.05
        other = pool.acquire("other@1")
        assert other is not first and other.code_key is None
        pool.release(other)
        pool.release(second)
    finally:
        pool.close()


def test_a_settling_sandbox_is_waited_for_by_one_call_only(board: SandboxBoard) -> None:
    """Two calls of the function while its one sandbox settles: one waits for it, the other
    takes the generic sandbox at once (it would wait in vain)."""
    pool, _ = make_pool(board, 1)
    try:
        first = settling_after_a_call(pool, "node@1")
        with ThreadPoolExecutor(2) as calls:
            waiting = calls.submit(pool.acquire, "node@1")
            time.sleep(0.02)
            at_once = calls.submit(pool.acquire, "node@1")
            generic = at_once.result(timeout=1)
            assert generic is not first and not waiting.done()
            first.settling = False
            pool.settled(first)
            assert waiting.result(timeout=1) is first
        pool.release(first)
        pool.release(generic)
    finally:
        pool.close()


def test_sandboxes_made_ahead_of_calls_are_primed_and_those_calls_wait_for_are_not(
    board: SandboxBoard,
) -> None:
    """A generic sandbox's first run is slower (its server's pages are still the template's):
    one made ahead of calls has it before it goes to the board; a call waiting for a new
    sandbox does not wait for it too."""
    pool, maker = make_pool(board, 0)
    try:
        waited = pool.acquire("f@1")
        assert waited.cold_start and maker.primed == []
        pool.release(waited)
    finally:
        pool.close()
    pool, maker = make_pool(board, 1, slot=1)
    try:
        wait_until(lambda: pool.stats()["warm"] == 1, timeout=5)
        ahead = pool.acquire("g@1")
        assert not ahead.cold_start and maker.primed == [ahead.name]
        wait_until(lambda: len(maker.primed) == 2, timeout=5)  # its refill too
        pool.release(ahead)
    finally:
        pool.close()


def test_a_sandbox_that_cannot_be_primed_is_not_kept(board: SandboxBoard) -> None:
    maker = Maker()
    maker.prime_error = SandboxError("the empty run failed")
    pool, _ = make_pool(board, 1, maker)
    try:
        wait_until(lambda: len(maker.destroyed) >= 1, timeout=5)
        assert pool.stats() == {"warm": 0, "busy": 0} and board.entries() == []
        maker.prime_error = None
        wait_until(lambda: pool.stats()["warm"] == 1, timeout=10)  # after the back-off
    finally:
        pool.close()


def test_a_sandbox_idle_long_is_shrunk_once_keeping_its_idle_time(board: SandboxBoard) -> None:
    maker = Maker(idle_bytes=16 << 20)
    maker.shrink_after_s = 0.3
    pool, _ = make_pool(board, 0, maker)
    try:
        sandbox = served(pool, "a@1")
        before = next(e for e in board.entries() if e.code_key == "a@1")
        assert not before.shrunk
        wait_until(lambda: maker.shrunk == [sandbox.name], timeout=5)
        wait_until(lambda: board.entries()[0].state == IDLE, timeout=5)
        after = board.entries()[0]
        assert after.shrunk and after.memory_bytes == 8 << 20
        assert after.idle_since_ns == before.idle_since_ns  # its place in the LRU order
        time.sleep(0.6)
        assert maker.shrunk == [sandbox.name]  # once
        assert served(pool, "a@1") is sandbox  # still warm for its function
        assert not board.entries()[0].shrunk  # a call's give-back: its server armed again
    finally:
        pool.close()


@pytest.mark.parametrize("ok", [False, None], ids=["failed", "raised"])
def test_a_sandbox_that_cannot_be_shrunk_is_destroyed(board: SandboxBoard, ok: bool | None
                                                      ) -> None:
    maker = Maker()
    maker.shrink_after_s, maker.shrink_ok = 0.1, ok
    pool, _ = make_pool(board, 0, maker)
    try:
        sandbox = served(pool, "a@1")
        wait_until(lambda: maker.destroyed == [sandbox.name], timeout=5)
        assert board.entries() == []
    finally:
        pool.close()


def test_generic_sandboxes_are_not_shrunk(board: SandboxBoard) -> None:
    maker = Maker()
    maker.shrink_after_s = 0.0
    pool, _ = make_pool(board, 1, maker)
    try:
        wait_until(lambda: pool.stats()["warm"] == 1, timeout=5)
        time.sleep(0.6)
        assert maker.shrunk == []
    finally:
        pool.close()


def test_a_sandbox_another_worker_gave_a_function_is_shrunk_by_its_owner(
        board: SandboxBoard) -> None:
    owner_maker = Maker()
    owner_maker.shrink_after_s = 0.3
    owner, _ = make_pool(board, 1, owner_maker, slot=0)
    taker, _ = make_pool(board, 0, slot=1)
    try:
        wait_until(lambda: owner.stats()["warm"] == 1, timeout=5)
        lent = served(taker, "f@1")  # the owner's generic sandbox, given f@1 by the taker
        assert lent.borrowed
        wait_until(lambda: owner_maker.shrunk == [lent.name], timeout=5)
        assert owner.own(next(e for e in board.entries() if e.shrunk)).code_key == "f@1"
    finally:
        taker.close()
        owner.close()
