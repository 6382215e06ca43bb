"""The on-disk outbox: results Redis could not take yet, one file per requestId.

Several worker processes may share one outbox directory. An entry is claimed by renaming it
to ``<name>.json.sending-<pid>`` before it is sent, so each is sent by one process, and
claims left by dead processes are taken over. An entry Redis refused for good is set aside
as ``.failed-<name>`` (an unreadable one as ``.bad-<name>``); set-aside entries are put
back from time to time (``revive``), since what Redis refused (an ACL, a full memory that
slipped past the outage check) may have been fixed.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path

_SAFE_NAME = re.compile(r"[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}")
_CLAIM = re.compile(r"(?P<entry>.+\.json)\.sending-(?P<pid>\d+)")
FAILED_PREFIX = ".failed-"
STALE_TEMP_SECONDS = 3600


class Outbox:
    def __init__(self, directory: Path, stale_claim_seconds: float = 300.0) -> None:
        self.directory = Path(directory)
        self._stale_claim_seconds = stale_claim_seconds

    def write(self, request_id: str, data: bytes) -> Path:
        """Keep ``data`` as the entry of ``request_id``: complete or not at all (fsynced)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        final = self.directory / f"{_entry_name(request_id)}.json"
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.directory)
        return final

    def pending(self) -> list[str]:
        """Entries and stale claims, oldest first (by the time they were written)."""
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        found: list[tuple[int, str]] = []
        for entry in entries:
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if entry.name.startswith(".tmp-") and time.time() - st.st_mtime > STALE_TEMP_SECONDS:
                Path(entry.path).unlink(missing_ok=True)  # a crash mid-write left it
            elif self._is_pending(entry.name, st.st_ctime):
                found.append((st.st_mtime_ns, entry.name))
        return [name for _, name in sorted(found)]

    def claim(self, name: str) -> tuple[Path, str] | None:
        """Take ``name`` (an entry or a stale claim) for this process: (the claimed file, the
        entry's own name); None when another process took it first."""
        entry = _CLAIM.fullmatch(name)
        base = entry["entry"] if entry else name
        claimed = self.directory / f"{base}.sending-{os.getpid()}"
        try:
            os.rename(self.directory / name, claimed)
        except FileNotFoundError:
            return None
        return claimed, base

    def give_back(self, claimed: Path, entry: str) -> None:
        """Un-claim: the entry waits for a later flush."""
        os.replace(claimed, self.directory / entry)

    def set_aside(self, claimed: Path, prefix: str, entry: str) -> Path:
        target = self.directory / f"{prefix}{entry}"
        os.replace(claimed, target)
        return target

    def revive(self) -> int:
        """Put the entries set aside as refused back in line; returns how many."""
        try:
            names = [n for n in os.listdir(self.directory) if n.startswith(FAILED_PREFIX)]
        except FileNotFoundError:
            return 0
        revived = 0
        for name in names:
            entry = name.removeprefix(FAILED_PREFIX)
            if not (self.directory / entry).exists():
                try:
                    os.rename(self.directory / name, self.directory / entry)
                except FileNotFoundError:
                    continue  # another process revived it
                revived += 1
        return revived

    def depth(self) -> int:
        """Entries waiting to be sent (set-aside ones not counted)."""
        try:
            return sum(1 for name in os.listdir(self.directory) if not name.startswith("."))
        except FileNotFoundError:
            return 0

    def set_aside_count(self) -> int:
        """Entries set aside (refused for good, or unreadable) for now."""
        try:
            return sum(1 for name in os.listdir(self.directory)
                       if name.startswith((FAILED_PREFIX, ".bad-")))
        except FileNotFoundError:
            return 0

    def _is_pending(self, name: str, changed_at: float) -> bool:
        if name.startswith("."):
            return False  # temp files and set-aside entries
        if name.endswith(".json"):
            return True
        claim = _CLAIM.fullmatch(name)
        return claim is not None and self._claim_is_stale(int(claim["pid"]), changed_at)

    def _claim_is_stale(self, pid: int, claimed_at: float) -> bool:
        # Our own pid: the flush lock is held, so nothing of ours is in flight; it is a
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
