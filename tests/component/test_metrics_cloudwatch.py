"""MetricsPublisher against a real moto_server (CloudWatch over HTTP), and with none there."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nanogrid.common.config import CloudWatchConfig
from nanogrid.worker.cloudwatch import MetricsPublisher

MB = 2**20
METRICS = {
    "Invocations", "Errors", "ColdStarts", "Timeouts", "OutOfMemory", "Duration",
    "PeakMemoryBytes",
}


def statistics(cloudwatch: Any, namespace: str, metric: str, function_id: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    points = cloudwatch.get_metric_statistics(
        Namespace=namespace,
        MetricName=metric,
        Dimensions=[{"Name": "FunctionId", "Value": function_id}],
        StartTime=now - timedelta(minutes=10),
        EndTime=now + timedelta(minutes=10),
        Period=3600,
        Statistics=["SampleCount", "Sum", "Maximum", "Minimum"],
    )["Datapoints"]
    assert len(points) == 1, points
    return points[0]


def test_records_reach_cloudwatch(aws: Any) -> None:
    namespace = f"NanoGridTest{uuid.uuid4().hex[:8]}"
    pub = MetricsPublisher(CloudWatchConfig(namespace=namespace, flush_seconds=0.2))
    pub.record("hello", duration_ms=12.5, peak_memory_bytes=6 * MB, status="SUCCESS",
               error_type=None, cold_start=True)
    pub.record("hello", duration_ms=30000, peak_memory_bytes=9 * MB, status="TIMEOUT",
               error_type="TIMEOUT", cold_start=False)
    pub.record("hog", duration_ms=80, peak_memory_bytes=128 * MB, status="FAILED",
               error_type="OUT_OF_MEMORY", cold_start=False)
    pub.close(10)
    cloudwatch = aws.cloudwatch()

    listed = cloudwatch.list_metrics(Namespace=namespace)["Metrics"]
    assert {m["MetricName"] for m in listed} == METRICS
    assert {d["Value"] for m in listed for d in m["Dimensions"] if d["Name"] == "FunctionId"} == {
        "hello", "hog"
    }
    peak = statistics(cloudwatch, namespace, "PeakMemoryBytes", "hello")
    assert peak["Maximum"] == 9 * MB and peak["SampleCount"] == 2
    assert statistics(cloudwatch, namespace, "Invocations", "hello")["Sum"] == 2
    assert statistics(cloudwatch, namespace, "Errors", "hello")["Sum"] == 1
    assert statistics(cloudwatch, namespace, "Timeouts", "hello")["Sum"] == 1
    assert statistics(cloudwatch, namespace, "ColdStarts", "hello")["Sum"] == 1
    assert statistics(cloudwatch, namespace, "Duration", "hello")["Maximum"] == 30000
    assert statistics(cloudwatch, namespace, "OutOfMemory", "hog")["Sum"] == 1
    assert pub.sent_datums == 14 and pub.dropped_datums == 0


def test_background_thread_sends_without_close(aws: Any) -> None:
    namespace = f"NanoGridTest{uuid.uuid4().hex[:8]}"
    pub = MetricsPublisher(CloudWatchConfig(namespace=namespace, flush_seconds=0.1))
    pub.record("tick", duration_ms=1, peak_memory_bytes=MB, status="SUCCESS",
               error_type=None, cold_start=False)
    deadline = time.monotonic() + 10
    while not aws.cloudwatch().list_metrics(Namespace=namespace)["Metrics"]:
        assert time.monotonic() < deadline, "metrics never arrived"
        time.sleep(0.1)
    pub.close(5)


@pytest.fixture
def dead_endpoint(aws: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    yield


@pytest.fixture
def hanging_endpoint(aws: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    with socket.socket() as sock:  # accepts connections (backlog) but never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{sock.getsockname()[1]}")
        yield sock


def record_many(pub: MetricsPublisher, n: int) -> float:
    started = time.monotonic()
    for i in range(n):
        pub.record(f"fn-{i % 5}", duration_ms=5, peak_memory_bytes=MB, status="SUCCESS",
                   error_type=None, cold_start=False)
    return time.monotonic() - started


@pytest.mark.usefixtures("dead_endpoint")
def test_endpoint_down_never_raises_nor_blocks() -> None:
    pub = MetricsPublisher(CloudWatchConfig(flush_seconds=0.05))
    # ~0.1 s on an idle host, 0.78 s on a loaded one while the sending thread makes its
    # client; a record waiting on the endpoint shows against the hanging one (next test).
    assert record_many(pub, 1000) < 2.0
    time.sleep(0.3)  # let the thread fail at least once
    assert record_many(pub, 1000) < 2.0
    started = time.monotonic()
    pub.close(3)
    assert time.monotonic() - started < 3.5
    pub.close(10)  # let botocore's last retry end before the test's log capture goes away
    assert pub.sent_datums == 0 and pub.dropped_datums > 0


def test_hanging_endpoint_close_is_bounded(hanging_endpoint: socket.socket) -> None:
    pub = MetricsPublisher(CloudWatchConfig(flush_seconds=0.05))
    assert record_many(pub, 100) < 0.5
    time.sleep(0.2)  # the thread is now waiting on the silent endpoint
    assert record_many(pub, 100) < 0.5
    started = time.monotonic()
    pub.close(1)
    assert time.monotonic() - started < 1.5
    hanging_endpoint.close()  # the endpoint goes away: the stuck call fails and the thread ends
    pub.close(15)
    assert pub.sent_datums == 0
