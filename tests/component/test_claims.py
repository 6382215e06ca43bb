"""Claims on a real redis-server: one holder per requestId, leases, release, the result first,
tries counted as runs, and claims that hold when Redis loses them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from nanogrid.worker.claim import ClaimLeases, ClaimStore, Renewal
from nanogrid.worker.result import Result
from nanogrid.worker.resultstore import ResultStore


def stores(
    redis_url: str, tmp_path: Path, lease: float, default_cap: int | None = None
) -> tuple[ResultStore, ClaimStore]:
    results = ResultStore(redis_url, 60, tmp_path / "outbox")
    return results, ClaimStore(results.link, "host-a:1", lease, results.existing,
                               default_cap=default_cap)


def test_one_holder_per_request_id_until_released(redis_url: str, tmp_path: Path) -> None:
    _, claims = stores(redis_url, tmp_path, lease=30)
    mine = claims.acquire("r1", "f")
    assert mine.claim is not None and mine.result is None
    other = claims.acquire("r1", "f")
    assert other.claim is None and other.holder == "host-a:1"
    assert 29 < other.expires_in <= 30
    claims.release(mine.claim)
    assert claims.acquire("r1", "f").claim is not None


def test_a_renewed_claim_outlives_its_lease_and_a_dead_owners_lapses(
    redis_url: str, tmp_path: Path
) -> None:
    _, claims = stores(redis_url, tmp_path, lease=0.4)
    renewed, abandoned = claims.acquire("kept", "f").claim, claims.acquire("lapsed", "f").claim
    assert renewed is not None and abandoned is not None
    for _ in range(4):
        time.sleep(0.2)
        claims.renew([renewed])
    assert claims.acquire("kept", "f").claim is None  # still held: renewed past its 0.4 s lease
    assert claims.acquire("lapsed", "f").claim is not None  # its owner stopped renewing


def test_the_stored_result_comes_first_and_its_publish_frees_the_claim(
    redis_url: str, tmp_path: Path
) -> None:
    results, claims = stores(redis_url, tmp_path, lease=30)
    mine = claims.acquire("r2", "f").claim
    assert mine is not None
    done = Result("r2", "f", "python", "SUCCESS", stdout="once")
    assert results.publish(done, mine.token)
    assert not results.link.client().exists("claim:r2", "runs:r2")
    again = claims.acquire("r2", "f")
    assert again.result == done and again.claim is None
    assert claims.wait_for_result("r2", timeout=0.1) == done


def test_tries_are_counted_as_runs_and_a_try_that_never_ran_is_not_counted(
    redis_url: str, tmp_path: Path
) -> None:
    _, claims = stores(redis_url, tmp_path, lease=30)
    first = claims.acquire("r3", "f").claim
    assert first is not None and first.run == 1
    claims.release(first)  # tried (e.g. its code was missing): counted
    second = claims.acquire("r3", "f").claim
    assert second is not None and second.run == 2
    claims.release(second, count_run=False)  # never got to run (a full disk): not counted
    third = claims.acquire("r3", "f").claim
    assert third is not None and third.run == 2


def test_a_renewal_takes_a_vanished_claim_again_and_names_one_another_worker_took(
    redis_url: str, tmp_path: Path
) -> None:
    results, claims = stores(redis_url, tmp_path, lease=30)
    gone, stolen, kept = (claims.acquire(r, "f").claim for r in ("gone", "stolen", "kept"))
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
        mine = claims.acquire("mid-run", "f").claim
        assert mine is not None
        keeper.add(mine)
        results.link.client().delete("claim:mid-run")
        time.sleep(0.5)  # one renewal (every 0.2 s) later
        copy = claims.acquire("mid-run", "f")  # a duplicate delivery arrives
    finally:
        keeper.stop()
    assert copy.claim is None and copy.holder == "host-a:1"  # it does not run
    assert len(lost) == 1 and "was gone while it ran" in lost[0]


def test_publish_frees_only_its_own_claim_and_the_first_result_stored_stands(
    redis_url: str, tmp_path: Path, subscriber: Any = None
) -> None:
    results, claims = stores(redis_url, tmp_path, lease=30)
    mine = claims.acquire("twice", "f").claim
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
    held = [claims.acquire(f"many-{n}", "f").claim for n in range(200)]
    assert all(held)
    client = results.link.client()
    before = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    found = claims.renew([c for c in held if c is not None])
    after = client.info("commandstats")["cmdstat_evalsha"]["calls"]
    assert set(found.values()) == {Renewal.KEPT} and len(found) == 200
    assert after - before == 1


def test_a_function_at_its_cap_gets_no_claim_until_a_run_frees_its_slot(
    redis_url: str, tmp_path: Path
) -> None:
    results, claims = stores(redis_url, tmp_path, lease=30)
    client = results.link.client()
    client.hset("nanogrid:concurrency", "capped", 2)
    one, two = (claims.acquire(f"c{n}", "capped") for n in (1, 2))
    assert one.claim is not None and two.claim is not None
    assert (two.cap, two.running) == (2, 2)
    third = claims.acquire("c3", "capped")
    assert third.claim is None and third.holder is None and (third.cap, third.running) == (2, 2)
    assert not client.exists("claim:c3", "runs:c3")  # untried: no claim, no try counted
    assert claims.acquire("other", "uncapped").claim is not None  # other functions flow
    results.publish(Result("c1", "capped", "python", "SUCCESS"), one.claim.token)  # done
    assert claims.acquire("c3", "capped").claim is not None
    assert claims.acquire("c4", "capped").claim is None
    claims.release(two.claim)  # kept for a retry: its slot is free too
    assert claims.acquire("c4", "capped").claim is not None


def test_a_dead_runs_slot_lapses_with_its_lease_and_a_renewed_one_does_not(
    redis_url: str, tmp_path: Path
) -> None:
    results, claims = stores(redis_url, tmp_path, lease=0.4, default_cap=2)  # no hash entry
    kept = claims.acquire("alive", "f").claim
    assert kept is not None and claims.acquire("dead", "f").claim is not None
    assert claims.acquire("waits", "f").claim is None  # the default cap holds
    for _ in range(3):
        time.sleep(0.2)
        claims.renew([kept])
    one_slot = claims.acquire("waits", "f")  # the dead run's slot lapsed, the live one's did not
    assert one_slot.claim is not None and one_slot.running == 2
    assert claims.acquire("more", "f").claim is None
    results.link.client().hset("nanogrid:concurrency", "f", 3)  # an entry overrides the default
    assert claims.acquire("more", "f").claim is not None


def test_a_cap_of_zero_holds_every_call_and_a_duplicate_is_still_a_duplicate(
    redis_url: str, tmp_path: Path
) -> None:
    results, claims = stores(redis_url, tmp_path, lease=30)
    running = claims.acquire("dup", "f").claim
    assert running is not None
    results.link.client().hset("nanogrid:concurrency", "f", 0)
    stopped = claims.acquire("new", "f")
    assert stopped.claim is None and stopped.holder is None and stopped.cap == 0
    copy = claims.acquire("dup", "f")  # the held claim answers first: the copy waits for it
    assert copy.holder == "host-a:1"


def test_a_lapsed_run_renewed_is_counted_once_and_may_exceed_the_cap_by_one(
    redis_url: str, tmp_path: Path
) -> None:
    results, claims = stores(redis_url, tmp_path, lease=0.3)
    client = results.link.client()
    client.hset("nanogrid:concurrency", "fenced", 1)
    late = claims.acquire("late", "fenced").claim  # its holder stalls past its lease
    assert late is not None and late.slots == "nanogrid:running:fenced"
    time.sleep(0.4)
    replacement = claims.acquire("next", "fenced")  # the lapsed slot is taken by another run
    assert replacement.claim is not None and replacement.running == 1
    for n in range(3):  # the stalled run is alive after all: renewed, again and again
        assert claims.renew([late]) == {late: Renewal.RETAKEN if n == 0 else Renewal.KEPT}
        assert client.zcard(late.slots) == 2  # one over the cap while both run, never more
    assert client.zscore(late.slots, late.token) is not None
    assert claims.acquire("third", "fenced").claim is None  # nothing more starts meanwhile
    results.publish(Result("late", "fenced", "python", "SUCCESS"), late.token)
    assert client.zrange(late.slots, 0, -1) == [replacement.claim.token.encode()]
    assert claims.acquire("third", "fenced").claim is None  # back at the cap of 1
