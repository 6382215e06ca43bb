"""Deleting handled messages from SQS in batches, off the worker's path."""

from __future__ import annotations

import threading
import time

from loguru import logger

from nanogrid.common.errors import QueueUnavailable

from .sqs import SQS_BATCH_MAX, Message, TaskQueue

MAX_DELETE_LINGER_S = 0.5


class BatchDeleter:
    """Deletes handled messages in the background, 10 per DeleteMessageBatch call when it can.

    The worker moves on to its next receive instead of waiting for a delete round trip, and a
    delete waits up to ``linger`` seconds for nine more to share its call: under load that is
    one SQS request per ten tasks instead of one per task (CPU here and in SQS, and SQS
    requests are what is billed). The linger stays under a quarter of the visibility timeout,
    well inside what a message has left after its run. A delete lost to a crash only brings
    the message back, and then its stored result is re-published, not re-run. ``close`` sends
    what is still pending.
    """

    def __init__(self, queue: TaskQueue, linger: float | None = None) -> None:
        self._queue = queue
        self._linger = (
            min(MAX_DELETE_LINGER_S, queue.config.visibility_timeout_seconds / 4)
            if linger is None
            else linger
        )
        self._pending: list[tuple[float, Message]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="sqs-delete", daemon=True)
        self._thread.start()

    def delete(self, message: Message) -> None:
        with self._cond:
            self._pending.append((time.monotonic(), message))
            if len(self._pending) in (1, SQS_BATCH_MAX):  # the loop starts a linger, or ends it
                self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                while self._pending and len(self._pending) < SQS_BATCH_MAX and not self._closed:
                    remaining = self._pending[0][0] + self._linger - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if not self._pending:
                    return
                batch = [message for _, message in self._pending[:SQS_BATCH_MAX]]
                del self._pending[:SQS_BATCH_MAX]
            try:
                self._queue.delete_batch(batch)
            except QueueUnavailable as exc:  # they come back; their stored results stop a re-run
                logger.warning(f"[SQS] {exc}")
