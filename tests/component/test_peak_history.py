"""The auto-tuner's peak history against a real redis-server: read with the claim, recorded
with the result's publish (no round trip of its own), and the recommendation it feeds."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import redis

from nanogrid.common.config import AutotunerConfig
from nanogrid.worker.autotuner import PeakHistory, recommend
from nanogrid.worker.claim import ClaimStore
from nanogrid.worker.result import Result
from nanogrid.worker.resultstore import ResultStore

MB = 2**20
CFG = dataclasses.replace(AutotunerConfig(), history_size=5, history_ttl_seconds=600)


def stores(redis_url: str, tmp_path: Path, cfg: AutotunerConfig = CFG) -> tuple[
    PeakHistory, ResultStore, ClaimStore
]:
    history = PeakHistory(cfg)
    results = ResultStore(redis_url, 60, tmp_path / "outbox", retry_seconds=0, peaks=history)
    return history, results, ClaimStore(results.link, "host:1", 30, results.existing, history)


def ran(request_id: str, function_id: str, peak: int) -> Result:
    """A run's result (it has a recommendation)."""
    return Result(request_id, function_id, "python", "SUCCESS", peak_memory_bytes=peak,
                  memory_mb=256, recommended_memory_mb=128)


def run(results: ResultStore, claims: ClaimStore, request_id: str, function_id: str,
        peak: int) -> tuple[int, ...]:
    """Claim, then publish a run's result as the worker does; the peaks the claim read."""
    claim = claims.acquire(request_id, function_id, "python").claim
    assert claim is not None
    assert results.publish(ran(request_id, function_id, peak))
    return claim.recent_peaks


def test_keeps_the_last_n_peaks_newest_first_with_ttl(redis_url: str, tmp_path: Path) -> None:
    history, results, claims = stores(redis_url, tmp_path)
    seen = [run(results, claims, f"k{i}", "hello", i * MB) for i in range(1, 9)]
    assert seen[0] == () and seen[1] == (1 * MB,)
    assert seen[-1] == (7 * MB, 6 * MB, 5 * MB, 4 * MB)  # history_size - 1: its own makes 5
    assert history.with_run(8 * MB, seen[-1]) == [8 * MB, 7 * MB, 6 * MB, 5 * MB, 4 * MB]
    client = redis.Redis.from_url(redis_url)
    assert client.llen("autotuner:peaks:hello:python") == 5
    assert 0 < client.ttl("autotuner:peaks:hello:python") <= 600
    assert run(results, claims, "o1", "other", 1 * MB) == ()  # per function


def test_the_history_is_per_function_and_runtime(redis_url: str, tmp_path: Path) -> None:
    """A function moved to node does not inherit its python peaks (nor the reverse)."""
    _, results, claims = stores(redis_url, tmp_path)
    run(results, claims, "p1", "moved", 180 * MB)
    claim = claims.acquire("n1", "moved", "node").claim
    assert claim is not None and claim.recent_peaks == ()
    assert results.publish(dataclasses.replace(ran("n1", "moved", 40 * MB), runtime="node"))
    python = claims.acquire("p2", "moved", "python").claim
    node = claims.acquire("n2", "moved", "node").claim
    assert python is not None and python.recent_peaks == (180 * MB,)
    assert node is not None and node.recent_peaks == (40 * MB,)


def test_one_light_run_does_not_downsize_after_heavy_ones(redis_url: str, tmp_path: Path) -> None:
    history, results, claims = stores(redis_url, tmp_path)
    for i in range(3):
        run(results, claims, f"h{i}", "report", 180 * MB)
    recent = run(results, claims, "light", "report", 6 * MB)
    rec = recommend(6 * MB, 256, CFG, oom=False, history_peaks=history.with_run(6 * MB, recent))
    assert rec.recommended_mb == 256
    assert rec.based_on_runs == 4
    assert rec.tip == "✅ Memory setting (256MB) fits the peak (180MB) (based on the last 4 runs)"


def test_a_task_that_never_ran_records_no_peak(redis_url: str, tmp_path: Path) -> None:
    _, results, claims = stores(redis_url, tmp_path)
    assert claims.acquire("f1", "broken", "python").claim is not None
    assert results.publish(Result("f1", "broken", "python", "FAILED", error_type="CODE_NOT_FOUND"))
    assert not redis.Redis.from_url(redis_url).exists("autotuner:peaks:broken:python")


def test_a_re_published_result_records_no_peak_again(redis_url: str, tmp_path: Path) -> None:
    _, results, claims = stores(redis_url, tmp_path)
    run(results, claims, "d1", "dup", 5 * MB)
    assert results.publish(ran("d1", "dup", 5 * MB), again=True)  # a duplicate's copy
    assert redis.Redis.from_url(redis_url).llen("autotuner:peaks:dup:python") == 1


def test_a_history_of_one_run_reads_nothing(redis_url: str, tmp_path: Path) -> None:
    cfg = dataclasses.replace(CFG, history_size=1)
    _, results, claims = stores(redis_url, tmp_path, cfg)
    assert [run(results, claims, f"s{i}", "single", i * MB) for i in (1, 2)] == [(), ()]
    assert redis.Redis.from_url(redis_url).lrange("autotuner:peaks:single:python", 0, -1) == [
        str(2 * MB).encode()
    ]


def test_a_result_kept_in_the_outbox_records_its_peak_when_re_sent(
    redis_server: Any, redis_url: str, tmp_path: Path
) -> None:
    history, results, claims = stores(redis_url, tmp_path)
    run(results, claims, "before", "fn", 10 * MB)
    claim = claims.acquire("during", "fn", "python").claim
    assert claim is not None and claim.recent_peaks == (10 * MB,)
    redis_server.stop()
    try:
        assert not results.publish(ran("during", "fn", 20 * MB))  # into the outbox
    finally:
        redis_server.start()
    assert results.flush_outbox() == 1
    # redis restarted empty (no persistence): the re-send recorded the peak it carried
    assert redis.Redis.from_url(redis_url).lrange("autotuner:peaks:fn:python", 0, -1) == [
        str(20 * MB).encode()
    ]
