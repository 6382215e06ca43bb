"""The result contract: the JSON published on ``result:{requestId}``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from runners.base import RunOutcome

MiB = 2**20


def from_run(
    ids: dict[str, Any],
    outcome: RunOutcome,
    *,
    memory_mb: int,
    recommended_mb: int,
    tip: str,
    cold_start: bool,
    attempt: int,
    worker_id: str,
) -> dict[str, Any]:
    """The result of a function that ran (whatever its exit)."""
    if outcome.timed_out:
        status, error_type = "TIMEOUT", "TIMEOUT"
        message = f"function exceeded its timeout and was killed after {outcome.duration_ms:.0f} ms"
    elif outcome.oom_killed:
        status, error_type = "FAILED", "OUT_OF_MEMORY"
        message = f"function ran out of memory (limit {memory_mb}MB) and was killed"
    elif outcome.exit_code != 0:
        status, error_type = "FAILED", "FUNCTION_ERROR"
        message = _exit_message(outcome)
    else:
        status, error_type, message = "SUCCESS", None, None
    return {
        **ids,
        "status": status,
        "exitCode": outcome.exit_code,
        "stdout": outcome.stdout.decode("utf-8", "replace"),
        "stderr": outcome.stderr.decode("utf-8", "replace"),
        "stdoutTruncated": outcome.stdout_truncated,
        "stderrTruncated": outcome.stderr_truncated,
        "durationMillis": round(outcome.duration_ms, 3),
        "peakMemoryBytes": outcome.peak_memory_bytes,
        "peakMemoryMB": outcome.peak_memory_bytes // MiB,
        "memoryMb": memory_mb,
        "recommendedMemoryMb": recommended_mb,
        "optimizationTip": tip,
        "coldStart": cold_start,
        "errorType": error_type,
        "errorMessage": message,
        "attempt": attempt,
        "workerId": worker_id,
        "finishedAt": _now(),
    }


def failed(
    ids: dict[str, Any],
    error_type: str,
    message: str,
    *,
    memory_mb: int | None,
    attempt: int,
    worker_id: str,
) -> dict[str, Any]:
    """The result of a task that never ran (bad message, missing code, ...)."""
    return {
        "requestId": ids.get("requestId"),
        "functionId": ids.get("functionId"),
        "runtime": ids.get("runtime"),
        "status": "FAILED",
        "exitCode": None,
        "stdout": "",
        "stderr": "",
        "stdoutTruncated": False,
        "stderrTruncated": False,
        "durationMillis": 0,
        "peakMemoryBytes": 0,
        "peakMemoryMB": 0,
        "memoryMb": memory_mb,
        "recommendedMemoryMb": None,
        "optimizationTip": None,
        "coldStart": False,
        "errorType": error_type,
        "errorMessage": message,
        "attempt": attempt,
        "workerId": worker_id,
        "finishedAt": _now(),
    }


def _exit_message(outcome: RunOutcome) -> str:
    if outcome.exit_code is not None and outcome.exit_code < 0:
        return f"function was killed by signal {-outcome.exit_code}"
    last = outcome.stderr.decode("utf-8", "replace").strip().splitlines()
    detail = f": {last[-1][:200]}" if last else ""
    return f"function exited with code {outcome.exit_code}{detail}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
