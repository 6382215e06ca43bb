"""BatchDeleter: full batches go at once, a partial one after the linger, close sends the rest."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

from nanogrid.common.config import QueueConfig
from nanogrid.common.errors import QueueUnavailable
from nanogrid.worker.deleter import MAX_DELETE_LINGER_S, BatchDeleter
from nanogrid.worker.sqs import Message

LINGER = 0.2


class FakeQueue:
    def __init__(self, visibility: int = 30, fail: bool = False) -> None:
        self.config = QueueConfig(visibility_timeout_seconds=visibility)
        self.fail = fail
        self.calls: list[tuple[float, list[str]]] = []
        self.called = threading.Event()

    def delete_batch(self, messages: list[Message]) -> None:
        self.calls.append((time.monotonic(), [m.message_id for m in messages]))
        self.called.set()
        if self.fail:
            raise QueueUnavailable("SQS delete_message_batch failed: gone")


def messages(count: int, start: int = 0) -> list[Message]:
    return [Message(str(i), f"rh-{i}", "{}", 1) for i in range(start, start + count)]


def wait_for_calls(queue: FakeQueue, count: int, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while len(queue.calls) < count and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(queue.calls) >= count, queue.calls


def test_ten_pending_go_at_once_in_one_call() -> None:
    queue = FakeQueue()
    deleter = BatchDeleter(queue, linger=5.0)  # type: ignore[arg-type]
    started = time.monotonic()
    for message in messages(10):
        deleter.delete(message)
    wait_for_calls(queue, 1)
    assert queue.calls[0][0] - started < 1.0
    assert queue.calls[0][1] == [str(i) for i in range(10)]
    deleter.close()


def test_a_lone_delete_waits_for_company_then_goes_after_the_linger() -> None:
    queue = FakeQueue()
    deleter = BatchDeleter(queue, linger=LINGER)  # type: ignore[arg-type]
    started = time.monotonic()
    deleter.delete(messages(1)[0])
    time.sleep(LINGER / 4)
    deleter.delete(messages(1, start=1)[0])
    wait_for_calls(queue, 1)
    waited = queue.calls[0][0] - started
    assert LINGER * 0.9 <= waited < LINGER + 0.5, waited
    assert queue.calls[0][1] == ["0", "1"]  # the second shared the first one's call
    deleter.close()


def test_twenty_five_make_two_full_calls_and_one_after_the_linger() -> None:
    queue = FakeQueue()
    deleter = BatchDeleter(queue, linger=LINGER)  # type: ignore[arg-type]
    for message in messages(25):
        deleter.delete(message)
    wait_for_calls(queue, 3)
    assert [len(ids) for _, ids in queue.calls] == [10, 10, 5]
    assert sum((ids for _, ids in queue.calls), []) == [str(i) for i in range(25)]
    deleter.close()


def test_close_sends_what_is_pending_without_waiting_for_the_linger() -> None:
    queue = FakeQueue()
    deleter = BatchDeleter(queue, linger=60.0)  # type: ignore[arg-type]
    for message in messages(13):
        deleter.delete(message)
    started = time.monotonic()
    deleter.close()
    assert time.monotonic() - started < 1.0
    assert sorted(len(ids) for _, ids in queue.calls) == [3, 10]


def test_a_failed_call_is_logged_and_the_deleter_goes_on() -> None:
    queue = FakeQueue(fail=True)
    deleter = BatchDeleter(queue, linger=0.01)  # type: ignore[arg-type]
    deleter.delete(messages(1)[0])
    wait_for_calls(queue, 1)
    deleter.delete(messages(1, start=1)[0])
    wait_for_calls(queue, 2)
    deleter.close()


def test_the_linger_stays_under_a_quarter_of_the_visibility_timeout() -> None:
    short: Any = SimpleNamespace(config=QueueConfig(visibility_timeout_seconds=1))
    default: Any = SimpleNamespace(config=QueueConfig())
    for queue, linger in ((short, 0.25), (default, MAX_DELETE_LINGER_S)):
        deleter = BatchDeleter(queue)
        assert deleter._linger == linger
        deleter.close()
