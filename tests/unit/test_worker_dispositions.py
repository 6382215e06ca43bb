"""A message's run: its decision per case of the DESIGN's SQS table, on a Worker built from
the stubs the worker package ships (nanogrid/worker/stubs.py).

The same cases run end to end against the real peers in tests/component/test_worker_pipeline.py;
these pin down the decisions that are awkward to provoke there (an agent bug, an outbox that
cannot be written, a dead-letter queue that is down).
"""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from typing import Any

import pytest

from nanogrid.common.errors import CodeNotFound
from nanogrid.runners.base import Invocation, RunOutcome, Sandbox
from nanogrid.worker.autotuner import Recommendation
from nanogrid.worker.inflight import Inflight
from nanogrid.worker.loop import Worker
from nanogrid.worker.result import Result
from nanogrid.worker.sqs import Message
from nanogrid.worker.stubs import StubCodes, StubRunner, Stubs

MakeStubs = Callable[..., Stubs]
"""The unit tier's ``make_stubs`` fixture (conftest.py)."""


def handle(stubs: Stubs, body: Message) -> None:
    Worker(stubs.services, 0).handle(body)


def message(**changes: Any) -> Message:
    body = {
        "requestId": "r1",
        "functionId": "f",
        "runtime": "python",
        "s3Bucket": "b",
        "s3Key": "k",
        **changes,
    }
    return Message("m1", "rh", json.dumps(body), 1)


def test_ran_is_published_and_deleted(
    make_stubs: MakeStubs, monkeypatch: pytest.MonkeyPatch
) -> None:
    stubs = make_stubs()
    tip = Recommendation(32, "tip", 1, "RIGHT_SIZED", {})
    monkeypatch.setattr("nanogrid.worker.autotuner.recommend", lambda *a, **k: tip)
    handle(stubs, message())
    assert [r["status"] for r in stubs.store.published] == ["SUCCESS"]
    assert stubs.store.peaks_recorded == [True]
    assert stubs.queue.deleted == ["m1"] and stubs.metrics.records == 1


@pytest.mark.parametrize(("attempt", "kept"), [(1, True), (2, True), (3, False)])
def test_missing_code_is_kept_until_max_attempts(
    attempt: int, kept: bool, make_stubs: MakeStubs
) -> None:
    stubs = make_stubs(codes=StubCodes(CodeNotFound("code s3://b/k not found")))
    stubs.claims.runs["r1"] = attempt - 1
    handle(stubs, message())
    assert (stubs.queue.deleted == []) is kept
    assert (stubs.store.published == []) is kept
    assert (stubs.queue.dead == []) is kept
    if not kept:
        assert stubs.store.published[0]["errorType"] == "CODE_NOT_FOUND"


def test_an_agent_bug_fails_the_task_instead_of_crash_looping(make_stubs: MakeStubs) -> None:
    runner = StubRunner(error=RuntimeError("boom"))
    stubs = make_stubs(runner=runner)
    handle(stubs, message())
    result = stubs.store.published[0]
    assert (result["status"], result["errorType"]) == ("FAILED", "INTERNAL")
    assert "RuntimeError: boom" in result["errorMessage"]
    assert stubs.queue.deleted == ["m1"] and runner.released == 1


def test_result_that_cannot_be_kept_leaves_the_message_on_the_queue(make_stubs: MakeStubs) -> None:
    stubs = make_stubs()
    stubs.store.broken = True
    handle(stubs, message(runtime="cobol"))
    assert stubs.queue.deleted == []


def test_a_run_whose_result_cannot_be_kept_leaves_the_running_list(make_stubs: MakeStubs) -> None:
    stubs = make_stubs()
    stubs.store.broken = True
    handle(stubs, message())
    assert stubs.queue.deleted == [] and stubs.status.running == set()


