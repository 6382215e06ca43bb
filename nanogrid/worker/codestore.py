"""Function code zips from S3, cached on local disk by bucket, key and ETag.

The first fetch of a key on this host is one GET: the response's ETag names the cached zip.
Later a fetch is a HEAD to learn the object's current ETag, then a GET only when no zip with
that ETag is cached yet; so a function invoked again costs one HEAD and no download, and a
re-upload under the same key (new ETag) is picked up at once. The last ETag S3 gave for a
key is kept beside the zips (``.etag-*`` files, for every worker of the host; their mtime is
when S3 last said so), and in memory. For bursts, an ETag S3 gave within ``head_ttl_seconds``
(default 1 s) is trusted: a cached zip is served with no S3 round trip at all, at the price
of seeing a re-upload up to that much later. A fetch that finds another thread's fetch of
the same key under way waits for it and then takes its answer from that memo, instead of
making the same HEAD and GET again: a burst's first runs of a function make one each, not
one per run (16 runs at once took 180-330 ms in their HEADs and GETs through one client's
connections).

Downloads stream into a temp file in the cache directory with a byte budget (a lying or
absent Content-Length cannot fill the disk), are pinned to the HEAD's ETag with
``If-Match`` when there was one, and renamed into place, so no reader sees a partial file.
They are not fsynced (0.4-0.9 ms of a new function's first call): a zip the host lost part
of in a crash, or damaged since, is found corrupt when it is unpacked and downloaded again
(``download_again``, invoke.py), as any cache can be rebuilt. The cache is trimmed to
``max_cache_bytes`` by least recent use (file mtime, touched on every hit), in the
background after a download (cachetrim.py). Several worker processes may share the
directory: every write is an atomic rename.

botocore errors end here: missing objects, denied access and an unreachable or failing S3
become ``CodeNotFound`` (retryable), an oversized zip ``InvalidCodePackage``. Faults of this
host become ``HostFault`` (retryable, maybe on another host): a transfer cut off mid-body (a
TLS or connection reset, a read timeout) and a cache directory that is full or failing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3.exceptions
from botocore.exceptions import BotoCoreError, ClientError
from loguru import logger

from nanogrid.common import awsclient
from nanogrid.common.errors import CodeNotFound, HostFault, InvalidCodePackage, host_fault

from .cachetrim import CacheTrimmer

GiB = 2**30
CHUNK = 256 * 1024
_MAX_HEAD_MEMO = 1024
_MISSING = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_CHANGED = {"PreconditionFailed", "412"}
_CUT_OFF = (BotoCoreError, urllib3.exceptions.HTTPError, OSError)
"""What reading a response body raises when the transfer breaks (botocore wraps most as
ResponseStreamingError or ReadTimeoutError; a reset socket can surface as an OSError)."""


@dataclass(frozen=True)
class CodePackage:
    """One version of a function's code zip, present in the local cache."""

    bucket: str
    key: str
    etag: str
    zip_path: Path
    size: int
    downloaded: bool
    """False when served from the cache."""

    @property
    def version_key(self) -> str:
        """Stable id of bucket+key+ETag: hex, so also safe as a file or directory name."""
        return version_key(self.bucket, self.key, self.etag)


def version_key(bucket: str, key: str, etag: str) -> str:
    return hashlib.sha256(f"{bucket}\0{key}\0{etag}".encode()).hexdigest()


