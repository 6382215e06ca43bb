"""Results on Redis: ``SET result:{id} <json> EX ttl`` + ``PUBLISH result:{id} <json>``.

A result is never lost to a Redis outage: ``publish`` retries for a bounded time, then keeps
the result in the on-disk outbox (outbox.py), which a thread of the worker's re-sends once
Redis takes writes again, oldest first, off the main loop (a backlog sent to a slow Redis
must not stop the worker's heartbeats). An outage is anything that refuses every write for
now (down, failing over, read-only, out of memory, loading, busy: redislink.py): the flush
waits it out and retries with a backoff. An entry Redis itself refuses while it takes other
writes is retried with a backoff, then set aside as ``.failed-<name>`` and reported, and the
entries behind it go on; set-aside entries are tried again every ``revive_seconds``.

The publish is one script: the first result stored for a requestId stands (a later one, of
a copy that ran beside it after a claim was lost, is not stored over it), the task's
``claim:{requestId}`` is deleted only while it is still this run's, the run's slot of its
function's cap is freed, its run count goes, and the run's peak goes into the auto-tuner's
history.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from nanogrid.common.errors import ResultRejected, ResultStoreUnavailable

from . import rediskeys
from .autotuner import PeakHistory
from .outbox import Outbox
from .redislink import RedisLink, ScriptArg
from .result import Result

MAX_ENTRY_TRIES = 5
"""Sends of one outbox entry that Redis refuses (while it takes other writes) before the
entry is set aside."""
PROBE_TTL_MS = 10_000
FLUSH_RETRY_S = (0.5, 1, 2, 5)
"""While entries wait and Redis cannot take them, the flusher tries again after these."""

PUBLISH = """
local stored = redis.call('GET', KEYS[1])
if stored then
  if ARGV[4] == '1' then redis.call('PUBLISH', KEYS[1], stored) end
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('PUBLISH', KEYS[1], ARGV[1])
if ARGV[3] ~= '' then
  if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
  redis.call('ZREM', KEYS[4], ARGV[3])
end
redis.call('DEL', KEYS[3])
if KEYS[5] then
  redis.call('LPUSH', KEYS[5], ARGV[5])
  redis.call('LTRIM', KEYS[5], 0, ARGV[6])
  redis.call('EXPIRE', KEYS[5], ARGV[7])
