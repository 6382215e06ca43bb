"""Visibility heartbeats: the messages being run stay invisible in SQS while their runs last."""

from __future__ import annotations

from loguru import logger

from .leases import LeaseKeeper
from .sqs import SQS_BATCH_MAX, Message, TaskQueue

HEARTBEAT_RETRY_S = 1.0
"""A failed visibility renewal is tried again this soon."""
HEARTBEAT_PARALLEL = 4
"""Visibility batches sent at once: 200 messages in flight are 20 calls, 5 rounds of 4."""


class VisibilityHeartbeat(LeaseKeeper[Message]):
    """Keeps the messages being run invisible while their runs last (ChangeMessageVisibility
    every third of the visibility timeout, ten messages a call, a few calls at once, on
    ``queue``'s client: give it one of its own)."""

    def __init__(self, queue: TaskQueue) -> None:
        self.queue = queue
        timeout = queue.config.visibility_timeout_seconds
        super().__init__(
            "SQS visibility", timeout / 3, self._extend, HEARTBEAT_RETRY_S,
            batch=SQS_BATCH_MAX, parallel=HEARTBEAT_PARALLEL,
        )

    def _extend(self, messages: list[Message]) -> None:
        refused = self.queue.extend_batch(messages, self.queue.config.visibility_timeout_seconds)
        for message, why in refused.items():  # deleted meanwhile, or a stale receipt handle
            logger.debug(f"[SQS] visibility of {message.message_id} not extended: {why}")