@pytest.mark.parametrize(
    ("codes", "changes"),
    [(None, {"runtime": "cobol"}), (StubCodes(CodeNotFound("gone")), {})],
)
def test_a_refused_dead_letter_copy_is_counted_and_does_not_keep_the_message(
    make_stubs: MakeStubs, codes: StubCodes | None, changes: dict
) -> None:
    stubs = make_stubs(codes=codes)
    stubs.queue.dead_letter_down = True
    stubs.claims.runs["r1"] = 2
    handle(stubs, message(**changes))
    assert stubs.queue.events == ["publish", "delete"]  # the result is out all the same
    assert [kind for kind, _ in stubs.status.faults] == ["dead_letter_copy"]


def test_results_come_before_dead_letters(make_stubs: MakeStubs) -> None:
    stubs = make_stubs()
    handle(stubs, message(runtime="cobol"))
    assert stubs.queue.events == ["publish", "dead-letter", "delete"]


def test_duplicate_is_republished_not_run(make_stubs: MakeStubs) -> None:
    runner = StubRunner(error=AssertionError("must not run"))
    stubs = make_stubs(runner=runner)
    stored = Result("r1", "f", "python", "SUCCESS", stdout="first run").to_dict()
    stubs.claims.stored["r1"] = stored
    handle(stubs, message())
    assert stubs.store.published == [stored]
    assert stubs.store.peaks_recorded == [False]  # its run recorded its peak already
    assert stubs.queue.deleted == ["m1"] and runner.released == 0


def test_a_copy_whose_twin_runs_elsewhere_republishes_the_twins_result(
    make_stubs: MakeStubs
) -> None:
    stubs = make_stubs(runner=StubRunner(error=AssertionError("must not run")))
    stubs.claims.held_by["r1"] = "other-host:7"
    stored = Result("r1", "f", "python", "SUCCESS", stdout="the twin's run").to_dict()
    stubs.claims.appears_while_waiting["r1"] = stored
    handle(stubs, message())
    assert stubs.store.published == [stored] and stubs.queue.deleted == ["m1"]


def test_a_copy_whose_twin_still_runs_is_handed_back_until_the_claim_lapses(
    make_stubs: MakeStubs
) -> None:
    stubs = make_stubs(runner=StubRunner(error=AssertionError("must not run")))
    stubs.claims.held_by["r1"] = "other-host:7"
    stubs.claims.runs["r1"] = 9  # tries beyond the limit: the twin still runs it
    handle(stubs, message())
    assert stubs.queue.handed_back == [("m1", 4)]  # ceil(2.5 s left) + 1
    assert stubs.store.published == [] and stubs.queue.deleted == []


def test_redis_down_hands_the_message_back_with_a_delay_instead_of_running_it(
    make_stubs: MakeStubs
) -> None:
    stubs = make_stubs(runner=StubRunner(error=AssertionError("must not run")))
    stubs.claims.down = True
    handle(stubs, message())
    ((handed, delay),) = stubs.queue.handed_back
    assert handed == "m1" and 5 <= delay <= 10  # never straight back (no hot loop)
    assert stubs.queue.released == [] and stubs.store.published == []


def test_a_message_back_too_often_gives_up_failed_internal_and_is_dead_lettered(
    make_stubs: MakeStubs
) -> None:
    stubs = make_stubs(runner=StubRunner(error=AssertionError("must not run")))
    stubs.claims.runs["r1"] = 3
    handle(stubs, message())
    (result,) = stubs.store.published
    assert (result["status"], result["errorType"], result["attempt"]) == ("FAILED", "INTERNAL", 4)
    assert result["errorMessage"].startswith("gave up: tried 3 times already")
    assert stubs.queue.events == ["publish", "dead-letter", "delete"]


def test_a_claim_is_held_while_running_and_released_when_the_message_is_kept(
    make_stubs: MakeStubs
) -> None:
    stubs = make_stubs(codes=StubCodes(CodeNotFound("gone")))
    handle(stubs, message())
    assert stubs.claims.released == ["r1"]  # the retry may run at once
    assert len(stubs.services.claim_leases) == 0 and len(stubs.services.visibility) == 0


