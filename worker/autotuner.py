"""Memory auto-tuner: turns measured peaks into a recommended memory setting and a tip.

``recommend`` is pure. The basis is the highest peak of this run and the recent history, so
one light run does not talk a function into an out-of-memory failure. ``PeakHistory`` keeps
the last ``history_size`` peaks per function in Redis and degrades to "this run only" when
Redis is unreachable.

Choices worth knowing:
- the recommendation is the smallest ``step_mb`` entry that holds basis + headroom and is at
  least ``floor_mb``; when no step is big enough it is the largest step (the platform's
  settings are the steps, so a number above them could not be applied);
- after an OOM, or a peak at/above ``near_limit_percent`` of the limit, it is at least the
  next step strictly above the current setting; at the largest step the tip says so;
- the cost saving shown is rounded down (256MB -> 32MB is 87.5%, shown as 87%), so a tip
  never overstates it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from loguru import logger
from redis.commands.core import Script

from common.config import AutotunerConfig, MiB

from .redislink import RedisLink


@dataclass(frozen=True)
class Recommendation:
    recommended_mb: int
    tip: str
    based_on_runs: int


def recommend(
    peak_bytes: int,
    memory_mb: int,
    cfg: AutotunerConfig,
    *,
    oom: bool,
    history_peaks: list[int],
) -> Recommendation:
    """Recommend a memory setting for a function that peaked at ``peak_bytes`` under ``memory_mb``.

    ``history_peaks`` are the recent peaks as ``PeakHistory.add_and_get`` returns them (this
    run included); ``based_on_runs`` is their count (at least 1).
    """
    runs = max(1, len(history_peaks))
    basis = max([peak_bytes, *history_peaks])
    basis_mb = basis // MiB
    suffix = f" (based on the last {runs} runs)" if runs > 1 else ""
    fitted = _fit(basis, cfg)
    near_limit = peak_bytes * 100 >= cfg.near_limit_percent * memory_mb * MiB

    if oom or near_limit or fitted > memory_mb:
        above = [s for s in cfg.step_mb if s > memory_mb]
        if not above:
            tip = (
                f"⚠️ Tip: the function ran out of memory at {memory_mb}MB, the largest setting; "
                "reduce its memory use"
                if oom
                else f"⚠️ Tip: the peak ({basis_mb}MB) is near the current limit ({memory_mb}MB), "
                f"the largest setting; reduce the function's memory use to avoid out-of-memory "
                f"failures{suffix}"
            )
            return Recommendation(memory_mb, tip, runs)
        rec = max(fitted, above[0])
        if oom:
            tip = f"⚠️ Tip: the function ran out of memory at {memory_mb}MB; raise memory to {rec}MB"
        else:
            where = "above" if basis > memory_mb * MiB else "near"
            tip = (
                f"⚠️ Tip: the peak ({basis_mb}MB) is {where} the current limit ({memory_mb}MB); "
                f"raise memory to {rec}MB to avoid out-of-memory failures{suffix}"
            )
        return Recommendation(rec, tip, runs)

    if fitted < memory_mb:
        saving = int((1 - fitted / memory_mb) * 100)
        tip = (
            f"💡 Tip: current memory setting ({memory_mb}MB) is far above the peak ({basis_mb}MB); "
            f"{fitted}MB would cut cost by {saving}%{suffix}"
        )
        return Recommendation(fitted, tip, runs)

    return Recommendation(
        memory_mb, f"✅ Memory setting ({memory_mb}MB) fits the peak ({basis_mb}MB){suffix}", runs
    )


def _fit(basis_bytes: int, cfg: AutotunerConfig) -> int:
    """Smallest step holding basis + headroom and >= floor, else the largest step."""
    needed = basis_bytes * (100 + cfg.headroom_percent)  # in bytes * 100, to stay in integers
    for step in cfg.step_mb:
        if step >= cfg.floor_mb and step * MiB * 100 >= needed:
            return step
    return cfg.step_mb[-1]


RECORD = """
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return redis.call('LRANGE', KEYS[1], 0, -1)
"""
"""Record one peak and read the recent ones back, atomically, in one round trip."""


class PeakHistory:
    """Last ``history_size`` peaks per function in the Redis list ``autotuner:peaks:{id}``.

    ``client`` is a Redis URL or a zero-argument factory returning a redis-py client (e.g.
    ``ResultStore.client`` to share its connection pool); either way the client is made on
    first use, after the worker fork. After a Redis failure the history is skipped for a few
    seconds, so a dead Redis costs a task at most one connect timeout.
    """

    def __init__(
        self,
        client: str | Callable[[], redis.Redis],
        cfg: AutotunerConfig,
        *,
        retry_after_seconds: float = 5.0,
    ) -> None:
        self._factory = client if callable(client) else RedisLink(client).client
        self._record: Script | None = None
        self._cfg = cfg
        self._retry_after = retry_after_seconds
        self._skip_until = 0.0
        self._failing = False

    def add_and_get(self, function_id: str, peak_bytes: int) -> list[int]:
        """Record this run's peak and return the recent peaks, newest first (this one included)."""
        if time.monotonic() < self._skip_until:
            return [peak_bytes]
        key = f"autotuner:peaks:{function_id}"
        try:
            # Asked each time: after a failover the factory hands out the new pool's client.
            client = self._factory()
            if self._record is None:
                self._record = client.register_script(RECORD)
            raw = self._record(
                keys=[key],
                args=[peak_bytes, self._cfg.history_size - 1, self._cfg.history_ttl_seconds],
                client=client,
            )
        except (redis.RedisError, OSError, ValueError) as exc:  # ValueError: a closed socket
            self._skip_until = time.monotonic() + self._retry_after
            if not self._failing:
                logger.warning(
                    "[AUTO-TUNER] peak history unavailable ({}); using this run only", exc
                )
            self._failing = True
            return [peak_bytes]
        if self._failing:
            logger.info("[AUTO-TUNER] peak history available again")
            self._failing = False
        peaks = [p for p in (_as_int(v) for v in raw) if p is not None]
        logger.debug("[AUTO-TUNER] {}: {} peaks in history", function_id, len(peaks))
        return peaks or [peak_bytes]


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None

