"""Hand-backs that SQS's own redrive policy would dead-letter: sent again as new messages.

Every message handed back without a run (its function at its cap, Redis or the disk away,
a duplicate waiting) comes back as one more receive, and a task queue with a
``RedrivePolicy`` moves a message to its dead-letter queue once its receives pass
``maxReceiveCount``, though it never ran. So a hand-back of a message whose receives come
near that count sends a copy instead (the same body, message attributes and
``AWSTraceHeader``; the hand-back's delay as ``DelaySeconds``, at most 900) and deletes the
original. The copy starts again at receive 1 and carries the receives before it (so the
cap's delay keeps growing, caps.py) and when the first was sent (its ``queuedMs``). A copy
that could not be sent leaves the original to come back (never lost; a duplicate is fine:
claims run a requestId once). Tries are counted in Redis by requestId (claim.py), so a
copy's run is the attempt it would have been. The count is read at boot and again every
REFRESH_S when a hand-back needs it (a reload boots new workers, which read it again).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from loguru import logger

from nanogrid.common.errors import QueueUnavailable

from . import tracecontext
from .sqs import EARLIER_RECEIVES, FIRST_SENT, Message, TaskQueue

MARGIN = 2
"""A message is sent again when at most this many receives are left before the redrive
policy's count (ApproximateReceiveCount is approximate)."""
REFRESH_S = 300.0
"""How old the known ``maxReceiveCount`` may grow before a hand-back reads it again."""
MAX_DELAY_S = 900
"""SQS's longest DelaySeconds."""
MAX_ATTRIBUTES = 10
"""SQS's most message attributes: a producer's ten leave no room for the agent's two."""


class Redrive:
    """The task queue's redrive policy as one worker knows it, and the re-sends it calls for."""

    def __init__(self, queue: TaskQueue, max_attempts: int) -> None:
        self._queue = queue
        # After a deferral, the receives left must hold every try a message may still have.
        self._keep = max(MARGIN, max_attempts - 1)
        self._limit: int | None = None
        """maxReceiveCount (0: no redrive policy; None: not known yet)."""
        self._read_at = float("-inf")
        self._reading = threading.Lock()
        self.resent = 0
        """Messages sent again instead of handed back: /metrics."""

    @property
    def limit(self) -> int | None:
        """The task queue's maxReceiveCount as last read (0: none; None: never read)."""
        return self._limit

    def learn(self) -> None:
        """Read the task queue's redrive policy now; a failed read keeps what was known."""
        self._read_at = time.monotonic()
        try:
            self._limit = self._queue.redrive_limit()
        except QueueUnavailable as exc:
            logger.warning(f"[SQS] {exc}; the redrive policy is read again later")

    def near(self, message: Message) -> bool:
        """The message's next receives could pass the redrive policy's count (re-read when
        due; a read under way elsewhere is not waited for)."""
        if time.monotonic() - self._read_at >= REFRESH_S and self._reading.acquire(False):
            try:
                self.learn()
            finally:
                self._reading.release()
        limit = self._limit
        if not limit or not message.receives:  # no redrive policy, or SQS gave no count
            return False
        return limit - message.receives <= self._keep

    def resend(self, message: Message, delay: int) -> bool:
        """Send a copy of ``message`` due in ``delay`` seconds; False (logged) when SQS
        did not take it. The caller deletes the original."""
        delay = max(0, min(delay, MAX_DELAY_S))
        try:
            copy = self._queue.send(message.body, delay, copied_attributes(message),
                                    copied_system_attributes(message))
        except QueueUnavailable as exc:
            logger.warning(f"[SQS] could not send message {message.message_id} again ({exc}); "
                           "handed back instead")
            return False
        self.resent += 1
        logger.info(
            f"[SQS] message {message.message_id} sent again as {copy} in {delay}s, untried: "
            f"receive {message.receives} of the {self._limit} the queue's redrive policy "
            f"allows ({message.all_receives} in all)"
        )
        return True


def copied_attributes(message: Message) -> dict[str, Any]:
    """The message attributes of ``message``'s copy: the producer's as they came, and the
    receives and first send it stands for (when there is room)."""
    copied = {
        name: {key: value[key] for key in ("DataType", "StringValue", "BinaryValue")
               if key in value}
        for name, value in message.attributes.items()
        if name not in (EARLIER_RECEIVES, FIRST_SENT)
    }
    if len(copied) + 2 > MAX_ATTRIBUTES:
        return copied
    copied[EARLIER_RECEIVES] = {"DataType": "Number", "StringValue": str(message.all_receives)}
    if message.sent_at is not None:
        copied[FIRST_SENT] = {"DataType": "Number",
                              "StringValue": str(round(message.sent_at * 1000))}
    return copied


def copied_system_attributes(message: Message) -> dict[str, Any]:
    """The copy's ``AWSTraceHeader``, when ``message`` had one."""
    if message.trace_header is None:
        return {}
    return {tracecontext.AWS_TRACE_HEADER: {"DataType": "String",
                                            "StringValue": message.trace_header}}
