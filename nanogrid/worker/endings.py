"""How a message ends: its result published (or kept in the outbox), then a dead-letter copy
when asked for, then the delete; or it is handed back to the queue.

What happens is decided by the message's run (pipeline.py, from the error class); this
module only carries it out. Results come before dead letters: a copy that fails is logged
and counted and does not keep the message, whose FAILED result is out already. Nothing here
keeps per-message state, so several threads may end messages at once.
"""

from __future__ import annotations

import random

from loguru import logger

from nanogrid.common.errors import QueueUnavailable, ResultStoreUnavailable, TaskError

from . import faults as kinds
from . import result
from .result import Result, TaskIds, Timings
from .services import Services
from .sqs import Message

MAX_VISIBILITY_S = 43200
"""SQS's longest visibility timeout (12 hours)."""
DEFER_S = (5, 10)
"""A message this worker could not try (Redis or its disk away) is visible again after this
many seconds (drawn in the range: a batch does not come back all at once)."""


class Endings:
    def __init__(self, services: Services) -> None:
        self._services = services

    def finish(
        self, message: Message, res: Result, dead_letter: bool = False, token: str | None = None
    ) -> bool:
        """Publish the result (``token``: the run's claim, freed with it), then (when asked)
        copy the message to the dead-letter queue, then delete it. Only a result that could
        not be kept anywhere keeps the message (False)."""
        if not self.publish(res, token):
            return False
        if dead_letter:
            self.dead_letter(message, res.error_message or "")
        self._services.metrics.record(
            res.function_id or "unknown",
            duration_ms=res.duration_millis,
            peak_memory_bytes=res.peak_memory_bytes,
            status=res.status,
            error_type=res.error_type,
            cold_start=res.cold_start,
        )
        self.delete(message)
        if self._services.status:
            self._services.status.task_finished(res)
        if res.ok:
            logger.debug(f"[DONE][OK] {res.request_id} in {res.duration_millis:.1f} ms")
        else:
            logger.warning(f"[FAIL][{res.error_type}] {res.request_id}: {res.error_message}")
        return True

    def republish(self, message: Message, stored: Result) -> None:
        if self.publish(stored, again=True):
            self.delete(message)

    def publish(self, res: Result, token: str | None = None, again: bool = False) -> bool:
        """Publish (or keep in the outbox); False only when the result could not be kept.
        ``again``: a stored result published once more (its peak is not recorded twice)."""
        try:
            self._services.store.publish(res, token, again=again)
            return True
        except ResultStoreUnavailable as exc:  # neither Redis nor the outbox took it
            logger.error(
                f"[REDIS] result of {res.request_id} could not be kept: {exc}; "
                "the message stays on the queue"
            )
            return False

    def refuse(
        self, message: Message, exc: TaskError, ids: TaskIds, dead_letter: bool,
        timings: Timings | None,
    ) -> None:
        """A message that can never run: a result when it names a requestId; dead-letter (when
        asked); delete."""
        if ids.request_id is not None:
            res = self.failed(ids, exc, None, 1, timings)
            if not self.finish(message, res, dead_letter) and self._services.status:
                self._services.status.task_ended(ids.request_id)
            return
        logger.warning(f"[FAIL][{exc.error_type}] message {message.message_id}: {exc}")
        if dead_letter:
            self.dead_letter(message, str(exc))
        self.delete(message)

    def failed(
        self,
        ids: TaskIds,
        exc: TaskError,
        memory_mb: int | None,
        attempt: int,
        timings: Timings | None,
    ) -> Result:
        return result.failed(
            ids,
            exc.error_type,
            str(exc),
            memory_mb=memory_mb,
            attempt=attempt,
            worker_id=self._services.worker_id,
            timings=timings,
        )

    def dead_letter(self, message: Message, reason: str) -> None:
        """Copy to the dead-letter queue; a copy that fails is logged and counted, and does
        not keep the message (its result, if it has one, is published already)."""
        try:
            if self._services.queue.dead_letter(message, reason):
                logger.info(f"[SQS] message {message.message_id} copied to the dead-letter queue")
        except QueueUnavailable as exc:
            text = f"dead-letter copy of message {message.message_id} failed: {exc}"
            logger.error(f"[SQS] {text}; the message is deleted all the same")
            self._services.faults.fault(kinds.DEAD_LETTER_COPY, text)

    def delete(self, message: Message) -> None:
        self._services.visibility.discard(message)
        self._services.deleter.delete(message)

    def defer(self, message: Message, why: str) -> None:
        """Hand back a message this worker cannot run now (Redis or its disk away), for
        another worker or a later try: after a delay, so it does not come straight back."""
        delay = random.randint(*DEFER_S)
        if self.hand_back(message, delay):
            logger.warning(f"{why}; message {message.message_id} handed back for {delay}s")

    def release(self, message: Message) -> None:
        """Hand an unstarted message back at once (shutdown)."""
        if self.hand_back(message, 0):
            logger.info(f"[SQS] released unstarted message {message.message_id}")

    def hand_back(self, message: Message, seconds: int) -> bool:
        """Make the message visible again in ``seconds`` (its renewals stop first, so none
        overrides this); False when SQS refused. One that came near the queue's redrive
        count is sent again as a new message instead, and the original deleted (redrive.py)."""
        self._services.visibility.discard(message)
        redrive = self._services.redrive
        if redrive.near(message) and redrive.resend(message, seconds):
            self._services.deleter.delete(message)
            return True
        try:
            self._services.queue.extend(message, min(seconds, MAX_VISIBILITY_S))
            return True
        except QueueUnavailable as exc:
            logger.warning(f"[SQS] could not hand back {message.message_id}: {exc}")
            return False
