"""Result contract: fields, status and errorType from a run outcome, and its one serializer."""

from __future__ import annotations

import pytest

from nanogrid.runners.base import RunOutcome
from nanogrid.worker import result

IDS = result.TaskIds("r", "f", "python", "4bf92f3577b34da6a3ce929d0e0e4736")
TIMINGS = result.Timings(
    queued_ms=12.5, fetch_ms=0.5, unpack_ms=1.25, sandbox_ms=0.25, run_ms=3.25, total_ms=6
)
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
    "hint",
    "attempt",
    "workerId",
    "finishedAt",
    "traceId",
    "tipCode",
    "tipParams",
    "timings",
}
TIP = {"currentMb": 256, "peakMb": 6, "recommendedMb": 32, "savingPercent": 87, "runs": 1}
TIMING_FIELDS = {"queuedMs", "fetchMs", "unpackMs", "sandboxMs", "runMs", "totalMs"}


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
    return result.ran(
        IDS,
        o,
        memory_mb=256,
        recommended_mb=32,
        tip="t",
        tip_code="OVER_PROVISIONED",
        tip_params=TIP,
        cold_start=True,
        attempt=1,
        worker_id="h:1",
        timings=TIMINGS,
    ).to_dict()


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
    assert set(r["timings"]) == TIMING_FIELDS and r["timings"]["runMs"] == 3.25
    assert r["traceId"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert (r["tipCode"], r["tipParams"]) == ("OVER_PROVISIONED", TIP)


def test_function_error_message_quotes_the_last_stderr_line() -> None:
    assert ran(outcome(exit_code=2, stderr=b"x\nValueError: bad\n"))["errorMessage"] == (
        "function exited with code 2: ValueError: bad"
    )


def test_invalid_utf8_is_replaced() -> None:
    assert ran(outcome(stdout=b"ok \xff\xfe"))["stdout"] == "ok \ufffd\ufffd"


def test_failed_result_has_every_field_and_null_exit_code() -> None:
    r = result.failed(
        IDS, "CODE_NOT_FOUND", "missing", memory_mb=128, attempt=3, worker_id="h:1",
        timings=TIMINGS,
    ).to_dict()
    assert set(r) == FIELDS
    assert (r["status"], r["exitCode"], r["errorType"], r["attempt"]) == (
        "FAILED",
        None,
        "CODE_NOT_FOUND",
        3,
    )
    assert r["traceId"] == IDS.trace_id and r["tipCode"] is None and r["tipParams"] is None


def test_a_message_that_never_parsed_has_no_timings() -> None:
    r = result.failed(
        result.TaskIds("r"), "INVALID_MESSAGE", "bad", memory_mb=None, attempt=1,
        worker_id="h:1", timings=None,
    ).to_dict()
    assert set(r) == FIELDS - {"timings"}
    assert r["functionId"] is None and r["traceId"] is None


def test_json_round_trip_keeps_every_field() -> None:
    original = result.ran(
        IDS, outcome(), memory_mb=256, recommended_mb=32, tip="💡 t", tip_code="RIGHT_SIZED",
        tip_params={"currentMb": 256, "peakMb": 6, "runs": 1}, cold_start=False, attempt=2,
        worker_id="h:1", timings=TIMINGS,
    )
    again = result.Result.from_json(original.to_json())
    assert again == original
    assert again.to_dict() == original.to_dict()


def test_a_partial_dict_reads_with_defaults() -> None:
    partial = result.Result.from_dict({"requestId": "r", "status": "SUCCESS", "junk": 1})
    assert (partial.request_id, partial.ok, partial.timings) == ("r", True, None)
    assert result.Result.from_dict({"timings": {"runMs": "x", "totalMs": 4}}).timings == (
        result.Timings(total_ms=4.0)
    )