class CodeStore:
    """Fetches code zips into ``cache_dir``; create it in the process that uses it."""

    def __init__(
        self,
        cache_dir: Path,
        max_zip_bytes: int,
        s3_client: Any = None,
        *,
        head_ttl_seconds: float = 1.0,
        max_cache_bytes: int = 1 * GiB,
        region: str | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.region = region
        self.max_zip_bytes = max_zip_bytes
        self.head_ttl_seconds = head_ttl_seconds
        self._client = s3_client
        self._client_pid: int | None = None  # set when this store created the client itself
        self._heads: dict[tuple[str, str], tuple[str, float]] = {}
        self._under_way: dict[tuple[str, str], threading.Event] = {}
        """Fetches that are making their S3 calls, by (bucket, key): set when done."""
        self._under_way_lock = threading.Lock()
        self.trimmer = CacheTrimmer(self.cache_dir, max_cache_bytes)
        self.errors = 0
        """S3 calls that failed for S3's sake (not a missing or forbidden object): /metrics."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # Every function's zip is here: no sandbox user may list or read it.
        os.chmod(self.cache_dir, 0o700)

    @property
    def s3(self) -> Any:
        """The S3 client, created on first use so that it belongs to the process using it.

        A client this store created is re-created in a forked child; a given one is kept.
        """
        if self._client is None or (self._client_pid and self._client_pid != os.getpid()):
            # Only timeouts: retries stay with boto3's own chain (env, config file).
            self._client = awsclient.client("s3", self.region, connect_timeout=5, read_timeout=30)
            self._client_pid = os.getpid()
        return self._client

    def fetch(self, bucket: str, key: str) -> CodePackage:
        """Return the current version of s3://bucket/key from the cache, downloading if needed."""
        while True:
            remembered = self._remembered(bucket, key)
            if remembered is not None:
                return remembered
            with self._under_way_lock:
                other = self._under_way.get((bucket, key))
                if other is None:
                    mine = self._under_way[(bucket, key)] = threading.Event()
                    break
            other.wait()  # then its answer is remembered (or it failed: try in turn)
        try:
            return self._fetch(bucket, key)
        finally:
            with self._under_way_lock:
                del self._under_way[(bucket, key)]
            mine.set()

    def _remembered(self, bucket: str, key: str) -> CodePackage | None:
        """The cached zip of the ETag S3 gave within ``head_ttl_seconds`` (to this worker, or
        to another of the host), if any."""
        remembered = self._heads.get((bucket, key))
        if remembered and time.monotonic() - remembered[1] < self.head_ttl_seconds:
            return self._cached(bucket, key, remembered[0])
        known = self._known_etag(bucket, key)
        if known is None:
            return None
        etag, age = known[0], time.time() - known[1]
        if not 0 <= age < self.head_ttl_seconds:
            return None
        cached = self._cached(bucket, key, etag)
        if cached is not None:  # trusted here too for the rest of its time
            self._heads[(bucket, key)] = (etag, time.monotonic() - age)
        return cached

    def _fetch(self, bucket: str, key: str) -> CodePackage:
        known = self._known_etag(bucket, key)
        if known is None:  # new to this host: no zip of it to check
            return self._download_current(bucket, key, known=None)
        etag, quoted, length = self._head(bucket, key)
        self._remember(bucket, key, etag, known=known[0])
        cached = self._cached(bucket, key, etag)
        if cached:
            return cached
        if length > self.max_zip_bytes:
            raise self._too_large(bucket, key)
        path, size, _ = self._download(bucket, key, quoted)
        self.trimmer.soon()
        return CodePackage(bucket, key, etag, path, size, downloaded=True)

    def _head(self, bucket: str, key: str) -> tuple[str, str, int]:
        try:
            head = self.s3.head_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise self._failed(exc, bucket, key) from None
        quoted = head.get("ETag") or ""
        return quoted.strip('"'), quoted, int(head.get("ContentLength") or 0)

    def _remember(self, bucket: str, key: str, etag: str, *, known: str | None) -> None:
        """S3 just gave ``etag`` for the key: remembered here and for the host's workers
        (``known``: the ETag they had for it before, read by this fetch)."""
        now = time.monotonic()
        if len(self._heads) >= _MAX_HEAD_MEMO:
            self._heads = {
                k: v for k, v in self._heads.items() if now - v[1] < self.head_ttl_seconds
            }
        self._heads[(bucket, key)] = (etag, now)
        path = self._known_etag_path(bucket, key)
        with contextlib.suppress(OSError):  # without it the next fetch GETs instead of a HEAD
            if known == etag:
                os.utime(path)
            else:
                part = path.with_name(f".part-{uuid.uuid4().hex}")
                part.write_text(etag)
                os.replace(part, path)

    def _known_etag_path(self, bucket: str, key: str) -> Path:
        name = hashlib.sha256(f"{bucket}\0{key}".encode()).hexdigest()
        return self.cache_dir / f".etag-{name}"

    def _known_etag(self, bucket: str, key: str) -> tuple[str, float] | None:
        """The last ETag S3 gave this host's workers for the key, and when (epoch s)."""
        path = self._known_etag_path(bucket, key)
        try:
            return path.read_text(), path.stat().st_mtime
        except OSError:
            return None

    def _path(self, bucket: str, key: str, etag: str) -> Path:
        return self.cache_dir / f"{version_key(bucket, key, etag)}.zip"

    def _cached(self, bucket: str, key: str, etag: str) -> CodePackage | None:
        path = self._path(bucket, key, etag)
        try:
            os.utime(path)  # mtime is the LRU clock (atime is unreliable under noatime)
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        return CodePackage(bucket, key, etag, path, size, downloaded=False)

    def _download(self, bucket: str, key: str, quoted_etag: str | None
                  ) -> tuple[Path, int, str]:
        """GET the object (pinned to the HEAD's ETag, when there was a HEAD) into the cache;
        return its path, size and ETag."""
        try:
            fd, tmp_name = tempfile.mkstemp(dir=self.cache_dir, prefix=".part-", suffix=".zip")
        except OSError as exc:
            raise self._host_fault(exc) from None
        tmp = Path(tmp_name)
        try:
            with open(fd, "wb") as out:
                size, quoted = self._stream_into(out, bucket, key, quoted_etag)
            etag = quoted.strip('"')
            final = self._path(bucket, key, etag)
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self._host_fault(exc) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return final, size, etag

    def _host_fault(self, exc: OSError) -> OSError | HostFault:
        """A cache-directory error as a HostFault when it is the host's (full, failing)."""
        return host_fault(exc, f"code cache {self.cache_dir}") or exc

    def _stream_into(self, out: Any, bucket: str, key: str, quoted_etag: str | None
                     ) -> tuple[int, str]:
        """The object's bytes into ``out``; returns their size and the object's ETag."""
        kwargs = {"IfMatch": quoted_etag} if quoted_etag else {}
        size = 0
        try:
            response = self.s3.get_object(Bucket=bucket, Key=key, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._failed(exc, bucket, key) from None
        body = response["Body"]
        with contextlib.closing(body):
            if int(response.get("ContentLength") or 0) > self.max_zip_bytes:
                raise self._too_large(bucket, key)  # closed unread
            while True:
                try:
                    chunk = body.read(CHUNK)
                except _CUT_OFF as exc:
                    raise HostFault(
                        f"download of s3://{bucket}/{key} cut off after {size} bytes: "
                        f"{_line(str(exc)) or type(exc).__name__}"
                    ) from None
                if not chunk:
                    return size, quoted_etag or response.get("ETag") or ""
                size += len(chunk)
                if size > self.max_zip_bytes:
                    raise self._too_large(bucket, key)
                out.write(chunk)

    def download_again(self, package: CodePackage) -> CodePackage:
        """``package`` came from the cache and cannot be read: download the object again (its
        current version). The download replaces the damaged zip by a rename, so a call of
        another thread that is about to unpack it finds one or the other, never none."""
        bucket, key = package.bucket, package.key
        logger.warning(f"[CODE] cached zip of s3://{bucket}/{key} is damaged; "
                       "downloading it again")
        return self._download_current(bucket, key, known=package.etag)

    def _download_current(self, bucket: str, key: str, *, known: str | None) -> CodePackage:
        """GET the object's current version (no HEAD first) into the cache and remember its
        ETag (``known``: the one this host had before); the cache is trimmed after."""
        path, size, etag = self._download(bucket, key, None)
        self._remember(bucket, key, etag, known=known)
        self.trimmer.soon()
        return CodePackage(bucket, key, etag, path, size, downloaded=True)

    def trim(self) -> int:
        """The disk runs short: see ``CacheTrimmer.trim``. Returns the bytes freed."""
        return self.trimmer.trim()

    def _too_large(self, bucket: str, key: str) -> InvalidCodePackage:
        return InvalidCodePackage(
            f"code zip s3://{bucket}/{key} is larger than {self.max_zip_bytes} bytes"
        )

    def _failed(self, exc: ClientError | BotoCoreError, bucket: str, key: str) -> CodeNotFound:
        """``exc`` translated; counted when it was S3's trouble, not the object's."""
        code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
        if str(code) not in _MISSING | _DENIED | _CHANGED:
            self.errors += 1
        return self._translate(exc, bucket, key)

    @staticmethod
    def _translate(exc: Exception, bucket: str, key: str) -> CodeNotFound:
        where = f"s3://{bucket}/{key}"
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
            code = str(err.get("Code") or status)
            if code == "NoSuchBucket":
                return CodeNotFound(f"code {where} not found (no such bucket)")
            if code in _MISSING:
                return CodeNotFound(f"code {where} not found")
            if code in _DENIED:
                return CodeNotFound(f"code {where} not found (access denied)")
            if code in _CHANGED:
                return CodeNotFound(f"code {where} changed while it was being fetched")
            message = _line(str(err.get("Message") or ""))
            return CodeNotFound(f"S3 error fetching {where}: {code} {message}".rstrip())
        if isinstance(exc, awsclient.UNREACHABLE):
            return CodeNotFound(f"S3 unreachable: {_line(str(exc))}")
        return CodeNotFound(f"S3 request for {where} failed: {_line(str(exc))}")


def _line(text: str) -> str:
    return " ".join(text.split())
