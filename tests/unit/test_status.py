"""The worker -> arbiter status pipe: lines in, messages out, and never a blocked worker."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator

import pytest

from nanogrid.worker import status
from nanogrid.worker.result import Result, Timings
from nanogrid.worker.status import StatusReader, StatusReporter

F_SETPIPE_SZ = 1031


@pytest.fixture
def pipe() -> Iterator[tuple[StatusReporter, StatusReader]]:
    read_fd, write_fd = os.pipe()
    reporter, reader = StatusReporter(write_fd), StatusReader(read_fd)
    yield reporter, reader
    for fd in (read_fd, write_fd):
        with contextlib.suppress(OSError):  # a test may have closed it
            os.close(fd)


def test_every_event_arrives_in_order(pipe: tuple[StatusReporter, StatusReader]) -> None:
    reporter, reader = pipe
    reporter.booted()
    reporter.heartbeat()
    reporter.task_started("req-1")
    reporter.task_finished(Result(
        request_id="req-1", function_id="fn", runtime="python", status="FAILED",
        error_type="TIMEOUT", duration_millis=30000.5, peak_memory_bytes=123,
        stdout="x" * 100_000, optimization_tip="💡", memory_mb=256, recommended_memory_mb=256,
        tip_code="UNFINISHED_RUN", tip_params={"currentMb": 256, "peakMb": 0, "runs": 1},
        timings=Timings(queued_ms=2, fetch_ms=1, run_ms=30000.5, total_ms=30004),
    ))
    reporter.task_ended("req-2")
    messages = reader.read()
    assert [m["type"] for m in messages] == [
        status.BOOTED, status.HEARTBEAT, status.STARTED, status.FINISHED, status.ENDED]
    assert messages[1]["dropped"] == 0
    assert messages[2]["requestId"] == "req-1"
    assert messages[3]["result"] == {
        "requestId": "req-1", "functionId": "fn", "runtime": "python", "status": "FAILED",
        "errorType": "TIMEOUT", "durationMillis": 30000.5, "peakMemoryBytes": 123,
        "memoryMb": 256, "recommendedMemoryMb": 256, "tipCode": "UNFINISHED_RUN",
        "coldStart": False,
        "timings": {"queuedMs": 2, "fetchMs": 1, "unpackMs": 0, "sandboxMs": 0,
                    "runMs": 30000.5, "totalMs": 30004},
    }
    assert messages[4]["requestId"] == "req-2"
    assert reader.read() == [] and not reader.eof


def test_partial_lines_wait_for_their_end_and_garbage_is_skipped(
        pipe: tuple[StatusReporter, StatusReader]) -> None:
    reporter, reader = pipe
    os.write(reporter.fd, b'not json\n[1, 2]\n{"type": "boo')
    assert reader.read() == []
    os.write(reporter.fd, b'ted"}\n')
    assert reader.read() == [{"type": "booted"}]


def test_a_full_pipe_drops_and_counts_without_blocking(
        pipe: tuple[StatusReporter, StatusReader]) -> None:
    reporter, reader = pipe
    fcntl.fcntl(reporter.fd, F_SETPIPE_SZ, 4096)
    started = time.monotonic()
    for _ in range(1000):
        reporter.heartbeat()
    assert time.monotonic() - started < 1.0
    assert reporter.dropped > 0
    assert len(reader.read()) == 1000 - reporter.dropped
    reporter.heartbeat()
    assert reader.read()[-1]["dropped"] == reporter.dropped


def test_a_gone_arbiter_is_a_drop_not_an_error(pipe: tuple[StatusReporter, StatusReader]) -> None:
    reporter, reader = pipe
    reader.close()
    reporter.heartbeat()  # EPIPE: SIGPIPE is ignored in Python processes
    assert reporter.dropped == 1


def test_eof_when_the_worker_closes_its_end(pipe: tuple[StatusReporter, StatusReader]) -> None:
    reporter, reader = pipe
    reporter.booted()
    os.close(reporter.fd)
    assert reader.read() == [{"type": "booted"}]
    assert reader.eof
