"""One worker's Redis client, which follows a failover.

redis-py drops a pooled connection only on a connection or timeout error. A primary demoted
to a replica keeps its connections open and answers every write on them with ``READONLY``,
so a pool that merely retries stays on the old primary forever. On ``READONLY``, a
connection error or a timeout, ``call`` therefore replaces the whole pool: the new pool's
connections resolve the host name again (DNS failover, a proxy that switched its backend)
and reach whichever server is primary now. It then tries once more at once, so one
failover costs one failed round trip, not an outage.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import TypeVar

import redis
from loguru import logger
from redis.backoff import NoBackoff
from redis.retry import Retry

from nanogrid.common.errors import ResultRejected, ResultStoreUnavailable

T = TypeVar("T")
ScriptArg = str | int | float | bytes
"""What a Lua script's ARGV takes."""

CONNECT_TIMEOUT_SECONDS = 1.0
OPERATION_TIMEOUT_SECONDS = 2.0

FAILOVER_ERRORS = (
    redis.ReadOnlyError,
    redis.ConnectionError,  # BusyLoadingError (a restarted server loading its data) included
    redis.TimeoutError,
    OSError,
)
"""Errors after which this pool's connections may lead to the wrong server, or nowhere."""
OUTAGE_CODES = frozenset(
    {"OOM", "BUSY", "LOADING", "NOREPLICAS", "READONLY", "MISCONF", "MASTERDOWN", "TRYAGAIN",
     "CLUSTERDOWN"}
)
"""Error replies of a server that refuses every write for now (out of memory under
``noeviction``, a script running too long, loading its data, too few replicas in sync, a
replica, a failed RDB save, no primary): an outage like a server that is down, not a refusal
of this one write. Redis forwards them from inside a script with the same code."""
_OUTAGE_ERRORS = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,  # MasterDownError included
)
_OUTAGE_IN_TEXT = re.compile(r"(?:^|-)(" + "|".join(sorted(OUTAGE_CODES)) + r")\b")


def make_client(url: str) -> redis.Redis:
    """A redis-py client that fails fast: short timeouts, no hidden retries (we retry ourselves)."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
        socket_timeout=OPERATION_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), 0),
    )


class RedisLink:
    """The client results, claims and the autotuner's history share; create it after the fork."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()
        self._working = False
        """The last call succeeded: the next reset is news (a warning), not an outage's echo."""
        self.resets = 0
        self.errors = 0
        """Calls Redis failed or refused: /metrics."""
        self.trouble: str | None = None
        """Why the last call found Redis unavailable; None once a call succeeds."""

    def client(self) -> redis.Redis:
        """The current client (created on first use)."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = make_client(self.url)
                client = self._client
        return client

    def call(self, what: str, operation: Callable[[redis.Redis], T]) -> T:
        """``operation(client)``; after a failover-type error, a fresh pool and one more try.

        Raises ResultStoreUnavailable (Redis cannot take it now) or ResultRejected (Redis
        refused this operation), each naming ``what``.
        """
        for last_try in (False, True):
            client = self.client()
            try:
                value = operation(client)
            except FAILOVER_ERRORS as exc:
                self.reset(client, exc)
                if last_try:
                    raise self._unavailable(what, exc) from exc
            except redis.ResponseError as exc:
                if is_outage(exc):
                    raise self._unavailable(what, exc) from exc
                self.errors += 1
                raise ResultRejected(f"{what}: Redis refused it: {_line(exc)}") from exc
            except redis.RedisError as exc:
                raise self._unavailable(what, exc) from exc
            else:
                self._working = True
                self.trouble = None
                return value
        raise AssertionError("unreachable")

    def _unavailable(self, what: str, exc: BaseException) -> ResultStoreUnavailable:
        self.errors += 1
        self.trouble = f"{_line(exc)} (at {_where(self.url)})"
        return ResultStoreUnavailable(f"{what}: {_line(exc)}")

    def reset(self, failed: redis.Redis, exc: BaseException) -> None:
        """Drop ``failed``'s pool (if it is still the current one); the next call makes a new
        pool whose connections resolve the name again."""
        with self._lock:
            if self._client is not failed:
                return  # another thread replaced it already
            self._client = None
            self.resets += 1
            level = "WARNING" if self._working else "DEBUG"
            self._working = False
        logger.log(level, f"[REDIS] {_line(exc)}: dropping this worker's connections to "
                          f"{_where(self.url)} and connecting afresh")
        # Idle ones now; one another thread is using finishes its command and goes back to
        # the old pool, which closes it when it is collected (closing it under that thread
        # would turn its command into an I/O error on a closed file).
        failed.connection_pool.disconnect(inuse_connections=False)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


def is_outage(exc: redis.ResponseError) -> bool:
    """True for a reply that refuses every write for now (OUTAGE_CODES), however redis-py
    reports it: as the error code it stripped, or within the text (a script's error)."""
    if isinstance(exc, _OUTAGE_ERRORS):
        return True
    code = getattr(exc, "status_code", None)  # redis-py >= 6 keeps it
    return code in OUTAGE_CODES or _OUTAGE_IN_TEXT.search(str(exc)) is not None


def _line(exc: BaseException) -> str:
    """One line naming what went wrong, with the error code redis-py took off the reply."""
    text = " ".join(str(exc).split())
    code = getattr(exc, "status_code", None)
    if isinstance(code, str) and not text.startswith(code):
        text = f"{code} {text}"
    return text[:200] or type(exc).__name__


def _where(url: str) -> str:
    """The URL without credentials, for logs."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"
