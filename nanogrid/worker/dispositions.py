"""What happens to a message whose task failed: decided from the error class alone, here.

``decide`` is the DESIGN's SQS table for errors: a deferred error (this host's disk is full)
hands the message back untried; a retryable one (missing code, a host fault) keeps it until
its last attempt; any other ends it with a FAILED result, copied to the dead-letter queue
when its class says so.
"""

from __future__ import annotations

from enum import Enum

from nanogrid.common.errors import TaskError


class Disposition(Enum):
    DEFER = "defer"
    """No result; the message goes back to the queue with a delay, this try not counted."""
    RETRY = "retry"
    """No result; the message stays and comes back after its visibility timeout."""
    FAIL = "fail"
    """A FAILED result, then delete."""
    DEAD_LETTER = "dead-letter"
    """A FAILED result, then a copy to the dead-letter queue, then delete."""


def decide(error: TaskError, attempt: int, max_attempts: int) -> Disposition:
    """The disposition of a task on its ``attempt``-th try that failed with ``error``."""
    if error.deferred:
        return Disposition.DEFER
    if error.retryable and attempt < max_attempts:
        return Disposition.RETRY
    return Disposition.DEAD_LETTER if error.dead_letter else Disposition.FAIL
