"""ResultStore against a real redis-server: publish, late GET, outage -> outbox -> re-send."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import wait_until

from nanogrid.common.errors import ResultStoreUnavailable
from nanogrid.worker.result import Result, Timings
from nanogrid.worker.resultstore import ResultStore

TTL = 120


def result(request_id: str) -> Result:
    return Result(
        request_id=request_id,
        function_id="hello",
        runtime="python",
        status="SUCCESS",
        stdout="héllo ✅\n",
        peak_memory_bytes=6 * 2**20,
        timings=Timings(queued_ms=1, run_ms=2, total_ms=4),
    )


class Subscriber:
    """A controller stand-in: pattern-subscribed to result:* before anything is published."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client  # a collected client closes its pool, the pubsub connection too
        self.pubsub = client.pubsub()
        self.pubsub.psubscribe("result:*")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the subscription is active once confirmed
            message = self.pubsub.get_message(timeout=0.1)
            if message and message["type"] == "psubscribe":
                return
        raise TimeoutError("no psubscribe confirmation")

    def receive(self, count: int, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        got: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=0.1)
            if message and message["type"] == "pmessage":
                got.append((message["channel"].decode(), message["data"]))
        return got

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


@pytest.fixture
def subscriber(redis_url: str) -> Iterator[Subscriber]:
    sub = Subscriber(redis.Redis.from_url(redis_url, socket_timeout=5))
    yield sub
    sub.close()


@pytest.fixture
def store(redis_url: str, tmp_path: Path) -> Iterator[ResultStore]:
    s = ResultStore(redis_url, TTL, tmp_path / "outbox", retry_seconds=0.5)
    yield s
    s.close()


def test_publish_reaches_an_early_subscriber_and_a_late_get(
    store: ResultStore, subscriber: Subscriber, redis_url: str
) -> None:
    started = time.perf_counter()
    assert store.publish(result("req-1")) is True
    elapsed = time.perf_counter() - started

    [(channel, data)] = subscriber.receive(1)
    assert channel == "result:req-1"
    assert json.loads(data) == result("req-1").to_dict()
    assert "héllo ✅".encode() in data  # UTF-8, not \u escapes
    assert b'", "' not in data  # compact separators

    late = redis.Redis.from_url(redis_url)
    assert late.get("result:req-1") == data
    assert 0 < late.ttl("result:req-1") <= TTL
    assert store.existing("req-1") == result("req-1")
    assert store.existing("req-unknown") is None
    assert elapsed < 0.5


