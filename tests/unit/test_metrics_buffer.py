"""MetricsPublisher's buffer, aggregation and failure handling, with a fake CloudWatch client."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from loguru import logger

from nanogrid.common.config import CloudWatchConfig
from nanogrid.worker.cloudwatch import MetricsPublisher


class FakeCloudWatch:
    def __init__(self, *, fail: bool = False, delay: float = 0.0) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail = fail
        self.delay = delay
        self.called = threading.Event()

    def put_metric_data(self, **kwargs: Any) -> None:
        self.called.set()
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise ConnectionError("endpoint down")
        self.calls.append(kwargs)

    def datums(self) -> dict[tuple[str, str], dict[str, Any]]:
        out = {}
        for call in self.calls:
            for d in call["MetricData"]:
                out[(d["Dimensions"][0]["Value"], d["MetricName"])] = d
        return out


@pytest.fixture
def logs() -> Iterator[list[str]]:
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="DEBUG")
    yield messages
    logger.remove(sink)


def publisher(fake: FakeCloudWatch, flush_seconds: float = 300, **kw: Any) -> MetricsPublisher:
    cfg = CloudWatchConfig(namespace="NanoGridTest", flush_seconds=flush_seconds)
    return MetricsPublisher(cfg, client_factory=lambda: fake, **kw)


def record(pub: MetricsPublisher, fn: str = "fn", status: str = "SUCCESS", **kw: Any) -> None:
    args: dict[str, Any] = dict(
        duration_ms=10.0, peak_memory_bytes=6 * 2**20, error_type=None, cold_start=False
    )
    args.update(kw)
    pub.record(fn, status=status, **args)


def test_one_call_aggregates_per_function_and_metric() -> None:
    fake = FakeCloudWatch()
    pub = publisher(fake)
    record(pub, "a", duration_ms=10, peak_memory_bytes=100, cold_start=True)
    record(pub, "a", "FAILED", duration_ms=30, peak_memory_bytes=300, error_type="FUNCTION_ERROR")
    record(pub, "a", "TIMEOUT", duration_ms=1000, peak_memory_bytes=200, error_type="TIMEOUT")
    record(pub, "b", "FAILED", duration_ms=5, peak_memory_bytes=50, error_type="OUT_OF_MEMORY")
    record(pub, "c", "FAILED", duration_ms=None, peak_memory_bytes=None, error_type="INTERNAL")

    assert pub.flush() == 7 + 7 + 5
    assert len(fake.calls) == 1
    assert fake.calls[0]["Namespace"] == "NanoGridTest"
    got = fake.datums()

    def stats(fn: str, name: str) -> dict[str, float]:
        return got[(fn, name)]["StatisticValues"]

    assert stats("a", "Invocations") == {"SampleCount": 3, "Sum": 3, "Minimum": 1, "Maximum": 1}
    assert stats("a", "Errors")["Sum"] == 2
    assert stats("a", "Timeouts")["Sum"] == 1
    assert stats("a", "ColdStarts")["Sum"] == 1
    assert stats("a", "Duration") == {"SampleCount": 3, "Sum": 1040, "Minimum": 10, "Maximum": 1000}
    assert stats("a", "PeakMemoryBytes")["Maximum"] == 300
    assert got[("a", "PeakMemoryBytes")]["Unit"] == "Bytes"
    assert got[("a", "Duration")]["Unit"] == "Milliseconds"
    assert stats("b", "OutOfMemory")["Sum"] == 1
    assert stats("b", "Errors")["Sum"] == 1
    assert ("c", "Duration") not in got and ("c", "PeakMemoryBytes") not in got
    assert pub.flush() == 0  # the buffer was emptied


def test_batches_stay_within_1000_datums() -> None:
    fake = FakeCloudWatch()
    pub = publisher(fake)
    for i in range(200):
        record(pub, f"fn-{i}")
    assert pub.flush() == 1400
    assert [len(c["MetricData"]) for c in fake.calls] == [1000, 400]


def test_disabled_is_a_no_op_without_thread() -> None:
    fake = FakeCloudWatch()
    pub = MetricsPublisher(CloudWatchConfig(enabled=False), client_factory=lambda: fake)
    before = threading.active_count()
    record(pub)
    assert threading.active_count() == before
    assert pub.flush() == 0 and fake.calls == []
    pub.close(1)


def test_full_buffer_drops_oldest_and_counts(logs: list[str]) -> None:
    fake = FakeCloudWatch()
    pub = publisher(fake, max_buffer=5)
    for i in range(8):
        record(pub, duration_ms=i)
    pub.flush()
    duration = fake.datums()[("fn", "Duration")]["StatisticValues"]
    assert duration["SampleCount"] == 5 and duration["Minimum"] == 3  # 0, 1, 2 dropped
    assert any("dropped 3 oldest records" in m for m in logs)


def test_failures_never_raise_and_are_logged_once_per_burst(logs: list[str]) -> None:
    fake = FakeCloudWatch(fail=True)
    pub = publisher(fake)
    for _ in range(3):
        record(pub)
        assert pub.flush() == 0
    warnings = [m for m in logs if "put_metric_data failed" in m]
    assert warnings == ["[CLOUDWATCH] put_metric_data failed: endpoint down; dropped 7 datums"]
    assert pub.dropped_datums == 21

    fake.fail = False
    record(pub)
    assert pub.flush() == 7
    assert any("works again" in m for m in logs)
    fake.fail = True
    record(pub)
    pub.flush()
    assert len([m for m in logs if "put_metric_data failed" in m]) == 2  # a new burst


def test_client_creation_failure_is_contained() -> None:
    def no_client() -> Any:
        raise RuntimeError("no region")

    pub = MetricsPublisher(CloudWatchConfig(flush_seconds=300), client_factory=no_client)
    record(pub)
    assert pub.flush() == 0
    assert pub.dropped_datums == 7


def test_bad_values_do_not_raise() -> None:
    pub = publisher(FakeCloudWatch())
    record(pub, duration_ms="not a number")  # type: ignore[arg-type]
    assert pub.flush() == 0


def test_thread_flushes_periodically_and_close_sends_the_rest(logs: list[str]) -> None:
    fake = FakeCloudWatch()
    pub = publisher(fake, flush_seconds=0.05)
    record(pub, "early")
    assert fake.called.wait(2)
    deadline = time.monotonic() + 2
    while not fake.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    record(pub, "late")
    pub.close(2)
    assert {fn for fn, _ in fake.datums()} == {"early", "late"}
    assert any(m.startswith("[CLOUDWATCH] sent 7 datums") for m in logs)


def test_record_does_not_wait_for_a_slow_send_and_close_is_bounded() -> None:
    fake = FakeCloudWatch(delay=1.2)
    pub = publisher(fake, flush_seconds=0.05)
    record(pub)
    assert fake.called.wait(2)  # the thread is now stuck inside put_metric_data
    started = time.monotonic()
    for _ in range(1000):
        record(pub)
    assert time.monotonic() - started < 0.5
    started = time.monotonic()
    pub.close(0.3)
    assert time.monotonic() - started < 1.0
    pub.close(5)  # let the slow call end inside this test


def test_a_forked_worker_gets_its_own_thread() -> None:
    fake = FakeCloudWatch()
    pub = publisher(fake, flush_seconds=0.05)
    record(pub, "parent")
    assert fake.called.wait(2)
    pid = os.fork()
    if pid == 0:  # the child: the parent's thread is gone, a new one must take over
        code = 1
        try:
            fake.calls.clear()
            fake.called.clear()
            record(pub, "child")
            code = 0 if fake.called.wait(2) else 2
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    pub.close(1)
