"""Claims on a real redis-server: one holder per requestId, leases, release, the result first."""

from __future__ import annotations

import time
from pathlib import Path

from worker.claim import ClaimStore
from worker.result import Result
from worker.resultstore import ResultStore


def stores(redis_url: str, tmp_path: Path, lease: float) -> tuple[ResultStore, ClaimStore]:
    results = ResultStore(redis_url, 60, tmp_path / "outbox")
    return results, ClaimStore(results.link, "host-a:1", lease, results.existing)


def test_one_holder_per_request_id_until_released(redis_url: str, tmp_path: Path) -> None:
    _, claims = stores(redis_url, tmp_path, lease=30)
    mine = claims.acquire("r1")
    assert mine.claim is not None and mine.result is None
    other = claims.acquire("r1")
    assert other.claim is None and other.holder == "host-a:1"
    assert 29 < other.expires_in <= 30
    claims.release(mine.claim)
    assert claims.acquire("r1").claim is not None


def test_a_renewed_claim_outlives_its_lease_and_a_dead_owners_lapses(
    redis_url: str, tmp_path: Path
) -> None:
    _, claims = stores(redis_url, tmp_path, lease=0.4)
    renewed, abandoned = claims.acquire("kept").claim, claims.acquire("lapsed").claim
    assert renewed is not None and abandoned is not None
    for _ in range(4):
        time.sleep(0.2)
        claims.extend(renewed)
    assert claims.acquire("kept").claim is None  # still held: renewed past its 0.4 s lease
    assert claims.acquire("lapsed").claim is not None  # its owner stopped renewing


def test_the_stored_result_comes_first_and_its_publish_frees_the_claim(
    redis_url: str, tmp_path: Path
) -> None:
    results, claims = stores(redis_url, tmp_path, lease=30)
    assert claims.acquire("r2").claim is not None
    done = Result("r2", "f", "python", "SUCCESS", stdout="once")
    assert results.publish(done)
    assert not results.link.client().exists("claim:r2")
    again = claims.acquire("r2")
    assert again.result == done and again.claim is None
    assert claims.wait_for_result("r2", timeout=0.1) == done
