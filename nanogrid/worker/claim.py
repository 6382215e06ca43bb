"""One run per requestId: a claim in Redis taken before a task runs.

SQS delivers at least once, so two workers (on one host or two) can hold copies of one
message at the same time. Before running, a worker takes ``claim:{requestId}`` with
``SET NX PX lease`` (like AWS Lambda Powertools' idempotency INPROGRESS record); the run's
lease keeper renews it while the run lasts, the result's publish deletes it (only if it is
still ours), and the claim of a worker that died lapses with its lease. A copy that finds a
live claim does not run.

A claim can also vanish under a live run: a failover that drops the last writes, a restart
without persistence, eviction (ElastiCache's default ``volatile-lru`` evicts keys with a
TTL). The renewal therefore takes a missing claim again, and names one that someone else
took meanwhile (their run started in the gap: logged and counted by the caller; the first
result stored is the one that stands, resultstore.py).

``acquire`` is one round trip on the hot path: a script that returns the stored result when
there is one, else takes the claim, counts the run (``runs:{requestId}``: tries are runs,
not SQS receives, so a message handed back untried never burns an attempt) and reads the
function's recent peaks for the auto-tuner, else says who holds it and for how long.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from loguru import logger

from . import rediskeys
from .autotuner import PeakHistory
from .leases import LeaseKeeper
from .redislink import RedisLink, ScriptArg
from .result import Result

NOW_MS = """
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
"""
"""The server's clock: hosts' clocks disagree, the leases' scores must not."""
ACQUIRE = NOW_MS + """
local stored = redis.call('GET', KEYS[1])
if stored then return {'result', stored} end
local holder = redis.call('GET', KEYS[2])
if holder then return {'held', holder, redis.call('PTTL', KEYS[2])} end
local cap = tonumber(redis.call('HGET', KEYS[5], ARGV[4]) or ARGV[5])
local running = 0
if cap then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now_ms)
  running = redis.call('ZCARD', KEYS[4])
  if running >= cap then return {'capped', cap, running} end
  redis.call('ZADD', KEYS[4], now_ms + ARGV[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[4], ARGV[2] + 60000)
  running = running + 1
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local run = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])
local peaks = {}
if KEYS[6] then peaks = redis.call('LRANGE', KEYS[6], 0, ARGV[6]) end
return {'claimed', run, peaks, cap or -1, running}
"""
"""In one step: the stored result, or who holds the claim, or (the function at its cap
across all hosts) 'capped', or the claim taken with a slot of the function's cap, the run
counted (``runs:{id}``, the result's ``attempt``) and the function's recent peaks read."""
RENEW = NOW_MS + """
local out = {}
for n = 1, #KEYS / 2 do
  local claim, slots = KEYS[2 * n - 1], KEYS[2 * n]
  local token = ARGV[2 * n]
  local held = redis.call('GET', claim)
  if held == token then
    redis.call('PEXPIRE', claim, ARGV[1])
    out[n] = 'ok'
  elseif not held then
    redis.call('SET', claim, token, 'PX', ARGV[1])
    out[n] = 'retaken'
  else
    out[n] = held
  end
  if ARGV[2 * n + 1] == '1' then
    redis.call('ZADD', slots, now_ms + ARGV[1], token)
    redis.call('PEXPIRE', slots, ARGV[1] + 60000)
  end
end
return out
"""
"""Renews many claims (and their slots) in one round trip; a claim that is gone is taken
again, one someone else holds is named (its holder's token). A run keeps its slot as long as
it runs, even one whose lease lapsed: counted once (by its token), truthfully."""
RELEASE = """
if ARGV[3] == '1' then redis.call('ZREM', KEYS[3], ARGV[1]) end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[2] == '1' and redis.call('DECR', KEYS[2]) <= 0 then redis.call('DEL', KEYS[2]) end
  return 1
end
return 0
"""
CLAIM_RETRY_S = 1.0
"""A failed claim renewal is tried again this soon."""
CLAIM_RENEW_BATCH = 100
"""Claims renewed by one script call."""
RUNS_TTL_S = 14 * 24 * 3600
"""How long a requestId's run count lasts without a result: SQS's longest retention."""


@dataclass(frozen=True)
class Claim:
    """This worker's claim on a requestId, held while its run lasts."""

    request_id: str
    token: str
    run: int = field(default=1, compare=False)
    """Which try of the requestId this is (1 = first): runs counted in Redis, not receives."""
    slots: str | None = field(default=None, compare=False)
    """The function's running set when the run took a slot of its cap (else None)."""
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
    cap: int | None = None
    """The function's cap across all hosts (None: uncapped); with ``claim`` None and no
    holder, the function is at it."""
    running: int = 0
    """The function's runs in flight on all hosts, with this one when it took a slot."""


class Renewal(Enum):
    """What renewing one claim found."""

    KEPT = "kept"
    RETAKEN = "retaken"
    """It was gone (lapsed, evicted, lost in a failover): taken again."""
    LOST = "lost"
    """Someone else holds it now: a copy of the requestId runs elsewhere too."""


