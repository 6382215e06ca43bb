"""The arbiter reads status lines at once when idle, and gathers them for a moment under load."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from nanogrid.common.config import from_dict
from nanogrid.supervisor.arbiter import STATUS_GATHER_S, TICK_S, Arbiter
from nanogrid.supervisor.workerstate import WorkerProcess
from nanogrid.worker.result import Result
from nanogrid.worker.status import StatusReader, StatusReporter

RESULT = Result(request_id="a", function_id="fn", runtime="python", status="SUCCESS",
                duration_millis=3.0, peak_memory_bytes=2**20)


@pytest.fixture
def arbiter() -> Iterator[tuple[Arbiter, WorkerProcess, StatusReporter]]:
    arbiter = Arbiter(from_dict({"workers": 1, "runner": "process"}), worker_main=lambda *a: 0)
    read_fd, write_fd = os.pipe()
    now = time.monotonic()
    worker = WorkerProcess(os.getpid(), 0, StatusReader(read_fd), started=now, last_beat=now)
    arbiter.workers[worker.pid] = worker
    arbiter.wakeup.watch(worker)
    yield arbiter, worker, StatusReporter(write_fd)
    os.close(read_fd)
    os.close(write_fd)


def timed(arbiter: Arbiter) -> float:
    start = time.monotonic()
    arbiter.wait_for_events()
    return time.monotonic() - start


def test_lines_are_read_at_once_when_idle_then_gathered(
    arbiter: tuple[Arbiter, WorkerProcess, StatusReporter],
) -> None:
    arb, worker, reporter = arbiter
    reporter.task_started("a")
    assert timed(arb) < TICK_S / 2  # woken by the line, not by the tick
    assert list(worker.running) == ["a"]
    read_at = arb._status_read_at  # a loaded host may be well into the gathering by now
    # Lines right after: they wait until STATUS_GATHER_S after the last read, then all go.
    reporter.task_finished(RESULT)
    reporter.task_started("b")
    timed(arb)
    waited = time.monotonic() - read_at
    assert STATUS_GATHER_S <= waited < STATUS_GATHER_S + 0.5, waited
    assert list(worker.running) == ["b"]
    invocations = 'nanogrid_invocations_total{runtime="python",status="SUCCESS",error_type=""}'
    assert f"{invocations} 1" in arb.metrics.render()


def test_a_signal_wakes_the_arbiter_while_lines_gather(
    arbiter: tuple[Arbiter, WorkerProcess, StatusReporter],
) -> None:
    arb, worker, reporter = arbiter
    reporter.task_started("a")
    arb.wait_for_events()
    reporter.task_started("b")
    os.write(arb.wakeup._write, b"\x11")
    arb.wait_for_events()
    assert list(worker.running) == ["a"]  # woken by the signal; "b" waits for the gathering to end
    arb.wait_for_events()
    assert list(worker.running) == ["a", "b"]


def test_after_a_quiet_gathering_the_next_line_wakes_it_at_once(
    arbiter: tuple[Arbiter, WorkerProcess, StatusReporter],
) -> None:
    arb, worker, reporter = arbiter
    reporter.task_started("a")
    arb.wait_for_events()
    arb.wait_for_events()  # the gathering ends with nothing new: back to waking on lines
    later = threading.Timer(0.2, reporter.task_started, args=("b",))
    later.start()
    waited = timed(arb)
    later.join()
    assert 0.15 <= waited < TICK_S * 0.8, waited
    assert list(worker.running) == ["a", "b"]
