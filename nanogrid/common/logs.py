"""Loguru set-up: every line names its process role, and task lines their requestId and,
when the task came with one, its traceId.

``log.json: true`` writes one flat JSON object per line (what Loki, CloudWatch Logs Insights
and Elastic index as fields, in place of loguru's nested record):

    {"ts": "2026-12-07T00:41:17.591Z", "level": "INFO", "role": "worker-0",
     "requestId": "req-1", "functionId": "hello", "traceId": "4bf92f35...", "msg": "REPORT ..."}

``requestId``, ``functionId`` and ``traceId`` are null outside a task (or when it has none).
An invocation's summary line (``REPORT``) adds ``durationMs``, ``maxMemoryBytes``,
``coldStart``, ``status`` and ``errorType``; a line with a traceback adds ``exception``.
"""

from __future__ import annotations

import json
import sys
import traceback
from datetime import UTC
from typing import Any

from loguru import logger

from .config import LogConfig

TEXT_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {extra[role]} | {extra[requestId]}"
SUMMARY_FIELDS = ("durationMs", "maxMemoryBytes", "coldStart", "status", "errorType")
"""Fields of the invocation's summary line (bound by nanogrid/worker/invoke.py)."""


def text_format(record: Any) -> str:
    """The text line: time | level | role | requestId [trace=traceId] | message."""
    trace = " trace={extra[traceId]}" if record["extra"].get("traceId") else ""
    return TEXT_FORMAT + trace + " | {message}\n{exception}"


def json_format(record: Any) -> str:
    """The flat JSON line (module docstring), put in the record for loguru to write as is."""
    extra = record["extra"]
    request_id = extra.get("requestId")
    line = {
        "ts": record["time"].astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
        "level": record["level"].name,
        "role": extra.get("role"),
        "requestId": None if request_id == "-" else request_id,
        "functionId": extra.get("functionId"),
        "traceId": extra.get("traceId"),
        "msg": record["message"],
    }
    for name in SUMMARY_FIELDS:
        if name in extra:
            line[name] = extra[name]
    error = record["exception"]
    if error is not None and error.type is not None:
        line["exception"] = "".join(
            traceback.format_exception(error.type, error.value, error.traceback)
        )
    # Returned through the record: loguru formats what a format function returns.
    extra["_json"] = json.dumps(line, ensure_ascii=False, default=str, separators=(",", ":"))
    return "{extra[_json]}\n"


def setup(config: LogConfig, role: str) -> None:
    """(Re)configure the sinks for this process; ``role`` is e.g. ``arbiter`` or ``worker-1``."""
    logger.remove()
    logger.configure(extra={"role": role, "requestId": "-"})
    line = json_format if config.json else text_format
    logger.add(sys.stderr, level=config.level, format=line, backtrace=False, diagnose=False)
    if config.file:
        logger.add(
            config.file,
            level=config.level,
            format=line,
            rotation=config.rotation,
            retention=config.retention,
            enqueue=False,
            backtrace=False,
            diagnose=False,
        )