end
return 1
"""
"""One script rather than MULTI: as atomic, half the round trip's replies to parse, and the
result crosses the wire once instead of twice. Returns 0 when a result was stored already
(then published again only for a duplicate's re-publish, ARGV[4])."""


def encode(result: Result) -> bytes:
    """Compact UTF-8 JSON; unencodable characters are replaced rather than failing the publish."""
    return result.to_json().encode("utf-8", errors="replace")


class ResultStore:
    """Publishes results to Redis, with an on-disk outbox for when Redis cannot take them."""

    def __init__(
        self,
        redis_url: str,
        ttl_seconds: int,
        outbox_dir: Path,
        *,
        link: RedisLink | None = None,
        retry_seconds: float = 1.5,
        first_backoff_seconds: float = 0.05,
        rescan_seconds: float = 60.0,
        stale_claim_seconds: float = 300.0,
        entry_backoff_seconds: tuple[float, float] = (0.5, 60.0),
        revive_seconds: float = 600.0,
        on_set_aside: Callable[[str], None] | None = None,
        peaks: PeakHistory | None = None,
    ) -> None:
        """``peaks``: where a run's result records its peak (none are recorded without);
        ``entry_backoff_seconds``: the first and the longest wait before an entry Redis
        refused is sent again (doubling)."""
        self.link = link or RedisLink(redis_url)
        self._peaks = peaks
        # Runs on whichever client it is given; loads itself again after NOSCRIPT (a new
        # primary that has not seen it yet).
        self._publish = self.link.client().register_script(PUBLISH)
        self._ttl = ttl_seconds
        self.outbox = Outbox(Path(outbox_dir), stale_claim_seconds)
        self._retry_seconds = retry_seconds
        self._first_backoff = first_backoff_seconds
        self._rescan_seconds = rescan_seconds
        self._entry_backoff = entry_backoff_seconds
        self._revive_seconds = revive_seconds
        self._on_set_aside = on_set_aside
        self._refused: dict[str, tuple[int, float]] = {}
        """Outbox entries Redis refused, in this process: (times, when to send again)."""
        # Starts true: entries may have been left by an earlier process.
        self._outbox_maybe_nonempty = True
        self._last_scan = 0.0
        self._last_revive = time.monotonic()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._flusher: threading.Thread | None = None
        self._probe_key = rediskeys.probe()

    @property
    def errors(self) -> int:
        """Redis calls that failed or were refused (results, claims, history): /metrics."""
        return self.link.errors

    @property
    def outbox_pending(self) -> bool:
        """True while results may be waiting in the outbox (e.g. to shorten the SQS wait)."""
        return self._outbox_maybe_nonempty

    def start_flushing(self) -> None:
        """Re-send the outbox from a thread of its own from now on (the worker's)."""
        self._flusher = threading.Thread(target=self._flush_loop, name="outbox", daemon=True)
        self._flusher.start()

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._flusher is not None:
            self._flusher.join(timeout=5)
        self.link.close()

    def writable(self) -> bool:
        """True when Redis takes a write now (a read-only replica answers PING, not this)."""
        try:
            self.link.call("probe", lambda c: c.set(self._probe_key, 1, px=PROBE_TTL_MS))
        except ResultStoreUnavailable:
            return False
        return True

    def trouble(self) -> str | None:
        """None when Redis takes results now, else what is wrong. After a call found Redis
        unavailable, a probe write decides (a read-only replica still answers PING)."""
        if self.link.trouble is not None and self.writable():
            self._wake.set()  # back: the outbox goes out now
        return self.link.trouble

    def existing(self, request_id: str) -> Result | None:
        """The stored result of ``request_id`` (duplicate delivery), or None.

        Raises ResultStoreUnavailable when Redis cannot answer.
        """
        key = rediskeys.result(request_id)
        raw = self.link.call(f"read {key}", lambda c: c.get(key))
        if raw is None:
            return None
        try:
            return Result.from_json(raw)
        except (ValueError, TypeError):
            logger.bind(requestId=request_id).warning(
                "[REDIS] {} holds no valid result JSON; ignoring it", key
            )
            return None

    def publish(self, result: Result, token: str | None = None, again: bool = False) -> bool:
        """SET + PUBLISH the result atomically (one script); True when Redis took it.
        ``token``: the run's claim, deleted with the publish if it is still ours; ``again``:
        a stored result published once more (a duplicate's: its peak is not recorded twice).

        On Redis trouble it retries for ``retry_seconds``, then writes the result to the outbox
        and returns False. Raises ResultStoreUnavailable only when the outbox cannot be
        written either (the caller should then keep the task message).
        """
        request_id = str(result.request_id or "")
        log = logger.bind(requestId=request_id)
        data = encode(result)
        deadline = time.monotonic() + self._retry_seconds
        delay = self._first_backoff
        attempts = 0
        while True:
            attempts += 1
            try:
                stored = self._send(request_id, data, result, token, again)
            except ResultStoreUnavailable as exc:
                error = exc
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                time.sleep(min(delay, remaining))
                delay *= 2
                continue
            if stored:
                log.debug("[REDIS] Publishing result: published result:{} ({} bytes)",
                          request_id, len(data))
            elif not again:
                log.warning("[DUPLICATE] result:{} was stored by another run of it first; "
                            "that one stands, this one is not stored", request_id)
            return True
        try:
            path = self.outbox.write(request_id, data)
        except OSError as exc:
            log.error(
                "[REDIS] unavailable ({}) and outbox write failed ({}); result:{} not stored",
                error, exc, request_id,
            )
            raise ResultStoreUnavailable(f"redis down and outbox not writable: {exc}") from exc
        self._outbox_maybe_nonempty = True
        self._wake.set()
        log.warning(
            "[REDIS] unavailable ({}) after {} attempts; result kept in outbox {}",
            error, attempts, path,
        )
        return False

    def flush_outbox(self) -> int:
        """Re-send outbox entries, oldest first; returns how many went. Stops when Redis is
        unavailable; an entry Redis refuses waits its backoff (set aside after
        MAX_ENTRY_TRIES, when Redis takes other writes meanwhile).

        Cheap when nothing is pending: the directory is scanned only after a local outbox
        write, after a failed flush, or every ``rescan_seconds`` (entries of other processes).
        """
        now = time.monotonic()
        if now - self._last_revive >= self._revive_seconds:
            self._last_revive = now
            if self.outbox.revive():
                self._outbox_maybe_nonempty = True
        if not self._outbox_maybe_nonempty and now - self._last_scan < self._rescan_seconds:
            return 0
        with self._flush_lock:
            self._last_scan = now
            sent = 0
            try:
                for name in self.outbox.pending():
                    refused = self._refused.get(name)
                    if refused is not None and refused[1] > time.monotonic():
                        continue  # its backoff
                    claimed = self.outbox.claim(name)
                    if claimed is None:
                        continue  # another process took it
                    outcome = self._resend(*claimed)
                    if outcome is False:
                        self._outbox_maybe_nonempty = True
                        break
                    sent += outcome is True
                else:
                    self._outbox_maybe_nonempty = bool(self._refused)
            except OSError as exc:
                logger.error("[REDIS] outbox {} unreadable: {}", self.outbox.directory, exc)
                self._outbox_maybe_nonempty = True
            if sent:
                logger.info("[REDIS] outbox re-sent {} results", sent)
            return sent

    @property
    def pending_entries(self) -> int:
        """Entries of this process that Redis refused and that wait for another try."""
        return len(self._refused)

    def _flush_loop(self) -> None:
        failures = 0
        while not self._closing:
            if self._outbox_maybe_nonempty:
                wait = FLUSH_RETRY_S[min(failures, len(FLUSH_RETRY_S) - 1)]
            else:
                wait = self._rescan_seconds
            self._wake.wait(wait)
            self._wake.clear()
            if self._closing:
                return
            try:
                self.flush_outbox()
            except Exception as exc:  # noqa: BLE001 - the flusher outlives any one failure
                logger.error(f"[REDIS] outbox flush failed: {exc!r}")
            failures = failures + 1 if self.link.trouble is not None else 0

    def _send(
        self, request_id: str, data: bytes, result: Result, token: str | None, again: bool
    ) -> bool:
        """The publish script; False when a result was stored already. Raises
        ResultStoreUnavailable or ResultRejected when Redis did not take it."""
        key = rediskeys.result(request_id)
        keys = [key, rediskeys.claim(request_id), rediskeys.runs(request_id),
                rediskeys.running(result.function_id or "")]
        args: list[ScriptArg] = [data, self._ttl, token or "", "1" if again else "0"]
        peak = self._peaks.entry(result) if self._peaks is not None and not again else None
        if peak is not None:
            keys.append(peak[0])
            args.extend(peak[1])
        return bool(self.link.call(
            f"publish {key}", lambda client: self._publish(keys=keys, args=args, client=client)
        ))

    def _resend(self, claimed: Path, entry: str) -> bool | None:
        """Send one claimed entry: True when sent; None when it was skipped (unusable or
        refused by Redis: set aside, or handed back for a later flush); False when Redis is
        unavailable (handed back, un-claimed: the flush stops)."""
        data = claimed.read_bytes()
        try:
            result = Result.from_json(data)
        except (ValueError, TypeError):
            self._set_aside(claimed, ".bad-", entry, "is not a result")
            return None
        request_id = str(result.request_id or "")
        try:
            self._send(request_id, data, result, None, False)
        except ResultRejected as exc:
            return self._refused_entry(claimed, entry, exc)
        except ResultStoreUnavailable as exc:
            self.outbox.give_back(claimed, entry)
            logger.debug("[REDIS] outbox flush stopped: still unavailable ({})", exc)
            return False
        self._refused.pop(entry, None)
        claimed.unlink(missing_ok=True)
        logger.bind(requestId=request_id).info(
            "[REDIS] published result:{} from outbox ({} bytes)", request_id, len(data)
        )
        return True

    def _refused_entry(self, claimed: Path, entry: str, exc: ResultRejected) -> bool | None:
        tries = self._refused.get(entry, (0, 0.0))[0] + 1
        if tries >= MAX_ENTRY_TRIES:
            if not self.writable():  # Redis takes no writes at all: an outage, not this entry
                self.outbox.give_back(claimed, entry)
                return False
            self._refused.pop(entry, None)
            self._set_aside(claimed, ".failed-", entry, f"refused {tries} times ({exc})")
            return None
        first, longest = self._entry_backoff
        self._refused[entry] = (tries, time.monotonic() + min(first * 2 ** (tries - 1), longest))
        self.outbox.give_back(claimed, entry)
        logger.warning("[REDIS] outbox entry {} refused (try {} of {}): {}",
                       entry, tries, MAX_ENTRY_TRIES, exc)
        return None

    def _set_aside(self, claimed: Path, prefix: str, entry: str, why: str) -> None:
        target = self.outbox.set_aside(claimed, prefix, entry)
        message = f"outbox entry {entry} {why}; set aside as {target}"
        logger.error("[REDIS] {}", message)
        if self._on_set_aside is not None:
            self._on_set_aside(message)
