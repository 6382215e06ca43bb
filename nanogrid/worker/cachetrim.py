"""Keeping the code cache (codestore.py) within its bounds, off the calls' path: after a
download, the least recently used zips go once the cache is over ``max_cache_bytes``, in a
thread of its own (the scan is ~10 ms per 1,000 cached zips); when the disk runs short, every
zip unused for a while goes (``trim``). A zip used within ``EVICT_GRACE_SECONDS`` is never
evicted: another worker of the host may be about to unpack it. Stale partial downloads and
``.etag-*`` files go with the scans."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from loguru import logger

EVICT_GRACE_SECONDS = 300.0
"""A cached zip used this recently is kept even over the size budget (it may be unpacking)."""
TRIM_GRACE_SECONDS = 30.0
"""When the disk runs short, zips unused this long go whatever the cache's size."""
STALE_PART_SECONDS = 3600.0
"""Temp files of downloads this old were left by a crashed process and are removed."""
KNOWN_ETAG_SECONDS = 86400.0
"""A key's ``.etag-*`` file not confirmed this long is removed (its next fetch is a GET)."""


class CacheTrimmer:
    """The bounds of one code cache directory."""

    def __init__(self, cache_dir: Path, max_cache_bytes: int) -> None:
        self.cache_dir = cache_dir
        self.max_cache_bytes = max_cache_bytes
        self._lock = threading.Lock()
        self._trimming = False
        self._again = False

    def trim(self) -> int:
        """The disk runs short: remove every cached zip not used within the last
        ``TRIM_GRACE_SECONDS`` (a sandbox holds its code unpacked; a zip is needed again only
        for a new sandbox, and then downloaded again). Returns the bytes freed."""
        now = time.time()
        freed = 0
        for mtime, size, path in self.zips():
            if now - mtime >= TRIM_GRACE_SECONDS:
                path.unlink(missing_ok=True)
                freed += size
        if freed:
            logger.warning(f"[DISK] removed {freed // 2**20} MB of cached code zips to free space")
        return freed

    def soon(self) -> None:
        """After a download: trim the cache in a thread of its own, one trim at a time (one
        asked for while another runs makes it run once more)."""
        with self._lock:
            self._again = self._trimming
            if self._trimming:
                return
            self._trimming = True
        threading.Thread(target=self._evict_while_asked, name="code-cache-trim",
                         daemon=True).start()

    def _evict_while_asked(self) -> None:
        while True:
            try:
                self._evict()
            except OSError as exc:  # the next download tries again
                logger.warning(f"[CODE] cannot trim the code cache {self.cache_dir}: {exc}")
            with self._lock:
                if not self._again:
                    self._trimming = False
                    return
                self._again = False

    def _evict(self) -> None:
        """Delete least recently used zips until the cache fits ``max_cache_bytes`` (the
        newest is used last: its mtime keeps it)."""
        now = time.time()
        entries = self.zips()
        total = sum(size for _, size, _ in entries)
        for mtime, size, path in sorted(entries):
            if total <= self.max_cache_bytes:
                break
            if now - mtime < EVICT_GRACE_SECONDS:
                continue
            path.unlink(missing_ok=True)
            total -= size

    def zips(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of each cached zip; stale partial downloads are removed."""
        now = time.time()
        entries = []
        for entry in os.scandir(self.cache_dir):
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if entry.name.startswith(".part-"):
                if now - st.st_mtime > STALE_PART_SECONDS:
                    Path(entry.path).unlink(missing_ok=True)
                continue
            if entry.name.startswith(".etag-"):
                if now - st.st_mtime > KNOWN_ETAG_SECONDS:
                    Path(entry.path).unlink(missing_ok=True)
                continue
            if entry.name.endswith(".zip"):
                entries.append((st.st_mtime, st.st_size, Path(entry.path)))
        return entries
