"""Worker.handle's decision per case of the DESIGN's SQS table, with small fakes for the peers.

The same cases run end to end against the real peers in tests/component/test_worker_pipeline.py;
these pin down the decisions that are awkward to provoke there (an agent bug, an outbox that
cannot be written, a dead-letter queue that is down).
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

from common.config import from_dict
from common.errors import CodeNotFound, QueueUnavailable, ResultStoreUnavailable
from runners.base import RunOutcome, Sandbox
from worker.autotuner import PeakHistory, Recommendation
from worker.claim import Acquired, Claim
from worker.diskspace import DiskGuard
from worker.endings import Endings
from worker.faults import FaultBoard
from worker.inflight import Inflight
from worker.ledger import Ledger
from worker.loop import Worker
from worker.result import Result
from worker.sqs import Message


class FakeQueue:
    def __init__(self) -> None:
        self.deleted: list[str] = []
        self.dead: list[str] = []
        self.events: list[str] = []
        self.released: list[str] = []
        self.handed_back: list[tuple[str, int]] = []
        self.dlq_down = False

    def delete(self, m: Message) -> None:
        self.deleted.append(m.message_id)
        self.events.append("delete")

    def extend(self, m: Message, seconds: int) -> None:
        self.handed_back.append((m.message_id, seconds))
        if seconds == 0:
            self.released.append(m.message_id)

    def dead_letter(self, m: Message, reason: str) -> bool:
        if self.dlq_down:
            raise QueueUnavailable("dlq down")
        self.dead.append(reason)
        self.events.append("dead-letter")
        return True


class FakeStore:
    def __init__(self, queue: FakeQueue) -> None:
        self.published: list[dict] = []
        self.peaks_recorded: list[bool] = []
        self.broken = False
        self._events = queue.events

    def publish(self, result: Result, token: str | None = None, again: bool = False) -> bool:
        if self.broken:
            raise ResultStoreUnavailable("no redis, no outbox")
        self.published.append(result.to_dict())
        self.peaks_recorded.append(not again)
        self._events.append("publish")
        return True


class FakeClaims:
    """Redis claims: results stored by requestId, claims held by others, or Redis down; the
    tries of each requestId counted."""

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}
        self.stored: dict[str, dict] = {}
        self.held_by: dict[str, str] = {}
        self.appears_while_waiting: dict[str, dict] = {}
        self.down = False
        self.released: list[str] = []

    def acquire(self, request_id: str, function_id: str | None = None) -> Acquired:
        if self.down:
            raise ResultStoreUnavailable("claim r1: Connection refused")
        if request_id in self.stored:
            return Acquired(result=Result.from_dict(self.stored[request_id]))
        if request_id in self.held_by:
            return Acquired(holder=self.held_by[request_id], expires_in=2.5)
        self.runs[request_id] = self.runs.get(request_id, 0) + 1
        return Acquired(claim=Claim(request_id, "token", self.runs[request_id]))

    def wait_for_result(self, request_id: str, timeout: float) -> Result | None:
        stored = self.appears_while_waiting.get(request_id)
        return None if stored is None else Result.from_dict(stored)

    def release(self, claim: Claim, *, count_run: bool = True) -> None:
        self.released.append(claim.request_id)
        if not count_run:
            self.runs[claim.request_id] -= 1


class FakeLeases:
    def __init__(self) -> None:
        self.held: set[Any] = set()

    def add(self, item: Any) -> None:
        self.held.add(item)

    def discard(self, item: Any) -> None:
        self.held.discard(item)


class FakeStatus:
    def __init__(self) -> None:
        self.faults: list[tuple[str, str]] = []
        self.running: set[str] = set()

    def fault(self, kind: str, message: str) -> None:
        self.faults.append((kind, message))

    def heartbeat(self, degraded: list[str] | None = None) -> None:
        pass

    def task_started(self, request_id: str) -> None:
        self.running.add(request_id)

    def task_finished(self, result: Result) -> None:
        self.running.discard(str(result.request_id))

    def task_ended(self, request_id: str) -> None:
        self.running.discard(request_id)


class FakeCodes:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def fetch(self, bucket: str, key: str) -> Any:
        if self.error:
            raise self.error
        return type("Pkg", (), {"version_key": "v", "zip_path": Path("/nonexistent")})()


class FakeRunner:
    name, marker = "fake", "[FAKE]"

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.released = 0

    def acquire(self, runtime: str, code_key: str) -> Sandbox:
        return Sandbox(runtime=runtime, name="s", code_dir=Path("/nonexistent"), code_key="v")

    def run(self, sandbox: Sandbox, invocation: Any) -> RunOutcome:
        if self.error:
            raise self.error
        return RunOutcome(0, False, False, b"ok", b"", False, False, 1.0, 2**20, "fake")

    def release(self, sandbox: Sandbox) -> None:
        self.released += 1

    def pool_stats(self) -> dict:
        return {}


class FakeMetrics:
    def __init__(self) -> None:
        self.records = 0

    def record(self, *args: Any, **kwargs: Any) -> None:
        self.records += 1


class Fakes(Worker):
    """A Worker wired to the fakes instead of booted (its fakes typed for the tests)."""

    queue: FakeQueue
    store: FakeStore
    claims: FakeClaims
    metrics: FakeMetrics
    fake_status: FakeStatus


def make_worker(codes: FakeCodes | None = None, runner: FakeRunner | None = None) -> Fakes:
    worker = Fakes(from_dict({"queue": {"max_attempts": 3, "visibility_timeout_seconds": 4}}), 0)
    worker.fake_status = FakeStatus()
    worker.faults = FaultBoard(worker.fake_status)  # type: ignore[arg-type]
    worker.queue = FakeQueue()
    worker.store = FakeStore(worker.queue)
    worker.claims = FakeClaims()
    worker.claim_leases = FakeLeases()  # type: ignore[assignment]
    worker.visibility = FakeLeases()  # type: ignore[assignment]
    worker.codes = codes or FakeCodes()  # type: ignore[assignment]
    worker.runner = runner or FakeRunner()  # type: ignore[assignment]
    worker.history = PeakHistory(worker.config.autotuner)
    worker.disk = DiskGuard([], 0)
    worker.metrics = FakeMetrics()
    worker.inflight = Inflight(
        Ledger(1024, 8), 0, worker.handle, lambda m: 128, typical_mb=128, smallest_mb=128
    )
    worker.endings = Endings(
        worker.config, "host:1", worker.queue, worker.store,  # type: ignore[arg-type]
        worker.queue, worker.metrics, worker.faults,  # type: ignore[arg-type]
    )
    return worker


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


def test_ran_is_published_and_deleted(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = make_worker()
    monkeypatch.setattr(
        "worker.autotuner.recommend", lambda *a, **k: Recommendation(32, "tip", 1)
    )
    worker.handle(message())
    assert [r["status"] for r in worker.store.published] == ["SUCCESS"]
    assert worker.store.peaks_recorded == [True]
    assert worker.queue.deleted == ["m1"] and worker.metrics.records == 1


@pytest.mark.parametrize(("attempt", "kept"), [(1, True), (2, True), (3, False)])
def test_missing_code_is_kept_until_max_attempts(attempt: int, kept: bool) -> None:
    worker = make_worker(codes=FakeCodes(CodeNotFound("code s3://b/k not found")))
    worker.claims.runs["r1"] = attempt - 1
    worker.handle(message())
    assert (worker.queue.deleted == []) is kept
    assert (worker.store.published == []) is kept
    assert (worker.queue.dead == []) is kept
    if not kept:
        assert worker.store.published[0]["errorType"] == "CODE_NOT_FOUND"


def test_an_agent_bug_fails_the_task_instead_of_crash_looping() -> None:
    runner = FakeRunner(error=RuntimeError("boom"))
    worker = make_worker(runner=runner)
    worker.handle(message())
    result = worker.store.published[0]
    assert (result["status"], result["errorType"]) == ("FAILED", "INTERNAL")
    assert "RuntimeError: boom" in result["errorMessage"]
    assert worker.queue.deleted == ["m1"] and runner.released == 1


def test_result_that_cannot_be_kept_leaves_the_message_on_the_queue() -> None:
    worker = make_worker()
    worker.store.broken = True
    worker.handle(message(runtime="cobol"))
    assert worker.queue.deleted == []


def test_a_run_whose_result_cannot_be_kept_leaves_the_running_list() -> None:
    worker = make_worker()
    worker.status = worker.fake_status  # type: ignore[assignment]
    worker.store.broken = True
    worker.handle(message())
    assert worker.queue.deleted == [] and worker.fake_status.running == set()


@pytest.mark.parametrize(
    ("codes", "changes"),
    [(None, {"runtime": "cobol"}), (FakeCodes(CodeNotFound("gone")), {})],
)
def test_a_refused_dead_letter_copy_is_counted_and_does_not_keep_the_message(
    codes: FakeCodes | None, changes: dict
) -> None:
    worker = make_worker(codes=codes)
    worker.queue.dlq_down = True
    worker.claims.runs["r1"] = 2
    worker.handle(message(**changes))
    assert worker.queue.events == ["publish", "delete"]  # the result is out all the same
    assert [kind for kind, _ in worker.fake_status.faults] == ["dead_letter_copy"]


def test_results_come_before_dead_letters() -> None:
    worker = make_worker()
    worker.handle(message(runtime="cobol"))
    assert worker.queue.events == ["publish", "dead-letter", "delete"]


def test_duplicate_is_republished_not_run() -> None:
    runner = FakeRunner(error=AssertionError("must not run"))
    worker = make_worker(runner=runner)
    stored = Result("r1", "f", "python", "SUCCESS", stdout="first run").to_dict()
    worker.claims.stored["r1"] = stored
    worker.handle(message())
    assert worker.store.published == [stored]
    assert worker.store.peaks_recorded == [False]  # its run recorded its peak already
    assert worker.queue.deleted == ["m1"] and runner.released == 0


def test_a_copy_whose_twin_runs_elsewhere_republishes_the_twins_result() -> None:
    worker = make_worker(runner=FakeRunner(error=AssertionError("must not run")))
    worker.claims.held_by["r1"] = "other-host:7"
    stored = Result("r1", "f", "python", "SUCCESS", stdout="the twin's run").to_dict()
    worker.claims.appears_while_waiting["r1"] = stored
    worker.handle(message())
    assert worker.store.published == [stored] and worker.queue.deleted == ["m1"]


def test_a_copy_whose_twin_still_runs_is_handed_back_until_the_claim_lapses() -> None:
    worker = make_worker(runner=FakeRunner(error=AssertionError("must not run")))
    worker.claims.held_by["r1"] = "other-host:7"
    worker.claims.runs["r1"] = 9  # tries beyond the limit: the twin still runs it
    worker.handle(message())
    assert worker.queue.handed_back == [("m1", 4)]  # ceil(2.5 s left) + 1
    assert worker.store.published == [] and worker.queue.deleted == []


def test_redis_down_hands_the_message_back_with_a_delay_instead_of_running_it() -> None:
    worker = make_worker(runner=FakeRunner(error=AssertionError("must not run")))
    worker.claims.down = True
    worker.handle(message())
    ((handed, delay),) = worker.queue.handed_back
    assert handed == "m1" and 5 <= delay <= 10  # never straight back (no hot loop)
    assert worker.queue.released == [] and worker.store.published == []


def test_a_message_back_too_often_gives_up_failed_internal_and_is_dead_lettered() -> None:
    worker = make_worker(runner=FakeRunner(error=AssertionError("must not run")))
    worker.claims.runs["r1"] = 3
    worker.handle(message())
    (result,) = worker.store.published
    assert (result["status"], result["errorType"], result["attempt"]) == ("FAILED", "INTERNAL", 4)
    assert result["errorMessage"].startswith("gave up: tried 3 times already")
    assert worker.queue.events == ["publish", "dead-letter", "delete"]


def test_a_claim_is_held_while_running_and_released_when_the_message_is_kept() -> None:
    worker = make_worker(codes=FakeCodes(CodeNotFound("gone")))
    worker.handle(message())
    assert worker.claims.released == ["r1"]  # the retry may run at once
    assert not worker.claim_leases.held and not worker.visibility.held  # type: ignore[attr-defined]


def test_a_host_fault_keeps_the_message_for_another_try() -> None:
    runner = FakeRunner(error=OSError(errno.EIO, "disk trouble", "/var/cache/x"))
    worker = make_worker(runner=runner)
    worker.handle(message())
    assert worker.queue.events == [] and worker.claims.released == ["r1"]
    assert worker.claims.runs["r1"] == 1  # a try
    (kind, text), = worker.fake_status.faults
    assert kind == "host" and "/var/cache/x" in text


def test_a_full_disk_hands_the_message_back_untried_and_stops_new_work() -> None:
    runner = FakeRunner(error=OSError(errno.ENOSPC, "No space left on device", "/var/cache/x"))
    worker = make_worker(runner=runner)
    worker.claims.runs["r1"] = 2  # even on what would be its last try
    worker.handle(message())
    assert worker.queue.events == [] and worker.claims.released == ["r1"]
    assert worker.claims.runs["r1"] == 2  # not counted
    ((handed, delay),) = worker.queue.handed_back
    assert handed == "m1" and 5 <= delay <= 10
    assert worker.disk._suspect is not None  # the loop takes no work until a probe write works


def test_a_host_fault_on_the_last_attempt_ends_failed_internal() -> None:
    worker = make_worker(runner=FakeRunner(error=OSError(errno.EIO, "I/O error", "/w")))
    worker.claims.runs["r1"] = 2
    worker.handle(message())
    assert worker.store.published[0]["errorType"] == "INTERNAL"
    assert worker.queue.events == ["publish", "dead-letter", "delete"]


def test_a_bug_outside_the_run_ends_its_message_not_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = make_worker()

    def broken(*args: Any) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(worker.claims, "acquire", broken)
    worker.handle(message())
    (result,) = worker.store.published
    assert (result["requestId"], result["errorType"]) == ("r1", "INTERNAL")
    assert "KeyError" in result["errorMessage"]
    assert worker.queue.events == ["publish", "dead-letter", "delete"]
    assert [kind for kind, _ in worker.fake_status.faults] == ["unexpected"]


def test_a_bug_on_a_body_without_request_id_is_dead_lettered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = make_worker()
    monkeypatch.setattr("worker.task.parse", lambda *a: 1 / 0)
    worker.handle(Message("m9", "rh", "not even json", 1))
    assert worker.queue.events == ["dead-letter", "delete"] and worker.store.published == []


def test_messages_received_after_sigterm_are_released_not_run() -> None:
    runner = FakeRunner(error=AssertionError("must not run"))
    worker = make_worker(runner=runner)
    worker.stopping = True  # SIGTERM arrived while the long poll was returning
    worker.dispatch([message(), Message("m2", "rh2", "{}", 1)])
    assert worker.queue.released == ["m1", "m2"]
    assert worker.queue.deleted == [] and worker.store.published == []


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
    from common import errors
    from worker.dispositions import decide

    assert decide(getattr(errors, name)("x"), attempt, 3).value == expected


def test_os_errors_of_the_host_become_host_faults_and_others_bugs() -> None:
    from common.errors import DiskFull, HostFault, UnexpectedError, as_task_error

    full = as_task_error(OSError(errno.ENOSPC, "No space left on device", "/cache/x.zip"))
    assert isinstance(full, DiskFull) and "/cache/x.zip: No space left on device" in str(full)
    assert type(as_task_error(OSError(errno.EIO, "I/O error", "/w"))) is HostFault
    assert isinstance(as_task_error(OSError(errno.EACCES, "denied")), UnexpectedError)
