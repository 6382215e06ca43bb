"""The task message contract: an SQS body parsed and checked into a Task.

Bodies come from anyone who can send to the queue, so decoding them raises only
InvalidMessage, whatever the body holds: not JSON, nesting deeper than the interpreter's
recursion limit, a number past Python's int digit limit, ``NaN``, a lone surrogate
(``"\\ud800"``: valid JSON, not valid Unicode), a body larger than SQS allows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from nanogrid.common.config import Config
from nanogrid.common.errors import InvalidMessage, RuntimeNotSupported

from .result import TaskIds

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
FUNCTION_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_BODY_BYTES = 2**20
"""SQS's own largest message (1 MiB); anything longer did not come from SQS intact."""
_REQUEST_ID_TEXT = re.compile(r'"requestId"\s*:\s*"([A-Za-z0-9._:-]{1,128})"')
_DECODE_ERRORS = (ValueError, TypeError, RecursionError, MemoryError)
"""What json raises on bad input: syntax, int digit limit, surrogates (UnicodeError is a
ValueError), nesting past the recursion limit, absurd sizes."""


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
    trace_id: str | None = None
    """The message's trace id (its attributes, not its body): results echo it."""

    @property
    def ids(self) -> TaskIds:
        return TaskIds(self.request_id, self.function_id, self.runtime, self.trace_id)


def parse(body: str, config: Config, trace_id: str | None = None) -> Task:
    """Check a message body against the contract; raise InvalidMessage naming the problem
    (RuntimeNotSupported for a runtime this host does not have). ``trace_id``: the
    message's, carried along."""
    data = _decode(body)
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
    for name, value in (("runtime", runtime), ("s3Bucket", bucket), ("s3Key", key)):
        if not _is_unicode(value):
            raise fail(f"{name}: not valid Unicode (a lone surrogate)")
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
    input_json = _input_json(data.get("inputData", {}))
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
        input_json=input_json,
        trace_id=trace_id,
    )


def memory_mb_of(body: str, config: Config) -> int:
    """The ``memoryMb`` a body asks for, as admission counts it; a body that does not parse
    counts as the smallest (it only gets a FAILED result)."""
    limits = config.limits
    try:
        return _optional_int(
            _decode(body),
            "memoryMb",
            limits.default_memory_mb,
            limits.min_memory_mb,
            limits.max_memory_mb,
            InvalidMessage,
        )
    except InvalidMessage:
        return limits.min_memory_mb


def peek_ids(body: str) -> TaskIds:
    """The ids a body that failed to parse still names validly (for its FAILED result);
    ``request_id`` is None when it names none. Never raises.

    A body that does not decode at all is searched for one ``"requestId": "..."``, so that
    even a body cut short or nested too deep gets a result when its id can be read.
    """
    try:
        data = _decode(body)
    except InvalidMessage:
        found = _REQUEST_ID_TEXT.findall(body[:MAX_BODY_BYTES]) if isinstance(body, str) else []
        return TaskIds(found[0] if len(found) == 1 else None)
    request_id = data.get("requestId")
    if not (isinstance(request_id, str) and REQUEST_ID.fullmatch(request_id)):
        request_id = None
    function_id, runtime = (
        v if isinstance(v := data.get(k), str) and FUNCTION_ID.fullmatch(v) else None
        for k in ("functionId", "runtime")
    )
    return TaskIds(request_id, function_id, runtime)


def _decode(body: str) -> dict[str, Any]:
    """The body as a JSON object, or InvalidMessage saying in one line why not."""
    if not isinstance(body, str):
        raise InvalidMessage(f"message body must be text, got {type(body).__name__}")
    if len(body) > MAX_BODY_BYTES:
        raise InvalidMessage(
            f"message body is {len(body)} characters, more than SQS's {MAX_BODY_BYTES} bytes"
        )
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise InvalidMessage("message body is nested too deeply") from None
    except _DECODE_ERRORS as exc:
        raise InvalidMessage(f"message body is not JSON: {_line(exc)}") from None
    if not isinstance(data, dict):
        raise InvalidMessage(f"message body must be a JSON object, got {type(data).__name__}")
    return data


def _input_json(value: Any) -> bytes:
    """inputData as the UTF-8 JSON the function reads on stdin."""
    try:
        return json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise InvalidMessage("inputData: not valid Unicode (a lone surrogate)") from None
    except RecursionError:
        raise InvalidMessage("inputData: nested too deeply") from None
    except _DECODE_ERRORS as exc:
        raise InvalidMessage(f"inputData: cannot be passed on: {_line(exc)}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


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
