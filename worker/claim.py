"""One run per requestId: a claim in Redis taken before a task runs.

SQS delivers at least once, so two workers (on one host or two) can hold copies of one
message at the same time. Before running, a worker takes ``claim:{requestId}`` with
``SET NX PX lease`` (like AWS Lambda Powertools' idempotency INPROGRESS record); the run's
lease keeper extends it while the run lasts, the result's publish deletes it, and the claim
of a worker that died lapses with its lease. A copy that finds a live claim does not run.

``acquire`` is one round trip on the hot path, the same one the duplicate check used to be:
a script that returns the stored result when there is one, else takes the claim (and reads
the function's recent peaks for the auto-tuner with it), else says who holds it and for how
long.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from loguru import logger

from .autotuner import PeakHistory
from .redislink import RedisLink
from .result import Result

ACQUIRE = """
local stored = redis.call('GET', KEYS[1])
if stored then return {'result', stored} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if KEYS[3] then return {'claimed', redis.call('LRANGE', KEYS[3], 0, ARGV[3])} end
  return {'claimed'}
end
return {'held', redis.call('GET', KEYS[2]) or '', redis.call('PTTL', KEYS[2])}
"""
EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def claim_key(request_id: str) -> str:
    return f"claim:{request_id}"


@dataclass(frozen=True)
class Claim:
    """This worker's claim on a requestId, held while its run lasts."""

    request_id: str
    token: str
    recent_peaks: tuple[int, ...] = field(default=(), compare=False)
    """The function's recent peaks (newest first), read with the claim for the auto-tuner."""


@dataclass(frozen=True)
class Acquired:
    """What ``acquire`` found: exactly one of a stored result, our claim, or another's."""

    result: Result | None = None
    claim: Claim | None = None
    holder: str | None = None
    """Who holds the live claim (``host:pid``) when it is not ours."""
    expires_in: float = 0.0
    """Seconds the other holder's claim has left unless renewed."""


class ClaimStore:
    def __init__(
        self,
        link: RedisLink,
        worker_id: str,
        lease_seconds: float,
        stored: Callable[[str], Result | None],
        peaks: PeakHistory | None = None,
    ) -> None:
        """``stored`` reads a stored result (``ResultStore.existing``); ``peaks``: whose
        recent peaks a claim reads."""
        self._link = link
        self._peaks = peaks
        self._stored = stored
        self._worker_id = worker_id
        self.lease_ms = max(1, int(lease_seconds * 1000))
        # A Script runs on whichever client it is given and loads itself again after NOSCRIPT
        # (a new primary that has not seen it yet).
        client = link.client()
        self._acquire, self._extend, self._release = (
            client.register_script(source) for source in (ACQUIRE, EXTEND, RELEASE)
        )

    def acquire(self, request_id: str, function_id: str | None = None) -> Acquired:
        """The stored result of ``request_id``, or our claim on it (with ``function_id``'s
        recent peaks), or who else holds one.

        Raises ResultStoreUnavailable when Redis cannot take the claim.
        """
        token = f"{self._worker_id}:{uuid.uuid4().hex}"
        keys = [f"result:{request_id}", claim_key(request_id)]
        args: list[object] = [token, self.lease_ms]
        reading = (
            self._peaks.reading(function_id)
            if self._peaks is not None and function_id is not None
            else None
        )
        if reading is not None:
            keys.append(reading[0])
            args.append(reading[1])
        reply = self._link.call(
            f"claim {request_id}",
            lambda c: self._acquire(keys=keys, args=args, client=c),
        )
        kind = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if kind == "result":
            stored = _stored_result(reply[1])
            if stored is not None:
                return Acquired(result=stored)
            logger.warning(f"[REDIS] result:{request_id} holds no valid result JSON; running")
            taken = self._link.call(
                f"claim {request_id}",
                lambda c: c.set(keys[1], token, nx=True, px=self.lease_ms),
            )
            if not taken:
                return Acquired(holder="?", expires_in=self.lease_ms / 1000)
            return Acquired(claim=Claim(request_id, token))
        if kind == "claimed":
            recent = PeakHistory.parse(reply[1]) if len(reply) > 1 else ()
            return Acquired(claim=Claim(request_id, token, recent))
        holder = reply[1].decode(errors="replace") if isinstance(reply[1], bytes) else ""
        return Acquired(holder=holder.rsplit(":", 1)[0], expires_in=max(0, int(reply[2])) / 1000)

    def extend(self, claim: Claim) -> None:
        """Renew the lease (from the lease keeper); a claim no longer ours is left alone."""
        self._link.call(
            f"renew the claim on {claim.request_id}",
            lambda c: self._extend(
                keys=[claim_key(claim.request_id)], args=[claim.token, self.lease_ms], client=c
            ),
        )

    def release(self, claim: Claim) -> None:
        """Give the claim up without a result (the message is kept for another try)."""
        self._link.call(
            f"release the claim on {claim.request_id}",
            lambda c: self._release(
                keys=[claim_key(claim.request_id)], args=[claim.token], client=c
            ),
        )

    def wait_for_result(self, request_id: str, timeout: float) -> Result | None:
        """Poll for the result another worker's run is about to store, up to ``timeout``."""
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            stored = self._stored(request_id)
            remaining = deadline - time.monotonic()
            if stored is not None or remaining <= 0:
                return stored
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.2)


def _stored_result(raw: bytes) -> Result | None:
    try:
        return Result.from_json(raw)
    except (ValueError, TypeError):
        return None
