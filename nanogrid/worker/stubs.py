"""In-memory stand-ins for a worker's peers, shipped for tests and benchmarks (as dramatiq
ships its StubBroker): ``Stubs.make(config).services`` builds a Worker that touches no SQS,
S3, Redis, sandbox or CloudWatch. Each stub records what was asked of it. The agent itself
never imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanogrid.common.config import Config, QueueConfig, from_dict
from nanogrid.common.errors import QueueUnavailable, ResultStoreUnavailable
from nanogrid.runners.base import Invocation, Runner, RunOutcome, Sandbox

from .autotuner import PeakHistory
from .caps import CapGate
from .claim import Acquired, Claim, ClaimLeases, ClaimStore, Renewal
from .cloudwatch import MetricsPublisher
from .codestore import CodePackage, CodeStore
from .deleter import BatchDeleter
from .diskspace import DiskGuard
from .faults import FaultBoard
from .ledger import Ledger
from .redrive import Redrive
from .result import Result
from .resultstore import ResultStore
from .services import Services
from .sqs import Message, TaskQueue
from .status import StatusReporter
from .visibility import VisibilityHeartbeat


class StubQueue(TaskQueue):
    """SQS: deletes, hand-backs (``extend``), copies sent again and dead-letter copies, in
    the order asked; ``max_receives``: the redrive policy's count (0: none)."""

    def __init__(self, config: QueueConfig) -> None:
        self.config = config
        self.errors = self.dead_lettered = 0
        self.events: list[str] = []
        self.deleted: list[str] = []
        self.dead: list[str] = []
        self.handed_back: list[tuple[str, int]] = []
        self.released: list[str] = []
        self.dead_letter_down = False
        self.max_receives = 0
        self.resent: list[tuple[str, int, dict[str, Any]]] = []
        """Copies sent again: body, delay, message attributes."""
        self.resend_down = False

    def redrive_limit(self) -> int:
        return self.max_receives

    def send(self, body: str, delay: int, attributes: dict[str, Any],
             system_attributes: dict[str, Any]) -> str:
        if self.resend_down:
            raise QueueUnavailable("SQS send_message failed: stub")
        self.resent.append((body, delay, attributes))
        self.events.append("resend")
        return f"copy-{len(self.resent)}"

    def delete(self, message: Message) -> None:
        self.deleted.append(message.message_id)
        self.events.append("delete")

    def delete_batch(self, messages: list[Message]) -> None:
        for message in messages:
            self.delete(message)

    def extend(self, message: Message, seconds: int) -> None:
        self.handed_back.append((message.message_id, seconds))
        if seconds == 0:
            self.released.append(message.message_id)

    def extend_batch(self, messages: list[Message], seconds: int) -> dict[Message, str]:
        return {}

    def dead_letter(self, message: Message, reason: str) -> bool:
        if self.dead_letter_down:
            raise QueueUnavailable("SQS send_message failed: the dead-letter queue is down")
        self.dead.append(reason)
        self.events.append("dead-letter")
        self.dead_lettered += 1
        return True


class StubDeleter(BatchDeleter):
    """Deletes at once, on the caller's thread."""

    def __init__(self, queue: TaskQueue) -> None:
        self._queue = queue

    def delete(self, message: Message) -> None:
        self._queue.delete(message)

    def close(self, timeout: float = 10.0) -> None:
        pass


class StubStore(ResultStore):
    """Redis results: what was published (``broken``: neither Redis nor the outbox takes it)."""

    errors = 0

    def __init__(self, events: list[str]) -> None:
        self.published: list[dict[str, Any]] = []
        self.peaks_recorded: list[bool] = []
        self.broken = False
        self._events = events

    @property
    def outbox_pending(self) -> bool:
        return False

    def trouble(self) -> str | None:
        return None

    def publish(self, result: Result, token: str | None = None, again: bool = False) -> bool:
        if self.broken:
            raise ResultStoreUnavailable("redis down and outbox not writable: stub")
        self.published.append(result.to_dict())
        self.peaks_recorded.append(not again)
        self._events.append("publish")
        return True

    def close(self) -> None:
        pass


class StubClaims(ClaimStore):
    """Redis claims: results stored by requestId, claims held by others, or Redis down; the
    tries of each requestId counted."""

    def __init__(self) -> None:
        self.lease_ms = 30_000
        self.runs: dict[str, int] = {}
        self.stored: dict[str, dict[str, Any]] = {}
        self.held_by: dict[str, str] = {}
        self.appears_while_waiting: dict[str, dict[str, Any]] = {}
        self.at_cap: dict[str, int] = {}
        """functionId -> its cap, for functions at it."""
        self.down = False
        self.released: list[str] = []

    def acquire(self, request_id: str, function_id: str, runtime: str | None = None
                ) -> Acquired:
        if self.down:
            raise ResultStoreUnavailable(f"claim {request_id}: Connection refused")
        if request_id in self.stored:
            return Acquired(result=Result.from_dict(self.stored[request_id]))
        if request_id in self.held_by:
            return Acquired(holder=self.held_by[request_id], expires_in=2.5)
        if function_id in self.at_cap:
            return Acquired(cap=self.at_cap[function_id], running=self.at_cap[function_id])
        self.runs[request_id] = self.runs.get(request_id, 0) + 1
        return Acquired(claim=Claim(request_id, "token", self.runs[request_id]))

    def renew(self, claims: Any) -> dict[Claim, Renewal]:
        return dict.fromkeys(claims, Renewal.KEPT)

    def release(self, claim: Claim, *, count_run: bool = True) -> None:
        self.released.append(claim.request_id)
        if not count_run:
            self.runs[claim.request_id] -= 1

    def wait_for_result(self, request_id: str, timeout: float) -> Result | None:
        stored = self.appears_while_waiting.get(request_id)
        return None if stored is None else Result.from_dict(stored)