class ClaimStore:
    def __init__(
        self,
        link: RedisLink,
        worker_id: str,
        lease_seconds: float,
        stored: Callable[[str], Result | None],
        peaks: PeakHistory | None = None,
        default_cap: int | None = None,
    ) -> None:
        """``stored`` reads a stored result (``ResultStore.existing``); ``peaks``: whose
        recent peaks a claim reads; ``default_cap``: the cap of a function with no entry in
        ``nanogrid:concurrency`` (None: uncapped)."""
        self._link = link
        self._default_cap = default_cap
        self._peaks = peaks
        self._stored = stored
        self._worker_id = worker_id
        self.lease_ms = max(1, int(lease_seconds * 1000))
        # A Script runs on whichever client it is given and loads itself again after NOSCRIPT
        # (a new primary that has not seen it yet).
        client = link.client()
        self._acquire, self._renew, self._release = (
            client.register_script(source) for source in (ACQUIRE, RENEW, RELEASE)
        )

    def acquire(self, request_id: str, function_id: str, runtime: str | None = None
                ) -> Acquired:
        """The stored result of ``request_id``, or who else holds its claim, or (the function
        at its cap) neither, or our claim on it, with its run number, a slot of the
        function's cap and the recent peaks of ``function_id`` on ``runtime``.

        Raises ResultStoreUnavailable when Redis cannot take the claim.
        """
        token = f"{self._worker_id}:{uuid.uuid4().hex}"
        slots = rediskeys.running(function_id)
        keys = [rediskeys.result(request_id), rediskeys.claim(request_id),
                rediskeys.runs(request_id), slots, rediskeys.CONCURRENCY]
        default_cap = "" if self._default_cap is None else self._default_cap
        args: list[ScriptArg] = [token, self.lease_ms, RUNS_TTL_S, function_id, default_cap]
        reading = (
            self._peaks.reading(function_id, runtime)
            if self._peaks is not None and runtime is not None
            else None
        )
        if reading is not None:
            keys.append(reading[0])
            args.append(reading[1])
        for _ in range(2):
            reply = self._link.call(
                f"claim {request_id}",
                lambda c: self._acquire(keys=keys, args=args, client=c),
            )
            kind = _text(reply[0])
            if kind != "result":
                break
            stored = _stored_result(reply[1])
            if stored is not None:
                return Acquired(result=stored)
            logger.warning(f"[REDIS] result:{request_id} holds no valid result JSON; running")
            self._link.call(f"drop result:{request_id}", lambda c: c.delete(keys[0]))
        if kind == "claimed":
            cap = int(reply[3])
            claim = Claim(request_id, token, int(reply[1]), slots if cap >= 0 else None,
                          PeakHistory.parse(reply[2]))
            return Acquired(claim=claim, cap=cap if cap >= 0 else None, running=int(reply[4]))
        if kind == "capped":
            return Acquired(cap=int(reply[1]), running=int(reply[2]))
        if kind == "result":  # written again at once: another run is storing its result
            return Acquired(holder="?", expires_in=self.lease_ms / 1000)
        holder = _text(reply[1])
        return Acquired(holder=holder.rsplit(":", 1)[0], expires_in=max(0, int(reply[2])) / 1000)

    def renew(self, claims: Sequence[Claim]) -> dict[Claim, Renewal]:
        """Renew the leases of ``claims`` and of their slots in one round trip (from the
        lease keeper): a claim that is gone is taken again; one that someone else holds now
        is LOST.

        Raises ResultStoreUnavailable when Redis cannot take the renewal.
        """
        keys: list[str] = []
        args: list[ScriptArg] = [self.lease_ms]
        for claim in claims:
            keys += [rediskeys.claim(claim.request_id), claim.slots or rediskeys.CONCURRENCY]
            args += [claim.token, "1" if claim.slots else "0"]
        reply = self._link.call(
            f"renew {len(claims)} claims",
            lambda c: self._renew(keys=keys, args=args, client=c),
        )
        found = {}
        for claim, answer in zip(claims, reply, strict=True):
            answer = _text(answer)
            found[claim] = (
                Renewal.KEPT if answer == "ok"
                else Renewal.RETAKEN if answer == "retaken"
                else Renewal.LOST
            )
        return found

    def release(self, claim: Claim, *, count_run: bool = True) -> None:
        """Give the claim and its slot up without a result (the message is kept for another
        try); ``count_run=False``: the task never got to run here (the host could not: its
        disk), so this try does not count toward ``queue.max_attempts``."""
        keys = [rediskeys.claim(claim.request_id), rediskeys.runs(claim.request_id),
                claim.slots or rediskeys.CONCURRENCY]
        args = [claim.token, "0" if count_run else "1", "1" if claim.slots else "0"]
        self._link.call(
            f"release the claim on {claim.request_id}",
            lambda c: self._release(keys=keys, args=args, client=c),
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


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _stored_result(raw: bytes) -> Result | None:
    try:
        return Result.from_json(raw)
    except (ValueError, TypeError):
        return None


class ClaimLeases(LeaseKeeper[Claim]):
    """Renews the claims of a worker's runs, many per round trip (leases.py). A claim that
    was gone is taken again, one that another worker took is given up; both are told to
    ``on_lost`` (a fault report) and logged."""

    def __init__(self, claims: ClaimStore, on_lost: Callable[[str], None]) -> None:
        self._claims = claims
        self._on_lost = on_lost
        lease = claims.lease_ms / 1000
        super().__init__("claims", lease / 3, self._renew_batch, CLAIM_RETRY_S,
                         batch=CLAIM_RENEW_BATCH)

    def _renew_batch(self, batch: list[Claim]) -> None:
        for claim, found in self._claims.renew(batch).items():
            if found is Renewal.KEPT:
                continue
            if found is Renewal.RETAKEN:
                text = (f"claim on {claim.request_id} was gone while it ran (lapsed, evicted or "
                        "lost in a failover); taken again")
            else:
                self.discard(claim)
                text = (f"claim on {claim.request_id} is held by another worker while it runs "
                        "here: a copy runs twice; the first result stored stands")
            logger.bind(requestId=claim.request_id).warning(f"[DUPLICATE] {text}")
            self._on_lost(text)
