"""Result contract: fields, status and errorType from a run outcome."""

from __future__ import annotations

import pytest

from runners.base import RunOutcome
from worker import result

IDS = {"requestId": "r", "functionId": "f", "runtime": "python"}
FIELDS = {
    "requestId",
    "functionId",
    "runtime",
    "status",
    "exitCode",
    "stdout",
    "stderr",
    "stdoutTruncated",
    "stderrTruncated",
    "durationMillis",
    "peakMemoryBytes",
    "peakMemoryMB",
    "memoryMb",
    "recommendedMemoryMb",
    "optimizationTip",
    "coldStart",
    "errorType",
    "errorMessage",
    "attempt",
    "workerId",
    "finishedAt",
}


def outcome(**changes: object) -> RunOutcome:
    values = {
        "exit_code": 0,
        "timed_out": False,
        "oom_killed": False,
        "stdout": b"hi\n",
        "stderr": b"",
        "stdout_truncated": False,
        "stderr_truncated": False,
        "duration_ms": 3.25,
        "peak_memory_bytes": 6 * 2**20 + 5,
        "peak_source": "cgroup-v1",
    }
    return RunOutcome(**{**values, **changes})


def ran(o: RunOutcome) -> dict:
    return result.from_run(
        IDS,
        o,
        memory_mb=256,
        recommended_mb=32,
        tip="t",
        cold_start=True,
        attempt=1,
        worker_id="h:1",
    )


@pytest.mark.parametrize(
    ("changes", "status", "error_type"),
    [
        ({}, "SUCCESS", None),
        ({"exit_code": 2, "stderr": b"boom\nlast line\n"}, "FAILED", "FUNCTION_ERROR"),
        ({"exit_code": -9, "timed_out": True}, "TIMEOUT", "TIMEOUT"),
        ({"exit_code": -9, "oom_killed": True}, "FAILED", "OUT_OF_MEMORY"),
    ],
)
def test_status_and_error_type(changes: dict, status: str, error_type: str | None) -> None:
    r = ran(outcome(**changes))
    assert set(r) == FIELDS
    assert (r["status"], r["errorType"]) == (status, error_type)
    assert (r["errorMessage"] is None) == (status == "SUCCESS")
    assert r["peakMemoryMB"] == 6 and r["peakMemoryBytes"] == 6 * 2**20 + 5


def test_function_error_message_quotes_the_last_stderr_line() -> None:
    assert ran(outcome(exit_code=2, stderr=b"x\nValueError: bad\n"))["errorMessage"] == (
        "function exited with code 2: ValueError: bad"
    )


def test_invalid_utf8_is_replaced() -> None:
    assert ran(outcome(stdout=b"ok \xff\xfe"))["stdout"] == "ok \ufffd\ufffd"


def test_failed_result_has_every_field_and_null_exit_code() -> None:
    r = result.failed(IDS, "CODE_NOT_FOUND", "missing", memory_mb=128, attempt=3, worker_id="h:1")
    assert set(r) == FIELDS
    assert (r["status"], r["exitCode"], r["errorType"], r["attempt"]) == (
        "FAILED",
        None,
        "CODE_NOT_FOUND",
        3,
    )
