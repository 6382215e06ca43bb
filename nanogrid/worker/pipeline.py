"""One received message, from its receive to its end: the worker's pipeline.

``MessageRun.run`` reads top to bottom, one stage each:

    parse   (at receive: admission needs the task's memory) ........ task.py
    claim   one run per requestId, the try counted, a slot of the
            function's cap across hosts ............................. duplicates.py, claim.py,
                                                                      caps.py
    hold    claim lease and status while it runs (the message's
            visibility is held from its receive to its end) ......... leases.py, status.py
    fetch   the code zip, from the cache or S3 ...................... codestore.py
    invoke  sandbox, unpack, run, result ............................ invoke.py -> nanogrid/runners/
    end     what becomes of the message, decided from the error
            class: result, dead letter, delete, or back to the queue  dispositions.py, endings.py

Hooks (hooks.py) see each stage start and end. ``run`` never raises: any error becomes one of
the DESIGN's SQS cases, and a bug while handling a message ends that message, not the worker.
Many runs go on at once, each on a thread of its own (inflight.py): a run keeps its state on
itself, never on the worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

from loguru import logger

from nanogrid.common.errors import (
    DiskFull,
    GaveUp,
    HostFault,
    InvalidMessage,
    TaskError,
    UnexpectedError,
    as_task_error,
)

from . import duplicates, faults, task
from .claim import Claim
from .dispositions import Disposition, decide
from .endings import Endings
from .hooks import Hook
from .invoke import invoke
from .phases import PhaseClock
from .result import Result
from .services import Services
from .sqs import Message


class MessageRun:
    def __init__(
        self,
        services: Services,
        endings: Endings,
        hooks: Sequence[Hook],
        message: Message,
    ) -> None:
        """Parse the message and hold it invisible until it ends."""
        self.services = services
        self.message = message
        self.clock = PhaseClock(message.received_mono, message.queued_ms)
        self.notes: dict[str, Any] = {}
        self._endings = endings
        self._hooks = hooks
        self.task: task.Task | None = None
        self.trace = message.trace
        """The trace context the function is given (a tracing hook puts its span there)."""
        self.result: Result | None = None
        """The result published (or kept in the outbox), once there is one."""
        self._refusal: TaskError | None = None
        self._bug: Exception | None = None
        try:
            self.task = task.parse(message.body, services.config, message.trace_id)
        except TaskError as exc:
            self._refusal = exc
        except Exception as exc:  # noqa: BLE001 - a bug ends its message, when it runs
            self._bug = exc
        services.visibility.add(message)

    @property
    def memory_mb(self) -> int:
        """What admission counts: the task's memoryMb (a refused body: the smallest)."""
        if self.task is not None:
            return self.task.memory_mb
        return self.services.config.limits.min_memory_mb

    def run(self) -> None:
        """Take the message to its end; never raises."""
        try:
            with self.stage("message"):
                if self._bug is not None:
                    raise self._bug
                if self._refusal is not None:
                    self.refuse(self._refusal)
                elif self.task is not None:
                    t = self.task
                    with logger.contextualize(
                        requestId=t.request_id, functionId=t.function_id, traceId=t.trace_id
                    ):
                        logger.debug(
                            "[SQS] Received task {} ({}, message {}, receive {})",
                            t.request_id, t.runtime, self.message.message_id,
                            self.message.receives,
                        )
                        self._run(t)
        except Exception as exc:  # noqa: BLE001 - a bug ends its message, not the worker
            self.after_bug(exc)
        finally:
            self.services.visibility.discard(self.message)

    def release(self) -> None:
        """Hand the message back unstarted (the worker drains)."""
        self._endings.release(self.message)

    def _run(self, t: task.Task) -> None:
        with self.stage("claim"):
            claim = duplicates.claim(
                self.services.claims, self._endings, self.services.caps, self.message, t,
                self.services.config.queue.visibility_timeout_seconds,
            )
        if claim is None:  # ended there: re-published, or handed back
            return
        published = False
        try:
            with self.held(claim):
                outcome = self._try(t, claim)
            with self.stage("end"):
                published = self._end(t, claim, outcome)
        finally:
            if not published and self.services.status:
                self.services.status.task_ended(t.request_id)

    @contextlib.contextmanager
    def held(self, claim: Claim) -> Iterator[None]:
        """While the task runs: its claim renewed, the arbiter told. The claim's renewals
        stop before it ends (a publish or a release frees it: none may take it again)."""
        if self.services.status:
            self.services.status.task_started(claim.request_id)
        self.services.claim_leases.add(claim)
        try:
            yield
        except BaseException:
            self.services.claim_leases.discard(claim)
            duplicates.release(self.services.claims, claim)
            raise
        self.services.claim_leases.discard(claim)

    def _try(self, t: task.Task, claim: Claim) -> Result | TaskError:
        """Fetch and invoke: the result of the run, or the error that kept it from one."""
        max_attempts = self.services.config.queue.max_attempts
        if claim.run > max_attempts:
            return GaveUp(
                f"gave up: tried {claim.run - 1} times already (queue.max_attempts is "
                f"{max_attempts}; the message came back {self.message.receives} times)"
            )
        try:
            with self.stage("fetch"):
                package = self.services.codes.fetch(t.s3_bucket, t.s3_key)
            return invoke(self.services, t, package, claim, self.clock, self.stage, self.trace)
        except Exception as exc:  # noqa: BLE001 - translated, then decided by class
            return self._translate(exc)

    def _end(self, t: task.Task, claim: Claim, outcome: Result | TaskError) -> bool:
        """What becomes of the message; True when a result was published (or kept)."""
        if isinstance(outcome, Result):
            self.result = outcome
            return self._endings.finish(self.message, outcome, token=claim.token)
        max_attempts = self.services.config.queue.max_attempts
        disposition = decide(outcome, claim.run, max_attempts)
        if disposition is Disposition.DEFER:
            duplicates.release(self.services.claims, claim, count_run=outcome.ran)
            counted = f"run {claim.run} counted" if outcome.ran else "not counted as a try"
            self._endings.defer(self.message, f"[RETRY] {outcome}: {counted}")
            return False
        if disposition is Disposition.RETRY:
            logger.warning(
                f"[RETRY] {outcome} (attempt {claim.run} of {max_attempts}); "
                "message kept for another try"
            )
            duplicates.release(self.services.claims, claim)
            return False
        res = self._endings.failed(t.ids, outcome, t.memory_mb, claim.run, self.clock.timings())
        self.result = res
        return self._endings.finish(
            self.message, res, disposition is Disposition.DEAD_LETTER, claim.token
        )

    def refuse(self, error: TaskError) -> None:
        """A message that can never run: a FAILED result when it names a requestId, a
        dead-letter copy when its class asks for one, delete."""
        ids = dataclasses.replace(task.peek_ids(self.message.body), trace_id=self.message.trace_id)
        max_attempts = self.services.config.queue.max_attempts
        dead_letter = decide(error, 1, max_attempts) is Disposition.DEAD_LETTER
        # A body that decoded into a task (e.g. an unknown runtime) has timings; one that
        # never parsed has none.
        timings = None if isinstance(error, InvalidMessage) else self.clock.timings()
        with logger.contextualize(requestId=ids.request_id or "-", traceId=ids.trace_id):
            self._endings.refuse(self.message, error, ids, dead_letter, timings)

    def after_bug(self, exc: Exception) -> None:
        """End a message whose handling hit a bug: FAILED INTERNAL when its requestId can be
        read, a dead-letter copy, delete. The traceback goes to the debug log."""
        error = as_task_error(exc)
        logger.opt(exception=exc).debug("traceback of the error below")
        logger.error(f"[UNEXPECTED] handling message {self.message.message_id} failed: {error}")
        self.services.faults.fault(faults.UNEXPECTED, str(error))
        try:
            self.refuse(error)
        except Exception as again:  # noqa: BLE001 - it comes back; the attempt limit ends it
            logger.error(
                f"[SQS] could not end message {self.message.message_id} "
                f"({type(again).__name__}: {again}); it comes back after its visibility timeout"
            )

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """One stage of the run, seen by the hooks."""
        for hook in self._hooks:
            hook.before(name, self)
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            for hook in reversed(self._hooks):
                hook.after(name, self, error)

    def _translate(self, exc: Exception) -> TaskError:
        """``exc`` as a TaskError; bugs and host faults reported (the traceback of a bug goes
        to the debug log; the result's line says what it was)."""
        error = as_task_error(exc)
        if isinstance(error, UnexpectedError):
            logger.opt(exception=exc).debug("traceback of the internal error below")
            self.services.faults.fault(faults.UNEXPECTED, str(error))
        elif isinstance(error, HostFault):
            self.services.faults.fault(faults.HOST, str(error))
            if isinstance(error, DiskFull):
                self.services.disk.full(str(error))
        return error
