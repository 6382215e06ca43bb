"""Claims on a real redis-server: one holder per requestId, leases, release, the result first,
tries counted as runs, and claims that hold when Redis loses them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from worker.claim import ClaimLeases, ClaimStore, Renewal
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
        claims.renew([renewed])
    assert claims.acquire("kept").claim is None  # still held: renewed past its 0.4 s lease
    assert claims.acquire("lapsed").claim is not None  # its owner stopped renewing


def test_the_stored_result_comes_first_and_its_publish_frees_the_claim(
    redis_url: str, tmp_path: Path
) -> None:
    results, claims = stores(redis_url, tmp_path, lease=30)
    mine = claims.acquire("r2").claim
    assert mine is not None
    done = Result("r2", "f", "python", "SUCCESS", stdout="once")
    assert results.publish(done, mine.token)
    assert not results.link.client().exists("claim:r2", "runs:r2")
    again = claims.acquire("r2")
    assert again.result == done and again.claim is None
    assert claims.wait_for_result("r2", timeout=0.1) == done


def test_tries_are_counted_as_runs_and_a_try_that_never_ran_is_not_counted(
    redis_url: str, tmp_path: Path
) -> None:
    _, claims = stores(redis_url, tmp_path, lease=30)
    first = claims.acquire("r3").claim
    assert first is not None and first.run == 1
    claims.release(first)  # tried (e.g. its code was missing): counted
    second = claims.acquire("r3").claim
    assert second is not None and second.run == 2
    claims.release(second, count_run=False)  # never got to run (a full disk): not counted
    third = claims.acquire("r3").claim
    assert third is not None and third.run == 2


def test_a_renewal_takes_a_vanished_claim_again_and_names_one_another_worker_took(
    redis_url: str, tmp_path: Path
) -> None:
    results, claims = stores(redis_url, tmp_path, lease=30)
    gone, stolen, kept = (claims.acquire(r).claim for r in ("gone", "stolen", "kept"))
    assert gone is not None and stolen is not None and kept is not None
    client = results.link.client()
    client.delete("claim:gone")  # evicted, or lost in a failover
    client.set("claim:stolen", "other-host:9:abc")  # a copy's worker took it in the gap
    assert claims.renew([gone, stolen, kept]) == {
        gone: Renewal.RETAKEN, stolen: Renewal.LOST, kept: Renewal.KEPT
    }
    assert client.get("claim:gone") == gone.token.encode()
    assert 29_000 < client.pttl("claim:gone") <= 30_000
    assert client.get("claim:stolen") == b"other-host:9:abc"  # left to its holder


def test_a_claim_deleted_mid_run_is_taken_again_before_a_copy_can_run(
    redis_url: str, tmp_path: Path
) -> None:
    results, claims = stores(redis_url, tmp_path, lease=0.6)
    lost: list[str] = []
    keeper = ClaimLeases(claims, lost.append)
    try:
        mine = claims.acquire("mid-run").claim
        assert mine is not None
        keeper.add(mine)
        results.link.client().delete("claim:mid-run")
        time.sleep(0.5)  # one renewal (every 0.2 s) later
        copy = claims.acquire("mid-run")  # a duplicate delivery arrives
    finally:
        keeper.stop()
    assert copy.claim is None and copy.holder == "host-a:1"  # it does not run
    assert len(lost) == 1 and "was gone while it ran" in lost[0]


def test_publish_frees_only_its_own_claim_and_the_first_result_stored_stands(
    redis_url: str, tmp_path: Path, subscriber: Any = None
) -> None:
    results, claims = stores(redis_url, tmp_path, lease=30)
    mine = claims.acquire("twice").claim
    assert mine is not None
    client = results.link.client()
    client.set("claim:twice", "other-host:9:abc")  # taken over by a copy meanwhile
    theirs = Result("twice", "f", "python", "SUCCESS", stdout="the copy's run")
    assert results.publish(theirs)  # the copy finished first
    ours = Result("twice", "f", "python", "SUCCESS", stdout="our run")
    assert results.publish(ours, mine.token)
    assert results.existing("twice") == theirs  # not stored over
    assert client.get("claim:twice") == b"other-host:9:abc"  # not ours: not deleted


def test_two_hundred_claims_renew_in_one_round_trip(redis_url: str, tmp_path: Path) -> None:
    results, claims = stores(redis_url, tmp_path, lease=5)
    held = [claims.acquire(f"many-{n}").claim for n in range(200)]
    assert all(held)
    client = results.link.client()
    before = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    found = claims.renew([c for c in held if c is not None])
    after = client.info("commandstats")["cmdstat_evalsha"]["calls"]
    assert set(found.values()) == {Renewal.KEPT} and len(found) == 200
    assert after - before == 1
