"""One run per requestId, seen from one message: claim its requestId before running it.

At-least-once delivery hands the same task to several workers. The copy that finds a stored
result re-publishes it; the copy whose requestId another worker runs waits briefly for that
run's result, else goes back to the queue until the other's claim would have lapsed. A
message whose function is at its cap across all hosts goes back to SQS untried (caps.py).
The claims themselves live in Redis (claim.py).
"""

from __future__ import annotations

import math

from loguru import logger

from nanogrid.common.errors import ResultStoreUnavailable

from .caps import CapGate, delay_for
from .claim import Acquired, Claim, ClaimStore
from .endings import Endings
from .sqs import Message
from .task import Task

DUPLICATE_WAIT_S = 2.0
"""How long a copy whose requestId another worker runs waits for that run's result (at most
half the visibility timeout) before it hands its message back."""


def claim(claims: ClaimStore, endings: Endings, caps: CapGate, message: Message, t: Task,
          visibility_timeout: float) -> Claim | None:
    """Our claim on ``t``'s requestId, to run it (with its function's recent peaks); None
    when this copy ended here instead (re-published, handed back: a copy's twin runs, or the
    function is at its cap)."""
    if caps.known_at_cap(t.function_id):
        delay = delay_for(message.all_receives)
        logger.debug(f"[CAP] {t.function_id} was at its cap a moment ago; message handed "
                     f"back for {delay}s, untried")
        caps.deferred(t.function_id)
        endings.hand_back(message, delay)
        return None
    try:
        acquired = claims.acquire(t.request_id, t.function_id, t.runtime)
    except ResultStoreUnavailable as exc:  # this worker takes no new work until Redis can
        endings.defer(message, f"[REDIS] {exc}: not tried")
        return None
    if acquired.result is not None:
        logger.info("[DUPLICATE] a result exists already; re-publishing it, not running")
        endings.republish(message, acquired.result)
        return None
    if acquired.claim is not None:
        caps.took_slot(t.function_id, acquired.cap, acquired.running)
        return acquired.claim
    if acquired.holder is None:
        assert acquired.cap is not None
        caps.at_cap(t.function_id, acquired.cap, acquired.running)
        delay = delay_for(message.all_receives)
        logger.info(f"[CAP] {t.function_id} is at its cap ({acquired.running} of "
                    f"{acquired.cap} running on all hosts); message handed back for {delay}s, "
                    "untried")
        endings.hand_back(message, delay)
        return None
    _defer(claims, endings, message, t.request_id, acquired, visibility_timeout)
    return None


def _defer(claims: ClaimStore, endings: Endings, message: Message, request_id: str,
           acquired: Acquired, visibility_timeout: float) -> None:
    """Another worker runs it: re-publish its result, or hand the message back until its claim
    would have lapsed."""
    logger.info(
        f"[DUPLICATE] {acquired.holder} is running it (claim lapses in "
        f"{acquired.expires_in:.1f}s unless renewed); waiting for its result"
    )
    wait = min(DUPLICATE_WAIT_S, visibility_timeout / 2)
    try:
        stored = claims.wait_for_result(request_id, wait)
    except ResultStoreUnavailable as exc:
        logger.warning(f"[REDIS] {exc}")
        stored = None
    if stored is not None:
        endings.republish(message, stored)
        return
    delay = math.ceil(acquired.expires_in) + 1
    logger.info(f"[DUPLICATE] still running elsewhere; message handed back for {delay}s")
    endings.hand_back(message, delay)


def release(claims: ClaimStore, claim: Claim, *, count_run: bool = True) -> None:
    """Give the claim up (the message is kept for a retry, which may then run at once);
    ``count_run=False``: the task did not get to run, so this try is not counted."""
    try:
        claims.release(claim, count_run=count_run)
    except ResultStoreUnavailable as exc:  # it lapses with its lease
        logger.warning(f"[REDIS] {exc}")