def test_redis_down_outbox_then_flush_when_back(
    redis_server: Any, redis_url: str, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox"
    store = ResultStore(redis_url, TTL, outbox, retry_seconds=1.5)
    assert store.trouble() is None
    redis_server.stop()
    try:
        started = time.monotonic()
        assert store.publish(result("req-down")) is False
        fallback = time.monotonic() - started
        assert 1.4 <= fallback < 3.0  # the retry budget, not a hang
        assert [p.name for p in outbox.iterdir()] == ["req-down.json"]
        assert json.loads((outbox / "req-down.json").read_bytes()) == result("req-down").to_dict()
        assert store.trouble() is not None
        with pytest.raises(ResultStoreUnavailable):
            store.existing("req-down")
        assert store.flush_outbox() == 0  # still down: kept
        assert (outbox / "req-down.json").exists()
        assert store.outbox_pending
    finally:
        redis_server.start()

    sub = Subscriber(redis_server.client())
    try:
        assert store.flush_outbox() == 1
        [(channel, data)] = sub.receive(1)
    finally:
        sub.close()
    assert channel == "result:req-down"
    assert json.loads(data) == result("req-down").to_dict()
    assert list(outbox.iterdir()) == []
    assert not store.outbox_pending
    assert redis_server.client().get("result:req-down") == data
    assert 0 < redis_server.client().ttl("result:req-down") <= TTL
    assert store.flush_outbox() == 0
    store.close()


def test_flush_sends_oldest_first_and_stops_at_first_failure(
    redis_url: str, tmp_path: Path, subscriber: Subscriber
) -> None:
    outbox = tmp_path / "outbox"
    down = ResultStore("redis://127.0.0.1:1/0", TTL, outbox, retry_seconds=0)
    for i in range(3):
        assert down.publish(result(f"old-{i}")) is False
        os.utime(outbox / f"old-{i}.json", ns=(i * 10**9, (10 - i) * 10**9))
    assert down.flush_outbox() == 0
    assert len(list(outbox.iterdir())) == 3

    store = ResultStore(redis_url, TTL, outbox)
    assert store.flush_outbox() == 3
    assert [ch for ch, _ in subscriber.receive(3)] == [
        "result:old-2", "result:old-1", "result:old-0"
    ]


def test_outbox_check_is_cheap_when_empty(store: ResultStore) -> None:
    assert store.flush_outbox() == 0  # the first call scans (earlier processes' entries)
    started = time.perf_counter()
    for _ in range(10_000):
        store.flush_outbox()
    assert (time.perf_counter() - started) / 10_000 < 50e-6


FLUSHER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from nanogrid.worker.resultstore import ResultStore
    url, outbox, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3])
    store = ResultStore(url, 120, Path(outbox))
    while time.time() < start_at:
        pass
    print(store.flush_outbox())
    """
)


def test_concurrent_flushes_deliver_each_result_exactly_once(
    redis_url: str, tmp_path: Path, subscriber: Subscriber
) -> None:
    outbox = tmp_path / "outbox"
    down = ResultStore("redis://127.0.0.1:1/0", TTL, outbox, retry_seconds=0)
    count = 200
    for i in range(count):
        down.publish(result(f"many-{i}"))

    # A claim left by a process that is gone must be taken over.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (outbox / "many-0.json").rename(outbox / f"many-0.json.sending-{gone.stdout.strip()}")

    start_at = time.time() + 1.5
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FLUSHER, redis_url, str(outbox), str(start_at)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        for _ in range(2)
    ]
    sent = [int(p.communicate(timeout=60)[0]) for p in procs]

    assert sum(sent) == count
    channels = [ch for ch, _ in subscriber.receive(count + 1, timeout=1)]
    assert sorted(channels) == sorted(f"result:many-{i}" for i in range(count))
    assert list(outbox.iterdir()) == []


def test_a_live_claim_is_left_alone(redis_url: str, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    down = ResultStore("redis://127.0.0.1:1/0", TTL, outbox, retry_seconds=0)
    down.publish(result("busy"))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        claimed = outbox / f"busy.json.sending-{sleeper.pid}"
        (outbox / "busy.json").rename(claimed)
        assert ResultStore(redis_url, TTL, outbox).flush_outbox() == 0
        assert claimed.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert ResultStore(redis_url, TTL, outbox).flush_outbox() == 1
    assert list(outbox.iterdir()) == []


def test_outbox_not_writable_raises_so_the_task_message_is_kept(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    store = ResultStore("redis://127.0.0.1:1/0", TTL, tmp_path / "not-a-dir" / "outbox",
                        retry_seconds=0)
    with pytest.raises(ResultStoreUnavailable):
        store.publish(result("lost?"))


def test_existing_ignores_a_value_that_is_not_a_result(store: ResultStore, redis_url: str) -> None:
    redis.Redis.from_url(redis_url).set("result:junk", b"not json")
    assert store.existing("junk") is None


def test_a_corrupt_outbox_entry_is_set_aside_not_retried_forever(
    redis_url: str, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox"
    ResultStore("redis://127.0.0.1:1/0", TTL, outbox, retry_seconds=0).publish(result("good"))
    (outbox / "junk.json").write_bytes(b"\x00garbage")
    store = ResultStore(redis_url, TTL, outbox)
    assert store.flush_outbox() == 1
    assert sorted(p.name for p in outbox.iterdir()) == [".bad-junk.json"]
    assert store.existing("good") == result("good")


def refusing_user(redis_server: Any, name: str, **rules: Any) -> str:
    """A URL as an ACL user made with ``rules``: Redis refuses what they do not allow."""
    redis_server.client().acl_setuser(name, enabled=True, passwords=["+pw"], **rules)
    return f"redis://{name}:pw@127.0.0.1:{redis_server.port}/0"


def outbox_of(tmp_path: Path, request_ids: list[str]) -> Path:
    """An outbox holding ``request_ids``' results, the first one the oldest."""
    outbox = tmp_path / "outbox"
    down = ResultStore("redis://127.0.0.1:1/0", TTL, outbox, retry_seconds=0)
    for age, request_id in enumerate(request_ids):
        down.publish(result(request_id))
        os.utime(outbox / f"{request_id}.json", ns=(age * 10**9, age * 10**9))
    return outbox


