"""PeakHistory against a real redis-server, and the recommendation it feeds."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import redis

from common.config import AutotunerConfig
from worker.autotuner import PeakHistory, recommend
from worker.resultstore import ResultStore

MB = 2**20
CFG = dataclasses.replace(AutotunerConfig(), history_size=5, history_ttl_seconds=600)


def test_keeps_the_last_n_peaks_newest_first_with_ttl(redis_url: str) -> None:
    history = PeakHistory(redis_url, CFG)
    for i in range(1, 8):
        peaks = history.add_and_get("hello", i * MB)
    assert peaks == [7 * MB, 6 * MB, 5 * MB, 4 * MB, 3 * MB]
    client = redis.Redis.from_url(redis_url)
    assert client.llen("autotuner:peaks:hello") == 5
    assert 0 < client.ttl("autotuner:peaks:hello") <= 600
    assert history.add_and_get("other", 1 * MB) == [1 * MB]  # per function


def test_one_light_run_does_not_downsize_after_heavy_ones(redis_url: str, tmp_path: Path) -> None:
    store = ResultStore(redis_url, 60, tmp_path)
    history = PeakHistory(store.client, CFG)  # shares the store's connection pool
    for _ in range(3):
        history.add_and_get("report", 180 * MB)
    peaks = history.add_and_get("report", 6 * MB)
    rec = recommend(6 * MB, 256, CFG, oom=False, history_peaks=peaks)
    assert rec.recommended_mb == 256
    assert rec.based_on_runs == 4
    assert rec.tip == "✅ Memory setting (256MB) fits the peak (180MB) (based on the last 4 runs)"


def test_redis_down_returns_this_run_quickly_and_recovers(
    redis_server: Any, redis_url: str
) -> None:
    history = PeakHistory(redis_url, CFG, retry_after_seconds=0.2)
    assert history.add_and_get("fn", 10 * MB) == [10 * MB]
    redis_server.stop()
    try:
        started = time.monotonic()
        assert history.add_and_get("fn", 20 * MB) == [20 * MB]
        assert history.add_and_get("fn", 30 * MB) == [30 * MB]
        assert time.monotonic() - started < 1.0
    finally:
        redis_server.start()
    time.sleep(0.3)
    assert history.add_and_get("fn", 40 * MB) == [40 * MB]  # redis restarted empty (no persistence)
    assert history.add_and_get("fn", 50 * MB) == [50 * MB, 40 * MB]