class StubCodes(CodeStore):
    """S3 and the zip cache: every fetch finds version "v" of the code (or raises ``error``)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.errors = 0

    def fetch(self, bucket: str, key: str) -> CodePackage:
        if self.error is not None:
            raise self.error
        return CodePackage(bucket, key, "v", Path("/nonexistent.zip"), 0, downloaded=False)

    def trim(self) -> int:
        return 0


class StubRunner(Runner):
    """Sandboxes that already hold the code asked for; every run prints "ok" (or raises
    ``error``)."""

    name, marker = "stub", "[STUB]"

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.released = 0

    def acquire(self, runtime: str, code_key: str) -> Sandbox:
        return Sandbox(runtime=runtime, name="stub", code_dir=Path("/nonexistent"),
                       code_key=code_key)

    def run(self, sandbox: Sandbox, invocation: Invocation) -> RunOutcome:
        if self.error is not None:
            raise self.error
        return RunOutcome(0, False, False, b"ok", b"", False, False, 1.0, 2**20, "stub")

    def release(self, sandbox: Sandbox) -> None:
        self.released += 1

    def close(self) -> None:
        pass

    def pool_stats(self) -> dict[str, dict[str, int]]:
        return {}


class StubMetrics(MetricsPublisher):
    """CloudWatch: how many results were recorded."""

    def __init__(self) -> None:
        self.records = 0
        self.errors = 0

    def record(self, *args: Any, **kwargs: Any) -> None:
        self.records += 1

    def close(self, timeout: float = 0.0) -> None:
        pass


class StubStatus(StatusReporter):
    """The pipe to the arbiter: faults reported, the requestIds it would show running, and
    the functions whose messages were deferred at their cap."""

    def __init__(self) -> None:
        self.faults: list[tuple[str, str]] = []
        self.running: set[str] = set()
        self.deferrals: list[str] = []

    def heartbeat(
        self, degraded: list[str] | None = None, counts: dict[str, int] | None = None
    ) -> None:
        pass

    def fault(self, kind: str, message: str) -> None:
        self.faults.append((kind, message))

    def booted(self) -> None:
        pass

    def task_started(self, request_id: str) -> None:
        self.running.add(request_id)

    def task_finished(self, result: Result) -> None:
        self.running.discard(str(result.request_id))

    def task_ended(self, request_id: str) -> None:
        self.running.discard(request_id)

    def pools(self, stats: dict[str, dict[str, int]]) -> None:
        pass

    def deferred(self, function_id: str, cap: int | None, running: int | None) -> None:
        self.deferrals.append(function_id)

    def slot(self, function_id: str, cap: int, running: int) -> None:
        pass


@dataclass
class Stubs:
    """One worker's worth of stubs, and the Services made of them."""

    config: Config
    queue: StubQueue
    store: StubStore
    claims: StubClaims
    codes: StubCodes
    runner: StubRunner
    metrics: StubMetrics
    status: StubStatus
    services: Services = field(init=False)

    def __post_init__(self) -> None:
        board = FaultBoard(self.status)
        self.services = Services(
            config=self.config,
            worker_id="stub-host:1",
            queue=self.queue,
            visibility=VisibilityHeartbeat(self.queue),
            deleter=StubDeleter(self.queue),
            store=self.store,
            claims=self.claims,
            claim_leases=ClaimLeases(self.claims, lambda text: None),
            caps=CapGate(self.status),
            redrive=Redrive(self.queue, self.config.queue.max_attempts),
            history=PeakHistory(self.config.autotuner),
            codes=self.codes,
            runner=self.runner,
            metrics=self.metrics,
            faults=board,
            disk=DiskGuard([], 0),
            ledger=Ledger(1024, 8),
            status=self.status,
        )

    @classmethod
    def make(
        cls,
        config: Config | None = None,
        *,
        codes: StubCodes | None = None,
        runner: StubRunner | None = None,
    ) -> Stubs:
        config = config or from_dict({"queue": {"url": "http://127.0.0.1:1/000000000000/q"}})
        queue = StubQueue(config.queue)
        return cls(
            config=config,
            queue=queue,
            store=StubStore(queue.events),
            claims=StubClaims(),
            codes=codes or StubCodes(),
            runner=runner or StubRunner(),
            metrics=StubMetrics(),
            status=StubStatus(),
        )
