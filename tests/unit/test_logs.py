"""Log lines: flat JSON objects (the schema in nanogrid/common/logs.py), and the trace id in
text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger

from nanogrid.common import logs
from nanogrid.common.config import LogConfig

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
BASE = {"ts", "level", "role", "requestId", "functionId", "traceId", "msg"}


@pytest.fixture
def lines(tmp_path: Path) -> Iterator[tuple[Path, LogConfig]]:
    path = tmp_path / "agent.log"
    yield path, LogConfig(level="DEBUG", file=str(path), json=True)
    logger.remove()


def test_json_lines_are_flat_objects_with_the_task_and_summary_fields(
    lines: tuple[Path, LogConfig],
) -> None:
    path, config = lines
    logs.setup(config, "worker-3")
    logger.info("worker 3 ready {}", "now")
    with logger.contextualize(requestId="req-1", functionId="hello", traceId=TRACE):
        logger.debug("[SQS] Received task {x}")  # braces in a message stay as they are
        logger.bind(durationMs=3.51, maxMemoryBytes=2 * 2**20, coldStart=True,
                    status="FAILED", errorType="FUNCTION_ERROR").info("REPORT RequestId: req-1")
        try:
            raise ValueError("bad")
        except ValueError:
            logger.exception("it broke")
    written = path.read_text().splitlines()
    first, received, report, broken = (json.loads(line) for line in written)
    assert set(first) == BASE and first["msg"] == "worker 3 ready now"
    assert (first["role"], first["requestId"], first["traceId"]) == ("worker-3", None, None)
    assert first["ts"].endswith("Z") and first["ts"][10] == "T" and first["level"] == "INFO"
    assert received["msg"] == "[SQS] Received task {x}" and received["level"] == "DEBUG"
    assert (received["requestId"], received["functionId"], received["traceId"]) == (
        "req-1", "hello", TRACE)
    assert set(report) == BASE | set(logs.SUMMARY_FIELDS)
    assert (report["durationMs"], report["maxMemoryBytes"], report["coldStart"]) == (
        3.51, 2 * 2**20, True)
    assert (report["status"], report["errorType"]) == ("FAILED", "FUNCTION_ERROR")
    assert "ValueError: bad" in broken["exception"] and broken["level"] == "ERROR"
    assert max(len(line.encode()) for line in written[:3]) < 400  # loguru's record: 856-1214


def test_text_lines_show_the_trace_id_of_a_traced_task(lines: tuple[Path, LogConfig]) -> None:
    path, config = lines
    logs.setup(LogConfig(level="INFO", file=config.file), "worker-0")
    with logger.contextualize(requestId="req-1", traceId=TRACE):
        logger.info("traced")
    with logger.contextualize(requestId="req-2", traceId=None):
        logger.info("untraced")
    traced, untraced = path.read_text().splitlines()
    assert traced.endswith(f"| worker-0 | req-1 trace={TRACE} | traced")
    assert untraced.endswith("| worker-0 | req-2 | untraced")
    assert len(traced.split(" | ", 4)) == 5  # nanogrid/devtools/stack.py reads five columns