def test_a_host_fault_keeps_the_message_for_another_try(make_stubs: MakeStubs) -> None:
    runner = StubRunner(error=OSError(errno.EIO, "disk trouble", "/var/cache/x"))
    stubs = make_stubs(runner=runner)
    handle(stubs, message())
    assert stubs.queue.events == [] and stubs.claims.released == ["r1"]
    assert stubs.claims.runs["r1"] == 1  # a try
    (kind, text), = stubs.status.faults
    assert kind == "host" and "/var/cache/x" in text


def test_a_full_disk_hands_the_message_back_untried_and_stops_new_work(
    make_stubs: MakeStubs
) -> None:
    runner = StubRunner(error=OSError(errno.ENOSPC, "No space left on device", "/var/cache/x"))
    stubs = make_stubs(runner=runner)
    stubs.claims.runs["r1"] = 2  # even on what would be its last try
    handle(stubs, message())
    assert stubs.queue.events == [] and stubs.claims.released == ["r1"]
    assert stubs.claims.runs["r1"] == 2  # not counted
    ((handed, delay),) = stubs.queue.handed_back
    assert handed == "m1" and 5 <= delay <= 10
    assert stubs.services.disk._suspect is not None  # no new work until a probe write works


def test_a_host_fault_on_the_last_attempt_ends_failed_internal(make_stubs: MakeStubs) -> None:
    stubs = make_stubs(runner=StubRunner(error=OSError(errno.EIO, "I/O error", "/w")))
    stubs.claims.runs["r1"] = 2
    handle(stubs, message())
    assert stubs.store.published[0]["errorType"] == "INTERNAL"
    assert stubs.queue.events == ["publish", "dead-letter", "delete"]


def test_a_bug_outside_the_run_ends_its_message_not_the_worker(
    make_stubs: MakeStubs, monkeypatch: pytest.MonkeyPatch
) -> None:
    stubs = make_stubs()

    def broken(*args: Any) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(stubs.claims, "acquire", broken)
    handle(stubs, message())
    (result,) = stubs.store.published
    assert (result["requestId"], result["errorType"]) == ("r1", "INTERNAL")
    assert "KeyError" in result["errorMessage"]
    assert stubs.queue.events == ["publish", "dead-letter", "delete"]
    assert [kind for kind, _ in stubs.status.faults] == ["unexpected"]


def test_a_bug_on_a_body_without_request_id_is_dead_lettered(
    make_stubs: MakeStubs, monkeypatch: pytest.MonkeyPatch
) -> None:
    stubs = make_stubs()
    monkeypatch.setattr("nanogrid.worker.task.parse", lambda *a: 1 / 0)
    handle(stubs, Message("m9", "rh", "not even json", 1))
    assert stubs.queue.events == ["dead-letter", "delete"] and stubs.store.published == []


def test_messages_received_after_sigterm_are_released_not_run(make_stubs: MakeStubs) -> None:
    runner = StubRunner(error=AssertionError("must not run"))
    stubs = make_stubs(runner=runner)
    worker = Worker(stubs.services, 0)
    worker.stop.requested = True  # SIGTERM arrived while the long poll was returning
    worker.dispatch([message(), Message("m2", "rh2", "{}", 1)])
    assert stubs.queue.released == ["m1", "m2"]
    assert stubs.queue.deleted == [] and stubs.store.published == []


@pytest.mark.parametrize(
    ("name", "attempt", "expected"),
    [
        ("InvalidMessage", 1, "dead-letter"),
        ("RuntimeNotSupported", 1, "dead-letter"),
        ("CodeNotFound", 2, "retry"),
        ("CodeNotFound", 3, "dead-letter"),
        ("HostFault", 1, "retry"),
        ("HostFault", 3, "dead-letter"),
        ("DiskFull", 3, "defer"),
        ("InvalidCodePackage", 1, "fail"),
        ("SandboxError", 1, "fail"),
        ("GaveUp", 4, "dead-letter"),
        ("UnexpectedError", 1, "dead-letter"),
    ],
)
def test_the_disposition_follows_the_error_class(name: str, attempt: int, expected: str) -> None:
    from nanogrid.common import errors
    from nanogrid.worker.dispositions import decide

    assert decide(getattr(errors, name)("x"), attempt, 3).value == expected