def test_an_entry_redis_keeps_refusing_is_set_aside_without_blocking_the_rest(
    redis_server: Any, redis_url: str, tmp_path: Path
) -> None:
    # An ACL user that may not write result:refused-*: Redis refuses that one entry (NOPERM)
    # while it takes every other.
    user = f"outbox-{os.getpid()}"
    url = refusing_user(redis_server, user, categories=["+@all"], channels=["*"],
                        keys=["result:ok-*", "claim:*", "runs:*", "nanogrid:*"])
    outbox = outbox_of(tmp_path, ["refused-1", "ok-1", "ok-2"])  # the refused one first
    admin = redis_server.client()
    reported: list[str] = []
    try:
        store = ResultStore(url, TTL, outbox, on_set_aside=reported.append,
                            entry_backoff_seconds=(0.2, 0.2))
        assert store.flush_outbox() == 2  # the two behind it went out
        assert admin.exists("result:ok-1", "result:ok-2") == 2
        store.flush_outbox()
        assert store.pending_entries == 1  # within its backoff: not sent again yet
        deadline = time.monotonic() + 5
        while store.pending_entries and time.monotonic() < deadline:
            store.flush_outbox()
            time.sleep(0.05)
    finally:
        admin.acl_deluser(user)
    assert [p.name for p in outbox.iterdir()] == [".failed-refused-1.json"]
    (message,) = reported
    assert "refused-1.json refused 5 times" in message and "no permissions" in message
    assert not store.outbox_pending


def test_an_entry_is_not_set_aside_while_redis_refuses_every_write(
    redis_server: Any, tmp_path: Path
) -> None:
    user = f"readonly-{os.getpid()}"
    url = refusing_user(redis_server, user, categories=["+@all", "-@write"], keys=["*"],
                        channels=["*"])
    outbox = outbox_of(tmp_path, ["kept-1"])
    reported: list[str] = []
    try:
        store = ResultStore(url, TTL, outbox, on_set_aside=reported.append,
                            entry_backoff_seconds=(0, 0))
        for _ in range(10):
            store.flush_outbox()
    finally:
        redis_server.client().acl_deluser(user)
    assert [p.name for p in outbox.iterdir()] == ["kept-1.json"] and reported == []
    assert store.outbox_pending


def test_set_aside_entries_are_tried_again_from_time_to_time(
    redis_server: Any, redis_url: str, tmp_path: Path
) -> None:
    outbox = outbox_of(tmp_path, ["late"])
    (outbox / "late.json").rename(outbox / ".failed-late.json")  # refused by an earlier flush
    store = ResultStore(redis_url, TTL, outbox, revive_seconds=0.1)
    assert store.flush_outbox() == 0
    time.sleep(0.15)
    assert store.flush_outbox() == 1  # what Redis refused then (an ACL, ...) it takes now
    assert store.existing("late") == result("late") and list(outbox.iterdir()) == []


def test_the_flusher_thread_sends_the_outbox_once_redis_is_back(
    redis_server: Any, redis_url: str, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox"
    store = ResultStore(redis_url, TTL, outbox, retry_seconds=0.2)
    store.start_flushing()
    try:
        redis_server.stop()
        try:
            assert store.publish(result("while-down")) is False
            time.sleep(1)
            assert (outbox / "while-down.json").exists()
        finally:
            redis_server.start()
        # (The entry's file is away while a flush holds it: wait for Redis to have it.)
        wait_until(lambda: store.existing("while-down"), timeout=10, what="the flush")
        assert store.existing("while-down") == result("while-down")  # no flush_outbox call
        assert not (outbox / "while-down.json").exists()
    finally:
        store.close()
