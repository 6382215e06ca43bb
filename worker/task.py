"""The task message contract: an SQS body parsed and checked into a Task."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from common.config import Config
from common.errors import InvalidMessage, RuntimeNotSupported

from .result import TaskIds

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
FUNCTION_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class Task:
    request_id: str
    function_id: str
    runtime: str
    s3_bucket: str
    s3_key: str
    memory_mb: int
    timeout_ms: int
    input_json: bytes
    """inputData as the JSON the function reads on stdin."""

    @property
    def ids(self) -> TaskIds:
        return TaskIds(self.request_id, self.function_id, self.runtime)


def parse(body: str, config: Config) -> Task:
    """Check a message body against the contract; raise InvalidMessage naming the problem."""
    try:
        data = json.loads(body)
    except (ValueError, TypeError) as exc:
        raise InvalidMessage(f"message body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidMessage(f"message body must be a JSON object, got {type(data).__name__}")
    fail = InvalidMessage
    request_id = data.get("requestId")
    if not isinstance(request_id, str) or not REQUEST_ID.fullmatch(request_id):
        raise fail("requestId: required, 1-128 of A-Z a-z 0-9 . _ : -")
    function_id = _required_str(data, "functionId", fail)
    if not FUNCTION_ID.fullmatch(function_id):
        raise fail("functionId: must be 1-64 of A-Z a-z 0-9 . _ -")
    runtime = _required_str(data, "runtime", fail)
    bucket = _required_str(data, "s3Bucket", fail)
    key = _required_str(data, "s3Key", fail)
    limits = config.limits
    memory_mb = _optional_int(
        data, "memoryMb", limits.default_memory_mb, limits.min_memory_mb, limits.max_memory_mb, fail
    )
    timeout_ms = _optional_int(
        data,
        "timeoutMs",
        limits.default_timeout_ms,
        limits.min_timeout_ms,
        limits.max_timeout_ms,
        fail,
    )
    input_data = data.get("inputData", {})
    if runtime not in config.runtimes:
        known = ", ".join(sorted(config.runtimes))
        raise RuntimeNotSupported(f"runtime {runtime!r} is not supported here (supported: {known})")
    return Task(
        request_id=request_id,
        function_id=function_id,
        runtime=runtime,
        s3_bucket=bucket,
        s3_key=key,
        memory_mb=memory_mb,
        timeout_ms=timeout_ms,
        input_json=json.dumps(input_data, ensure_ascii=False).encode(),
    )


def peek_ids(body: str) -> TaskIds:
    """The ids a body that failed to parse still names validly (for its FAILED result);
    ``request_id`` is None when it names none."""
    try:
        data = json.loads(body)
    except (ValueError, TypeError):
        return TaskIds(None)
    if not isinstance(data, dict):
        return TaskIds(None)
    request_id = data.get("requestId")
    if not (isinstance(request_id, str) and REQUEST_ID.fullmatch(request_id)):
        request_id = None
    function_id, runtime = (
        data[k] if isinstance(data.get(k), str) else None for k in ("functionId", "runtime")
    )
    return TaskIds(request_id, function_id, runtime)


def _required_str(data: dict, name: str, fail: Any) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise fail(f"{name}: required, a non-empty string")
    return value


def _optional_int(data: dict, name: str, default: int, lo: int, hi: int, fail: Any) -> int:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise fail(f"{name}: must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise fail(f"{name}: must be between {lo} and {hi}, got {value}")
    return value
