"""Hand-backs near the task queue's redrive count are sent again as new messages (redrive.py),
on a Worker built from the stubs: when, with which delay, and what a refused copy leaves."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import pytest

from nanogrid.worker.loop import Worker
from nanogrid.worker.redrive import MAX_DELAY_S, Redrive, copied_attributes
from nanogrid.worker.sqs import Message
from nanogrid.worker.stubs import StubQueue, StubRunner, Stubs

MakeStubs = Callable[..., Stubs]


def capped_message(receives: int) -> Message:
    body = {"requestId": "r1", "functionId": "f", "runtime": "python", "s3Bucket": "b",
            "s3Key": "k"}
    return Message("m1", "rh", json.dumps(body), receives)


def capped(make_stubs: MakeStubs, max_receives: int, **sections: object) -> Stubs:
    stubs = make_stubs(runner=StubRunner(error=AssertionError("must not run")), **sections)
    stubs.queue.max_receives = max_receives
    stubs.claims.at_cap["f"] = 1
    return stubs


@pytest.mark.parametrize(("receives", "resent"), [(1, False), (7, False), (8, True), (10, True)])
def test_a_deferral_two_receives_from_the_redrive_count_is_sent_again(
    receives: int, resent: bool, make_stubs: MakeStubs
) -> None:
    stubs = capped(make_stubs, max_receives=10)
    Worker(stubs.services, 0).handle(capped_message(receives))
    if resent:  # the copy first, then the original deleted; never a visibility change
        assert len(stubs.queue.resent) == 1 and stubs.queue.handed_back == []
        assert stubs.queue.events == ["resend", "delete"] and stubs.queue.deleted == ["m1"]
        assert 1 <= stubs.queue.resent[0][1] <= 30  # the cap's delay, as a DelaySeconds
    else:
        assert stubs.queue.resent == [] and stubs.queue.deleted == []
        assert [m for m, _ in stubs.queue.handed_back] == ["m1"]
    assert stubs.services.counts()["resent"] == (1 if resent else 0)
    assert stubs.claims.runs == {} and stubs.store.published == []  # no try, no result


def test_the_receives_kept_hold_every_try_a_message_may_still_have(
    make_stubs: MakeStubs,
) -> None:
    stubs = capped(make_stubs, max_receives=10,
                   queue={"url": "http://127.0.0.1:1/000000000000/tasks", "max_attempts": 5})
    Worker(stubs.services, 0).handle(capped_message(6))  # 4 receives left: 5 tries need 5
    assert len(stubs.queue.resent) == 1


def test_a_queue_without_a_redrive_policy_never_sends_again(make_stubs: MakeStubs) -> None:
    stubs = capped(make_stubs, max_receives=0)
    Worker(stubs.services, 0).handle(capped_message(500))
    assert stubs.queue.resent == [] and [m for m, _ in stubs.queue.handed_back] == ["m1"]


def test_a_copy_sqs_refused_leaves_the_original_handed_back(make_stubs: MakeStubs) -> None:
    stubs = capped(make_stubs, max_receives=3)
    stubs.queue.resend_down = True
    Worker(stubs.services, 0).handle(capped_message(3))
    assert stubs.queue.deleted == [] and [m for m, _ in stubs.queue.handed_back] == ["m1"]
    assert stubs.services.counts()["resent"] == 0


def test_a_redis_outage_deferral_is_sent_again_too(make_stubs: MakeStubs) -> None:
    stubs = make_stubs()
    stubs.queue.max_receives = 4
    stubs.claims.down = True
    Worker(stubs.services, 0).handle(capped_message(2))
    assert len(stubs.queue.resent) == 1 and stubs.queue.deleted == ["m1"]
    assert 5 <= stubs.queue.resent[0][1] <= 10  # the outage's own delay


def test_a_delay_past_sqs_longest_is_cut_and_the_count_is_read_once(make_stubs: MakeStubs
                                                                    ) -> None:
    queue = StubQueue(make_stubs().config.queue)
    queue.max_receives = 5
    redrive = Redrive(queue, 3)
    assert redrive.near(capped_message(3))
    queue.max_receives = 100  # read again only after REFRESH_S
    assert redrive.near(capped_message(3)) and redrive.limit == 5
    assert redrive.resend(capped_message(3), 43200) and queue.resent[0][1] == MAX_DELAY_S


def test_a_copy_counts_the_receives_before_it_so_the_caps_delay_keeps_growing(
    make_stubs: MakeStubs,
) -> None:
    stubs = capped(make_stubs, max_receives=3)
    first = dataclasses.replace(capped_message(1), sent_at=1000.0)
    Worker(stubs.services, 0).handle(first)
    body, _, attributes = stubs.queue.resent[0]
    assert body == first.body
    assert attributes["nanogridEarlierReceives"]["StringValue"] == "1"
    assert attributes["nanogridFirstSent"]["StringValue"] == "1000000"
    tenth = dataclasses.replace(capped_message(1), earlier_receives=20)  # sent again often
    Worker(stubs.services, 0).handle(tenth)
    assert 21 <= stubs.queue.resent[1][1] <= 39  # 30 s +-30%, as after 21 receives
    assert stubs.queue.resent[1][2]["nanogridEarlierReceives"]["StringValue"] == "21"


def test_a_producers_ten_attributes_are_kept_and_leave_no_room_for_the_agents() -> None:
    theirs = {f"a{n}": {"DataType": "String", "StringValue": str(n), "StringListValues": []}
              for n in range(10)}
    copied = copied_attributes(dataclasses.replace(capped_message(2), attributes=theirs))
    assert copied == {name: {"DataType": "String", "StringValue": value["StringValue"]}
                      for name, value in theirs.items()}
