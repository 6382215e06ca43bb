"""A worker's runs in flight: admission through the ledger, and runs getting ready."""

from __future__ import annotations

import threading
import time

from nanogrid.worker.inflight import Inflight
from nanogrid.worker.ledger import Ledger
from nanogrid.worker.sqs import Message


def _message(n: int) -> Message:
    return Message(message_id=f"m{n}", receipt_handle=f"r{n}", body="{}", receives=1)


def _inflight(run, memory_mb: int = 1024) -> Inflight:
    return Inflight(
        Ledger(memory_mb=memory_mb, max_concurrent=8), 0, run, lambda m: 256,
        typical_mb=256, smallest_mb=128,
    )


def test_wait_ready_returns_when_the_runs_are_ready_not_when_they_end() -> None:
    ready, finish = threading.Event(), threading.Event()
    inflight: Inflight

    def run(message: Message) -> None:
        ready.wait(5)
        inflight.ready()
        finish.wait(5)

    inflight = _inflight(run)
    inflight.accept([_message(1), _message(2)])
    started = time.monotonic()
    inflight.wait_ready(0.2)
    assert time.monotonic() - started >= 0.2  # neither is ready: waited the whole timeout
    ready.set()
    started = time.monotonic()
    inflight.wait_ready(5)
    assert time.monotonic() - started < 2 and inflight.running == 2  # ready, still running
    finish.set()
    inflight.drain()
    assert inflight.running == 0


def test_a_run_that_ends_without_saying_ready_counts_as_ready() -> None:
    inflight = _inflight(lambda message: None)
    inflight.accept([_message(1)])
    started = time.monotonic()
    inflight.wait_ready(5)
    assert time.monotonic() - started < 2
    inflight.drain()


def test_a_run_that_fails_counts_as_ready_and_gives_its_room_back() -> None:
    def run(message: Message) -> None:
        raise RuntimeError("a bug")

    inflight = _inflight(run, memory_mb=256)
    inflight.accept([_message(1)])
    inflight.wait_ready(5)
    inflight.drain()
    assert inflight.running == 0
    assert inflight.room() >= 1


def test_ready_twice_or_off_a_run_thread_changes_nothing() -> None:
    release = threading.Event()
    inflight: Inflight

    def run(message: Message) -> None:
        if message.message_id == "m1":
            inflight.ready()
            inflight.ready()
        release.wait(5)  # m2 never says it is ready

    inflight = _inflight(run)
    inflight.ready()  # the loop's own thread: not a run
    inflight.accept([_message(1)])
    inflight.wait_ready(5)
    inflight.accept([_message(2)])
    started = time.monotonic()
    inflight.wait_ready(0.2)
    assert time.monotonic() - started >= 0.2  # the extra ready() calls were not counted
    release.set()
    inflight.drain()
