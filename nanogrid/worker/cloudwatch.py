"""CloudWatch metrics, sent in the background so a task never waits on (or fails for) them.

``record`` only appends to a bounded in-memory buffer. A daemon thread wakes every
``flush_seconds``, aggregates the buffer per function and metric into ``StatisticValues``
(one datum per function and metric per flush, so the request count stays low and Average
still means "per invocation": ``Errors`` Average is the error rate) and sends them with
``PutMetricData``, at most 1000 datums per call. A failed call drops its datums: metrics
are best effort, and retrying would only grow the backlog while CloudWatch is away.

Metrics (dimension ``FunctionId``): PeakMemoryBytes (Bytes), Duration (Milliseconds),
Invocations, Errors, ColdStarts, Timeouts, OutOfMemory (Count).
"""

from __future__ import annotations

import functools
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from loguru import logger

from nanogrid.common.config import CloudWatchConfig

MAX_DATUMS_PER_CALL = 1000
DEFAULT_MAX_BUFFER = 10_000


@dataclass(frozen=True)
class _Record:
    function_id: str
    duration_ms: float | None
    peak_memory_bytes: int | None
    error: bool
    timeout: bool
    oom: bool
    cold_start: bool


def _default_client(region: str | None = None) -> Any:
    from nanogrid.common import awsclient

    return awsclient.client(
        "cloudwatch", region, connect_timeout=1, read_timeout=3, retries={"max_attempts": 2}
    )


class MetricsPublisher:
    """Buffers invocation metrics and sends them to CloudWatch from a background thread."""

    def __init__(
        self,
        config: CloudWatchConfig,
        *,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        client_factory: Callable[[], Any] | None = None,
        region: str | None = None,
    ) -> None:
        self._config = config
        self._client_factory = client_factory or functools.partial(_default_client, region)
        self._client: Any = None
        self._buffer: deque[_Record] = deque()
        self._max_buffer = max_buffer
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._failing = False
        self.sent_datums = 0
        self.errors = 0
        """PutMetricData calls that failed: /metrics."""
        self.dropped_datums = 0
        self.dropped_records = 0
        """Records pushed out of a full buffer (oldest first)."""

    @property
    def enabled(self) -> bool:
        return self._config.enabled

    def record(
        self,
        function_id: str,
        *,
        duration_ms: float | None,
        peak_memory_bytes: int | None,
        status: str,
        error_type: str | None,
        cold_start: bool,
    ) -> None:
        """Queue one invocation's metrics; never blocks on I/O, never raises."""
        if not self._config.enabled:
            return
        try:
            rec = _Record(
                function_id=function_id or "unknown",
                duration_ms=None if duration_ms is None else float(duration_ms),
                peak_memory_bytes=None if peak_memory_bytes is None else int(peak_memory_bytes),
                error=status != "SUCCESS",
                timeout=status == "TIMEOUT" or error_type == "TIMEOUT",
                oom=error_type == "OUT_OF_MEMORY",
                cold_start=bool(cold_start),
            )
            if os.getpid() != self._pid:
                self._reset_after_fork()
            with self._lock:
                if len(self._buffer) >= self._max_buffer:
                    self._buffer.popleft()
                    self.dropped_records += 1
                self._buffer.append(rec)
            logger.debug(
                "[CLOUDWATCH] Publishing metric: {} {} queued for the next PutMetricData",
                rec.function_id, status,
            )
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="cloudwatch-metrics", daemon=True
                )
                self._thread.start()
        except Exception as exc:  # metrics must never fail a task
            logger.debug("[CLOUDWATCH] record failed: {}", exc)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread after one last flush, waiting at most ``timeout`` seconds."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(timeout)
            if thread.is_alive():
                with self._lock:
                    left = len(self._buffer)
                logger.warning("[CLOUDWATCH] close timed out; {} records not sent", left)

    def flush(self) -> int:
        """Send what is buffered now (the thread calls this); returns the datums sent."""
        with self._lock:
            records = list(self._buffer)
            self._buffer.clear()
            dropped, self.dropped_records = self.dropped_records, 0
        if dropped:
            logger.warning("[CLOUDWATCH] buffer full; dropped {} oldest records", dropped)
        if not records:
            return 0
        datums = _aggregate(records, datetime.now(UTC))
        sent = 0
        for start in range(0, len(datums), MAX_DATUMS_PER_CALL):
            batch = datums[start : start + MAX_DATUMS_PER_CALL]
            try:
                if self._client is None:
                    self._client = self._client_factory()
                self._client.put_metric_data(Namespace=self._config.namespace, MetricData=batch)
            except Exception as exc:
                self.errors += 1
                lost = len(datums) - start
                self.dropped_datums += lost
                if not self._failing:
                    logger.warning(
                        "[CLOUDWATCH] put_metric_data failed: {}; dropped {} datums", exc, lost
                    )
                else:
                    logger.debug("[CLOUDWATCH] still failing: {}; dropped {} datums", exc, lost)
                self._failing = True
                break
            sent += len(batch)
        else:
            if self._failing:
                logger.info("[CLOUDWATCH] put_metric_data works again")
            self._failing = False
        self.sent_datums += sent
        if sent:
            logger.debug("[CLOUDWATCH] sent {} datums", sent)
        return sent

    def _reset_after_fork(self) -> None:
        # Threads do not survive a fork and the lock may have been copied while held: the
        # child starts with fresh ones (and its own client, made in its own thread).
        self._pid, self._thread, self._client = os.getpid(), None, None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.wait(self._config.flush_seconds):
            self._flush_safely()
        self._flush_safely()

    def _flush_safely(self) -> None:
        try:
            self.flush()
        except Exception as exc:  # keep the thread alive whatever happens
            logger.error("[CLOUDWATCH] flush crashed: {}", exc)


def _aggregate(records: list[_Record], when: datetime) -> list[dict[str, Any]]:
    """One StatisticValues datum per function and metric."""
    series: dict[tuple[str, str, str], list[float]] = {}

    def add(function_id: str, name: str, unit: str, value: float) -> None:
        series.setdefault((function_id, name, unit), []).append(value)

    for r in records:
        add(r.function_id, "Invocations", "Count", 1)
        add(r.function_id, "Errors", "Count", int(r.error))
        add(r.function_id, "ColdStarts", "Count", int(r.cold_start))
        add(r.function_id, "Timeouts", "Count", int(r.timeout))
        add(r.function_id, "OutOfMemory", "Count", int(r.oom))
        if r.duration_ms is not None:
            add(r.function_id, "Duration", "Milliseconds", r.duration_ms)
        if r.peak_memory_bytes is not None:
            add(r.function_id, "PeakMemoryBytes", "Bytes", r.peak_memory_bytes)
    return [
        {
            "MetricName": name,
            "Dimensions": [{"Name": "FunctionId", "Value": function_id}],
            "Timestamp": when,
            "Unit": unit,
            "StatisticValues": {
                "SampleCount": float(len(values)),
                "Sum": float(sum(values)),
                "Minimum": float(min(values)),
                "Maximum": float(max(values)),
            },
        }
        for (function_id, name, unit), values in series.items()
    ]
