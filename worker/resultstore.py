"""Results on Redis: ``SET result:{id} <json> EX ttl`` + ``PUBLISH result:{id} <json>``.

A result is never lost to a Redis outage: ``publish`` retries for a bounded time, then keeps
the result in an on-disk outbox (one file per requestId) that ``flush_outbox`` re-sends once
Redis is back. Several worker processes may share one outbox directory; an entry is claimed
by renaming it to ``<name>.json.sending-<pid>`` before it is sent, so each is sent by one
process, and claims left by dead processes are taken over.

The outbox drains oldest first without head-of-line blocking: while Redis is unavailable
the flush stops (every entry would fail alike), but an entry Redis itself refuses is tried
``MAX_ENTRY_TRIES`` times, then set aside as ``.failed-<name>`` and reported, and the
entries behind it go on. The same publish deletes the task's ``claim:{requestId}`` and
records the run's peak in the auto-tuner's history.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from common.errors import ResultRejected, ResultStoreUnavailable

from .autotuner import PeakHistory
from .claim import claim_key
from .redislink import RedisLink
from .result import Result

MAX_ENTRY_TRIES = 5
"""Sends of one outbox entry that Redis refuses before the entry is set aside."""
PROBE_TTL_MS = 10_000

PUBLISH = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('PUBLISH', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
if KEYS[3] then
  redis.call('LPUSH', KEYS[3], ARGV[3])
  redis.call('LTRIM', KEYS[3], 0, ARGV[4])
  redis.call('EXPIRE', KEYS[3], ARGV[5])
end
return 1
"""
"""One script rather than MULTI: as atomic, half the round trip's replies to parse, and the
result crosses the wire once instead of twice. With a run's result, its peak goes into the
function's history (``PeakHistory.entry``)."""

_SAFE_NAME = re.compile(r"[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}")
_CLAIM = re.compile(r"(?P<entry>.+\.json)\.sending-(?P<pid>\d+)")


def encode(result: Result) -> bytes:
    """Compact UTF-8 JSON; unencodable characters are replaced rather than failing the publish."""
    return result.to_json().encode("utf-8", errors="replace")


