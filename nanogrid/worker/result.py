"""The result contract: the JSON published on ``result:{requestId}``, as one type.

``Result`` is the one place the contract's field names live: ``to_dict``/``to_json`` write
them, ``from_dict`` reads them (tolerantly: a partial dict, such as the summary a worker
sends its arbiter, or a result stored by an older agent, fills the rest with defaults).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nanogrid.runners.base import RunOutcome

from .diagnose import error_line

MiB = 2**20

SUCCESS, FAILED, TIMEOUT = "SUCCESS", "FAILED", "TIMEOUT"


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _json_name(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("json") or _camel(f.name))


_NAMES: dict[type, tuple[tuple[str, str], ...]] = {}


def _names(cls: type) -> tuple[tuple[str, str], ...]:
    """(attribute, JSON name) of each field of a result dataclass, in order: worked out once,
    not for every result written."""
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple((f.name, _json_name(f)) for f in dataclasses.fields(cls))
    return names


@dataclass(frozen=True)
class Timings:
    """Milliseconds per phase of one task; fetch + unpack + sandbox + run <= total."""

    queued_ms: float = 0.0
    """SQS SentTimestamp to receive, never negative."""
    fetch_ms: float = 0.0
    """Code fetch, including the cache check."""
    unpack_ms: float = 0.0
    """0 when the sandbox already held this code."""
    sandbox_ms: float = 0.0
    """Acquire, including a cold create."""
    run_ms: float = 0.0
    """= durationMillis."""
    total_ms: float = 0.0
    """Receive to result built."""

    PHASES = ("queued", "fetch", "unpack", "sandbox", "run", "total")

    def to_dict(self) -> dict[str, float]:
        return {name: round(getattr(self, attr), 3) for attr, name in _names(Timings)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Timings:
        values = {}
        for attr, name in _names(cls):
            value = data.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                values[attr] = float(value)
        return cls(**values)


@dataclass(frozen=True)
class Result:
    """One task's result. Field order is the JSON's order."""

    request_id: str | None
    function_id: str | None
    runtime: str | None
    status: str
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_millis: float = 0
    peak_memory_bytes: int = 0
    peak_memory_mb: int = field(default=0, metadata={"json": "peakMemoryMB"})
    memory_mb: int | None = None
    recommended_memory_mb: int | None = None
    optimization_tip: str | None = None
    cold_start: bool = False
    error_type: str | None = None
    error_message: str | None = None
    hint: str | None = None
    """For the function's author, when the run looks wrong though it succeeded (a handler
    nothing called: docs/functions.md); null otherwise. Not in the contract yet."""
    attempt: int = 1
    worker_id: str = ""
    finished_at: str = ""
    trace_id: str | None = None
    """The W3C trace id the task arrived with (tracecontext.py), None when none."""
    tip_code: str | None = None
    tip_params: dict[str, Any] | None = None
    """The tip as a code and its numbers (autotuner.py), for a controller to render."""
    timings: Timings | None = None
    """Absent only on results of messages that never parsed."""

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for attr, name in _names(Result):
            value = getattr(self, attr)
            if attr == "timings":
                if value is not None:
                    data[name] = value.to_dict()
            else:
                data[name] = value
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    def summary(self, *names: str) -> dict[str, Any]:
        """Only the named JSON fields (e.g. what the arbiter needs), for small messages."""
        full = self.to_dict()
        return {name: full[name] for name in names if name in full}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        values: dict[str, Any] = {}
        for attr, name in _names(cls):
            if name not in data:
                continue
            value = data[name]
            if attr == "timings":
                value = Timings.from_dict(value) if isinstance(value, dict) else None
            values[attr] = value
        values.setdefault("request_id", None)
        values.setdefault("function_id", None)
        values.setdefault("runtime", None)
        values.setdefault("status", FAILED)
        return cls(**values)

    @classmethod
    def from_json(cls, text: str | bytes) -> Result:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a result is a JSON object")
        return cls.from_dict(data)


@dataclass(frozen=True)
class TaskIds:
    """What a result echoes of its task."""

    request_id: str | None
    function_id: str | None = None
    runtime: str | None = None
    trace_id: str | None = None
    """Of the message, not of the body: the result echoes it all the same."""


def ran(
    ids: TaskIds,
    outcome: RunOutcome,
    *,
    memory_mb: int,
    recommended_mb: int,
    tip: str,
    tip_code: str,
    tip_params: dict[str, Any],
    cold_start: bool,
    attempt: int,
    worker_id: str,
    timings: Timings,
    hint: str | None = None,
) -> Result:
    """The result of a function that ran (whatever its exit)."""
    if outcome.timed_out:
        status, error_type = TIMEOUT, "TIMEOUT"
        message = f"function exceeded its timeout and was killed after {outcome.duration_ms:.0f} ms"
    elif outcome.oom_killed:
        status, error_type = FAILED, "OUT_OF_MEMORY"
        message = f"function ran out of memory (limit {memory_mb}MB) and was killed"
    elif outcome.exit_code != 0:
        status, error_type = FAILED, "FUNCTION_ERROR"
        message = _exit_message(outcome)
    else:
        status, error_type, message = SUCCESS, None, None
    return Result(
        request_id=ids.request_id,
        function_id=ids.function_id,
        runtime=ids.runtime,
        status=status,
        exit_code=outcome.exit_code,
        stdout=outcome.stdout.decode("utf-8", "replace"),
        stderr=outcome.stderr.decode("utf-8", "replace"),
        stdout_truncated=outcome.stdout_truncated,
        stderr_truncated=outcome.stderr_truncated,
        duration_millis=round(outcome.duration_ms, 3),
        peak_memory_bytes=outcome.peak_memory_bytes,
        peak_memory_mb=outcome.peak_memory_bytes // MiB,
        memory_mb=memory_mb,
        recommended_memory_mb=recommended_mb,
        optimization_tip=tip,
        cold_start=cold_start,
        error_type=error_type,
        error_message=message,
        hint=hint,
        attempt=attempt,
        worker_id=worker_id,
        finished_at=_now(),
        trace_id=ids.trace_id,
        tip_code=tip_code,
        tip_params=tip_params,
        timings=timings,
    )


def failed(
    ids: TaskIds,
    error_type: str,
    message: str,
    *,
    memory_mb: int | None,
    attempt: int,
    worker_id: str,
    timings: Timings | None,
) -> Result:
    """The result of a task that never ran (bad message, missing code, ...)."""
    return Result(
        request_id=ids.request_id,
        function_id=ids.function_id,
        runtime=ids.runtime,
        status=FAILED,
        memory_mb=memory_mb,
        error_type=error_type,
        error_message=message,
        attempt=attempt,
        worker_id=worker_id,
        finished_at=_now(),
        trace_id=ids.trace_id,
        timings=timings,
    )


def _exit_message(outcome: RunOutcome) -> str:
    if outcome.exit_code is not None and outcome.exit_code < 0:
        return f"function was killed by signal {-outcome.exit_code}"
    line = error_line(outcome.stderr.decode("utf-8", "replace"))
    detail = f": {line[:200]}" if line else ""
    return f"function exited with code {outcome.exit_code}{detail}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