def test_os_errors_of_the_host_become_host_faults_and_others_bugs() -> None:
    from nanogrid.common.errors import DiskFull, HostFault, UnexpectedError, as_task_error

    full = as_task_error(OSError(errno.ENOSPC, "No space left on device", "/cache/x.zip"))
    assert isinstance(full, DiskFull) and "/cache/x.zip: No space left on device" in str(full)
    assert type(as_task_error(OSError(errno.EIO, "I/O error", "/w"))) is HostFault
    assert isinstance(as_task_error(OSError(errno.EACCES, "denied")), UnexpectedError)


def test_a_function_at_its_cap_goes_back_untried_with_a_delay(make_stubs: MakeStubs) -> None:
    stubs = make_stubs(runner=StubRunner(error=AssertionError("must not run")))
    stubs.claims.at_cap["f"] = 3
    handle(stubs, message())
    handle(stubs, message(requestId="r2"))  # a moment later: no Redis round trip of its own
    assert [m for m, _ in stubs.queue.handed_back] == ["m1", "m1"]
    assert all(1 <= delay <= 2 for _, delay in stubs.queue.handed_back)  # first receives
    assert stubs.claims.runs == {} and stubs.store.published == []  # no try, no result
    assert stubs.status.deferrals == ["f", "f"] and stubs.queue.dead == []


class _Outcome(StubRunner):
    """Every run ends as given (a timeout, a kill, an exit)."""

    def __init__(self, **changes: Any) -> None:
        super().__init__()
        self.changes = changes

    def run(self, sandbox: Any, invocation: Any) -> RunOutcome:
        values = dict(exit_code=0, timed_out=False, oom_killed=False, stdout=b"", stderr=b"",
                      stdout_truncated=False, stderr_truncated=False, duration_ms=5.0,
                      peak_memory_bytes=6 * 2**20, peak_source="stub")
        return RunOutcome(**{**values, **self.changes})


@pytest.mark.parametrize(("changes", "code"), [
    ({}, "OVER_PROVISIONED"),
    ({"exit_code": 1}, "OVER_PROVISIONED"),  # it finished: its peak counts
    ({"exit_code": -9, "timed_out": True}, "UNFINISHED_RUN"),
    ({"exit_code": -9}, "UNFINISHED_RUN"),  # killed by a signal
])
def test_no_cut_memory_tip_after_a_run_that_did_not_finish(
    make_stubs: MakeStubs, changes: dict, code: str
) -> None:
    stubs = make_stubs(runner=_Outcome(**changes))
    handle(stubs, message(memoryMb=256))
    (published,) = stubs.store.published
    assert published["tipCode"] == code
    assert published["tipParams"]["currentMb"] == 256 and published["tipParams"]["peakMb"] == 6
    if code == "UNFINISHED_RUN":
        assert published["recommendedMemoryMb"] == 256 and "cut" not in published["optimizationTip"]
    else:
        assert published["recommendedMemoryMb"] == 32


def test_a_run_tells_the_loop_it_is_ready_once_its_function_runs(
    make_stubs: MakeStubs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not once its code is fetched: the loop's next receive (a millisecond of boto3 holding
    the interpreter) would then share it with the sandbox's take and the unpacking."""
    events: list[str] = []

    class Recording(StubRunner):
        def acquire(self, runtime: str, code_key: str) -> Sandbox:
            events.append("acquire")
            return super().acquire(runtime, code_key)

        def run(self, sandbox: Sandbox, invocation: Invocation) -> RunOutcome:
            events.append("run")
            return super().run(sandbox, invocation)

    stubs = make_stubs(runner=Recording())
    monkeypatch.setattr(Inflight, "ready", lambda self: events.append("ready"))
    handle(stubs, message())
    assert events == ["acquire", "ready", "run"]
    assert [r["status"] for r in stubs.store.published] == ["SUCCESS"]