class ResultStore:
    """Publishes results to Redis, with an on-disk outbox for when Redis is down."""

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
        on_set_aside: Callable[[str], None] | None = None,
        peaks: PeakHistory | None = None,
    ) -> None:
        """``peaks``: where a run's result records its peak (none are recorded without)."""
        self.link = link or RedisLink(redis_url)
        self._peaks = peaks
        # Runs on whichever client it is given; loads itself again after NOSCRIPT (a new
        # primary that has not seen it yet).
        self._publish = self.link.client().register_script(PUBLISH)
        self._ttl = ttl_seconds
        self._outbox = Path(outbox_dir)
        self._retry_seconds = retry_seconds
        self._first_backoff = first_backoff_seconds
        self._rescan_seconds = rescan_seconds
        self._stale_claim_seconds = stale_claim_seconds
        self._on_set_aside = on_set_aside
        self._tries: dict[str, int] = {}
        """Refused sends per outbox entry, in this process."""
        # Starts true: entries may have been left by an earlier process.
        self._outbox_maybe_nonempty = True
        self._last_scan = 0.0
        self._flush_lock = threading.Lock()
        self._probe_key = f"nanogrid:probe:{socket.gethostname()}:{os.getpid()}"

    @property
    def outbox_pending(self) -> bool:
        """True while results may be waiting in the outbox (e.g. to shorten the SQS wait)."""
        return self._outbox_maybe_nonempty

    def close(self) -> None:
        self.link.close()

    def writable(self) -> bool:
        """True when Redis takes a write now (a read-only replica answers PING, not this)."""
        try:
            self.link.call("probe", lambda c: c.set(self._probe_key, 1, px=PROBE_TTL_MS))
        except ResultStoreUnavailable:
            return False
        return True

    def trouble(self) -> str | None:
        """Re-send the outbox; None when Redis takes results now, else what is wrong.

        After a call found Redis unavailable, a probe write decides (a read-only replica
        still answers PING).
        """
        self.flush_outbox()
        if self.link.trouble is not None and self.writable():
            self.flush_outbox()
        return self.link.trouble

    def existing(self, request_id: str) -> Result | None:
        """The stored result of ``request_id`` (duplicate delivery), or None.

        Raises ResultStoreUnavailable when Redis cannot answer.
        """
        raw = self.link.call(f"read result:{request_id}", lambda c: c.get(f"result:{request_id}"))
        if raw is None:
            return None
        try:
            return Result.from_json(raw)
        except (ValueError, TypeError):
            logger.bind(requestId=request_id).warning(
                "[REDIS] result:{} holds no valid result JSON; ignoring it", request_id
            )
            return None

    def publish(self, result: Result, record_peak: bool = True) -> bool:
        """SET + PUBLISH the result atomically (one script); True when Redis took it.
        ``record_peak``: False for a result published before (a duplicate's re-publish),
        whose peak is in the history already.

        On Redis trouble it retries for ``retry_seconds``, then writes the result to the outbox
        and returns False. Raises ResultStoreUnavailable only when the outbox cannot be
        written either (the caller should then keep the task message).
        """
        request_id = str(result.request_id or "")
        log = logger.bind(requestId=request_id)
        data = encode(result)
        peak = self._peak_entry(result) if record_peak else None
        deadline = time.monotonic() + self._retry_seconds
        delay = self._first_backoff
        attempts = 0
        while True:
            attempts += 1
            try:
                self._send(request_id, data, peak)
            except ResultStoreUnavailable as exc:
                error = exc
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                time.sleep(min(delay, remaining))
                delay *= 2
                continue
            log.debug("[REDIS] published result:{} ({} bytes)", request_id, len(data))
            return True
        try:
            path = self._write_outbox(request_id, data)
        except OSError as exc:
            log.error(
                "[REDIS] unavailable ({}) and outbox write failed ({}); result:{} not stored",
                error, exc, request_id,
            )
            raise ResultStoreUnavailable(f"redis down and outbox not writable: {exc}") from exc
        self._outbox_maybe_nonempty = True
        log.warning(
            "[REDIS] unavailable ({}) after {} attempts; result kept in outbox {}",
            error, attempts, path,
        )
        return False

    def flush_outbox(self) -> int:
        """Re-send outbox entries, oldest first; returns how many went. Stops when Redis is
        unavailable; an entry Redis refuses is skipped (set aside after MAX_ENTRY_TRIES).

        Cheap when nothing is pending: the directory is scanned only after a local outbox
        write, after a failed flush, or every ``rescan_seconds`` (entries of other processes).
        """
        now = time.monotonic()
        if not self._outbox_maybe_nonempty and now - self._last_scan < self._rescan_seconds:
            return 0
        with self._flush_lock:
            self._last_scan = now
            sent = 0
            try:
                for name in self._pending():
                    claimed = self._claim(name)
                    if claimed is None:
                        continue  # another process took it
                    outcome = self._resend(claimed, name)
                    if outcome is False:
                        self._outbox_maybe_nonempty = True
                        break
                    sent += outcome is True
                else:
                    self._outbox_maybe_nonempty = bool(self._tries)
            except OSError as exc:
                logger.error("[REDIS] outbox {} unreadable: {}", self._outbox, exc)
                self._outbox_maybe_nonempty = True
            if sent:
                logger.info("[REDIS] outbox re-sent {} results", sent)
            return sent

    @property
    def pending_entries(self) -> int:
        """Entries of this process that Redis refused and that wait for another try."""
        return len(self._tries)

    def _peak_entry(self, result: Result) -> tuple[str, list[int]] | None:
        return self._peaks.entry(result) if self._peaks is not None else None

    def _send(self, request_id: str, data: bytes, peak: tuple[str, list[int]] | None) -> None:
        """SET + PUBLISH + DEL the claim (+ ``peak``, a run's peak, into its function's
        history) in one script; ResultStoreUnavailable or ResultRejected when Redis did not
        take it."""
        key = f"result:{request_id}"
        keys, args = [key, claim_key(request_id)], [data, self._ttl]
        if peak is not None:
            keys.append(peak[0])
            args.extend(peak[1])
        self.link.call(
            f"publish {key}", lambda client: self._publish(keys=keys, args=args, client=client)
        )

    def _write_outbox(self, request_id: str, data: bytes) -> Path:
        self._outbox.mkdir(parents=True, exist_ok=True, mode=0o700)
        final = self._outbox / f"{_entry_name(request_id)}.json"
        fd, tmp = tempfile.mkstemp(dir=self._outbox, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self._outbox)
        return final

    def _pending(self) -> list[str]:
        """Entries and stale claims, oldest first (by the time they were written)."""
        try:
            entries = list(os.scandir(self._outbox))
        except FileNotFoundError:
            return []
        found: list[tuple[int, str]] = []
        for entry in entries:
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if entry.name.startswith(".tmp-") and time.time() - st.st_mtime > 3600:
                Path(entry.path).unlink(missing_ok=True)  # a crash mid-write left it
            elif self._is_pending(entry.name, st.st_ctime):
                found.append((st.st_mtime_ns, entry.name))
        return [name for _, name in sorted(found)]

    def _is_pending(self, name: str, changed_at: float) -> bool:
        if name.startswith("."):
            return False  # temp files and set-aside entries
        if name.endswith(".json"):
            return True
        claim = _CLAIM.fullmatch(name)
        return claim is not None and self._claim_is_stale(int(claim["pid"]), changed_at)

    def _claim_is_stale(self, pid: int, claimed_at: float) -> bool:
        # Our own pid: we hold the flush lock, so nothing of ours is in flight; it is a
        # leftover of an earlier process that had the same pid (pid namespaces reuse them).
        if pid == os.getpid() or time.time() - claimed_at > self._stale_claim_seconds:
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _claim(self, name: str) -> Path | None:
        entry = _CLAIM.fullmatch(name)
        base = entry["entry"] if entry else name
        claimed = self._outbox / f"{base}.sending-{os.getpid()}"
        try:
            os.rename(self._outbox / name, claimed)
        except FileNotFoundError:
            return None
        return claimed

    def _resend(self, claimed: Path, name: str) -> bool | None:
        """Send one claimed entry: True when sent; None when it was skipped (unusable or
        refused by Redis: set aside, or handed back for a later flush); False when Redis is
        unavailable (handed back, un-claimed: the flush stops)."""
        base = _CLAIM.fullmatch(claimed.name)
        entry = base["entry"] if base else name
        data = claimed.read_bytes()
        try:
            result = Result.from_json(data)
        except (ValueError, TypeError):
            self._set_aside(claimed, f".bad-{entry}", "is not a result")
            return None
        request_id = str(result.request_id or "")
        try:
            self._send(request_id, data, self._peak_entry(result))
        except ResultRejected as exc:
            tries = self._tries.get(entry, 0) + 1
            if tries >= MAX_ENTRY_TRIES:
                self._tries.pop(entry, None)
                self._set_aside(claimed, f".failed-{entry}", f"refused {tries} times ({exc})")
            else:
                self._tries[entry] = tries
                os.replace(claimed, self._outbox / entry)
                logger.warning("[REDIS] outbox entry {} refused (try {} of {}): {}",
                               entry, tries, MAX_ENTRY_TRIES, exc)
            return None
        except ResultStoreUnavailable as exc:
            os.replace(claimed, self._outbox / entry)
            logger.debug("[REDIS] outbox flush stopped: still unavailable ({})", exc)
            return False
        self._tries.pop(entry, None)
        claimed.unlink(missing_ok=True)
        logger.bind(requestId=request_id).info(
            "[REDIS] published result:{} from outbox ({} bytes)", request_id, len(data)
        )
        return True


    def _set_aside(self, claimed: Path, new_name: str, why: str) -> None:
        target = claimed.with_name(new_name)
        os.replace(claimed, target)
        message = f"outbox entry {target.name.split('-', 1)[1]} {why}; set aside as {target}"
        logger.error("[REDIS] {}", message)
        if self._on_set_aside is not None:
            self._on_set_aside(message)


def _entry_name(request_id: str) -> str:
    """File name for a requestId; ids outside the contract's charset are hashed."""
    if _SAFE_NAME.fullmatch(request_id):
        return request_id
    return "h-" + hashlib.sha256(request_id.encode("utf-8", "replace")).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
