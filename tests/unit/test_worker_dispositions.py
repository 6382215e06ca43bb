"""Worker.handle's decision per case of the DESIGN's SQS table, with small fakes for the peers.

The same cases run end to end against the real peers in tests/component/test_worker_pipeline.py;
these pin down the decisions that are awkward to provoke there (an agent bug, an outbox that
cannot be written, a dead-letter queue that is down).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.config import from_dict
from common.errors import CodeNotFound, QueueUnavailable, ResultStoreUnavailable
from runners.base import RunOutcome, Sandbox
from worker.autotuner import Recommendation
from worker.loop import Worker
from worker.result import Result
from worker.sqs import Message


class FakeQueue:
    def __init__(self) -> None:
        self.deleted: list[str] = []
        self.dead: list[str] = []
        self.released: list[str] = []
        self.dlq_down = False

    def delete(self, m: Message) -> None:
        self.deleted.append(m.message_id)

    def release(self, m: Message) -> None:
        self.released.append(m.message_id)

    def dead_letter(self, m: Message, reason: str) -> None:
        if self.dlq_down:
            raise QueueUnavailable("dlq down")
        self.dead.append(reason)


class FakeStore:
    def __init__(self) -> None:
        self.published: list[dict] = []
        self.stored: dict[str, dict] = {}
        self.broken = False

    def existing(self, request_id: str) -> Result | None:
        stored = self.stored.get(request_id)
        return None if stored is None else Result.from_dict(stored)

    def publish(self, result: Result) -> bool:
        if self.broken:
            raise ResultStoreUnavailable("no redis, no outbox")
        self.published.append(result.to_dict())
        return True


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


class FakeHistory:
    def add_and_get(self, function_id: str, peak: int) -> list[int]:
        return [peak]


class FakeMetrics:
    def __init__(self) -> None:
        self.records = 0

    def record(self, *args: Any, **kwargs: Any) -> None:
        self.records += 1


class FakeVisibility:
    def track(self, message: Message | None) -> None:
        pass


def make_worker(codes: FakeCodes | None = None, runner: FakeRunner | None = None) -> Worker:
    worker = Worker(from_dict({"queue": {"max_attempts": 3}}), 0)
    worker.queue = FakeQueue()  # type: ignore[assignment]
    worker.deleter = worker.queue  # type: ignore[assignment]
    worker.store = FakeStore()  # type: ignore[assignment]
    worker.codes = codes or FakeCodes()  # type: ignore[assignment]
    worker.runner = runner or FakeRunner()  # type: ignore[assignment]
    worker.history = FakeHistory()  # type: ignore[assignment]
    worker.metrics = FakeMetrics()  # type: ignore[assignment]
    worker.visibility = FakeVisibility()  # type: ignore[assignment]
    return worker


def message(attempt: int = 1, **changes: Any) -> Message:
    body = {
        "requestId": "r1",
        "functionId": "f",
        "runtime": "python",
        "s3Bucket": "b",
        "s3Key": "k",
        **changes,
    }
    return Message("m1", "rh", json.dumps(body), attempt)


def test_ran_is_published_and_deleted(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = make_worker()
    monkeypatch.setattr(
        "worker.autotuner.recommend", lambda *a, **k: Recommendation(32, "tip", 1)
    )
    worker.handle(message())
    assert [r["status"] for r in worker.store.published] == ["SUCCESS"]
    assert worker.queue.deleted == ["m1"] and worker.metrics.records == 1


@pytest.mark.parametrize(("attempt", "kept"), [(1, True), (2, True), (3, False), (7, False)])
def test_missing_code_is_kept_until_max_attempts(attempt: int, kept: bool) -> None:
    worker = make_worker(codes=FakeCodes(CodeNotFound("code s3://b/k not found")))
    worker.handle(message(attempt=attempt))
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


@pytest.mark.parametrize(
    ("codes", "changes"),
    [(None, {"runtime": "cobol"}), (FakeCodes(CodeNotFound("gone")), {})],
)
def test_dead_letter_queue_down_keeps_the_message(codes: FakeCodes | None, changes: dict) -> None:
    worker = make_worker(codes=codes)
    worker.queue.dlq_down = True
    worker.handle(message(attempt=3, **changes))
    assert worker.queue.deleted == [] and worker.store.published == []


def test_duplicate_is_republished_not_run() -> None:
    runner = FakeRunner(error=AssertionError("must not run"))
    worker = make_worker(runner=runner)
    stored = Result("r1", "f", "python", "SUCCESS", stdout="first run").to_dict()
    worker.store.stored["r1"] = stored
    worker.handle(message())
    assert worker.store.published == [stored]
    assert worker.queue.deleted == ["m1"] and runner.released == 0


def test_messages_received_after_sigterm_are_released_not_run() -> None:
    runner = FakeRunner(error=AssertionError("must not run"))
    worker = make_worker(runner=runner)
    worker.stopping = True  # SIGTERM arrived while the long poll was returning
    worker.dispatch([message(), Message("m2", "rh2", "{}", 1)])
    assert worker.queue.released == ["m1", "m2"]
    assert worker.queue.deleted == [] and worker.store.published == []
