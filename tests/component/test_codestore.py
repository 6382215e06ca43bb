"""CodeStore against a real moto_server through boto3: caching by ETag, error translation,
and trimming when the disk runs short."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError
from botocore.stub import Stubber
from helpers import wait_until

from nanogrid.common.config import LimitsConfig
from nanogrid.common.errors import CodeNotFound, CorruptCodePackage, InvalidCodePackage
from nanogrid.worker import cachetrim, unpack
from nanogrid.worker.codestore import CodePackage, CodeStore
from nanogrid.worker.diskspace import DiskGuard

KEY = "functions/hello-python/v1.zip"


def code_zip(text: str = "print('hello')\n", padding: int = 0) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("main.py", text)
        if padding:
            zf.writestr("pad.bin", b"\0" * padding)
    return buf.getvalue()


class CountedClient:
    """A real boto3 S3 client plus a count of the API calls it made (via botocore events)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: Counter[str] = Counter()
        client.meta.events.register("before-call.s3.*", self._count)

    def _count(self, model: Any, **_: Any) -> None:
        self.calls[model.name] += 1


@pytest.fixture
def bucket(aws: Any) -> str:
    return aws.new_bucket("code")


def fresh_client() -> Any:
    """A new client per test: ``aws.s3()`` is shared, and these tests register event hooks."""
    return boto3.session.Session().client("s3")


@pytest.fixture
def s3(aws: Any) -> CountedClient:
    return CountedClient(fresh_client())


def make_store(tmp_path: Path, s3: CountedClient, **kw: Any) -> CodeStore:
    kw.setdefault("head_ttl_seconds", 0.0)
    return CodeStore(tmp_path / "cache", kw.pop("max_zip_bytes", 1 << 20), s3.client, **kw)


def test_second_fetch_uses_cache_without_get(
    tmp_path: Path, s3: CountedClient, bucket: str
) -> None:
    body = code_zip()
    s3.client.put_object(Bucket=bucket, Key=KEY, Body=body)
    store = make_store(tmp_path, s3)

    first = store.fetch(bucket, KEY)
    assert first.downloaded and first.size == len(body)
    assert first.zip_path.read_bytes() == body
    assert first.zip_path.parent == tmp_path / "cache"
    assert s3.calls["GetObject"] == 1

    assert s3.calls["HeadObject"] == 0  # new to the host: one GET, its ETag names the zip

    second = store.fetch(bucket, KEY)
    assert not second.downloaded
    assert (second.zip_path, second.etag, second.version_key) == (
        first.zip_path,
        first.etag,
        first.version_key,
    )
    assert s3.calls["GetObject"] == 1
    assert s3.calls["HeadObject"] == 1
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.suffix == ".zip"] == [
        first.zip_path.name]


def test_the_cache_holding_every_functions_code_is_closed_to_sandboxes(
    tmp_path: Path, s3: CountedClient
) -> None:
    (tmp_path / "cache").mkdir(mode=0o755)  # e.g. made by an earlier version
    make_store(tmp_path, s3)
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700


def test_cache_survives_a_new_store_on_the_same_dir(
    tmp_path: Path, s3: CountedClient, bucket: str
) -> None:
    s3.client.put_object(Bucket=bucket, Key=KEY, Body=code_zip())
    make_store(tmp_path, s3).fetch(bucket, KEY)
    again = make_store(tmp_path, s3).fetch(bucket, KEY)  # e.g. a restarted worker
    assert not again.downloaded
    assert (s3.calls["HeadObject"], s3.calls["GetObject"]) == (1, 1)


def test_an_etag_another_worker_had_within_the_ttl_is_trusted(
    tmp_path: Path, s3: CountedClient, bucket: str
) -> None:
    """Workers share the cache directory: what S3 told one of them within head_ttl_seconds
    serves another's call with no S3 round trip; past it, a HEAD asks again."""
    s3.client.put_object(Bucket=bucket, Key=KEY, Body=code_zip())
    first = make_store(tmp_path, s3, head_ttl_seconds=0.5).fetch(bucket, KEY)
    other = make_store(tmp_path, s3, head_ttl_seconds=0.5)  # another worker of the host
    assert other.fetch(bucket, KEY).zip_path == first.zip_path
    assert (s3.calls["HeadObject"], s3.calls["GetObject"]) == (0, 1)
    time.sleep(0.6)
    assert not other.fetch(bucket, KEY).downloaded
    assert (s3.calls["HeadObject"], s3.calls["GetObject"]) == (1, 1)


def test_reupload_with_new_etag_is_downloaded_again(
    tmp_path: Path, s3: CountedClient, bucket: str
) -> None:
    store = make_store(tmp_path, s3)
    s3.client.put_object(Bucket=bucket, Key=KEY, Body=code_zip("print(1)\n"))
    old = store.fetch(bucket, KEY)
    s3.client.put_object(Bucket=bucket, Key=KEY, Body=code_zip("print(2)\n"))
    new = store.fetch(bucket, KEY)
    assert new.downloaded and new.etag != old.etag
    assert new.version_key != old.version_key and new.zip_path != old.zip_path
    assert b"print(2)" in new.zip_path.read_bytes()
    assert s3.calls["GetObject"] == 2


def test_burst_within_head_ttl_makes_no_s3_call(
    tmp_path: Path, s3: CountedClient, bucket: str
) -> None:
    s3.client.put_object(Bucket=bucket, Key=KEY, Body=code_zip())
    store = make_store(tmp_path, s3, head_ttl_seconds=0.5)
    store.fetch(bucket, KEY)
    for _ in range(20):
        assert not store.fetch(bucket, KEY).downloaded
    assert (s3.calls["HeadObject"], s3.calls["GetObject"]) == (0, 1)
    time.sleep(0.6)
    store.fetch(bucket, KEY)
    assert s3.calls["HeadObject"] == 1


def fetch_at_once(store: CodeStore, bucket: str, key: str, runs: int) -> list[Any]:
    """``runs`` threads fetching ``key`` at the same moment: each one's package or error."""
    start = threading.Barrier(runs)
    outcomes: list[Any] = [None] * runs

    def one(i: int) -> None:
        start.wait()
        try:
            outcomes[i] = store.fetch(bucket, key)
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            outcomes[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    return outcomes


def test_a_burst_of_first_runs_makes_one_get(
    tmp_path: Path, s3: CountedClient, bucket: str
) -> None:
    s3.client.put_object(Bucket=bucket, Key=KEY, Body=code_zip())
    store = make_store(tmp_path, s3, head_ttl_seconds=1.0)
    packages = fetch_at_once(store, bucket, KEY, 16)
    assert all(isinstance(p, CodePackage) for p in packages), packages
    assert len({p.zip_path for p in packages}) == 1
    assert sum(p.downloaded for p in packages) == 1
    assert (s3.calls["HeadObject"], s3.calls["GetObject"]) == (0, 1)


def test_a_failed_fetch_does_not_hold_up_the_others(
    tmp_path: Path, s3: CountedClient, bucket: str
) -> None:
    """Each run that waited on a fetch that failed tries in turn, and fails on its own."""
    store = make_store(tmp_path, s3, head_ttl_seconds=1.0)
    outcomes = fetch_at_once(store, bucket, "functions/missing.zip", 8)
    assert all(isinstance(o, CodeNotFound) for o in outcomes), outcomes
    s3.client.put_object(Bucket=bucket, Key="functions/missing.zip", Body=code_zip())
    assert store.fetch(bucket, "functions/missing.zip").downloaded


def test_a_slow_fetch_of_one_key_does_not_hold_up_another(
    tmp_path: Path, s3: CountedClient, bucket: str
) -> None:
    for key in ("functions/slow.zip", "functions/quick.zip"):
        s3.client.put_object(Bucket=bucket, Key=key, Body=code_zip())
    slowed = threading.Event()

    def slow_get(params: dict[str, Any], **_: Any) -> None:
        if params.get("Key") == "functions/slow.zip":
            slowed.set()
            time.sleep(3.0)

    s3.client.meta.events.register("provide-client-params.s3.GetObject", slow_get)
    store = make_store(tmp_path, s3, head_ttl_seconds=1.0)
    slow = threading.Thread(target=store.fetch, args=(bucket, "functions/slow.zip"))
    slow.start()
    assert slowed.wait(10)
    started = time.monotonic()
    store.fetch(bucket, "functions/quick.zip")
    assert time.monotonic() - started < 2.5  # the slow one's GET takes 3 s; a loaded moto ~1
    slow.join(10)


def test_fetched_zip_unpacks(tmp_path: Path, s3: CountedClient, bucket: str) -> None:
    s3.client.put_object(Bucket=bucket, Key=KEY, Body=code_zip("print('hi')\n"))
    package = make_store(tmp_path, s3).fetch(bucket, KEY)
    assert isinstance(package, CodePackage)
    assert unpack.extract(package.zip_path, tmp_path / "run", LimitsConfig()) == 1
    assert (tmp_path / "run/main.py").read_text() == "print('hi')\n"


def test_missing_key_is_code_not_found(tmp_path: Path, s3: CountedClient, bucket: str) -> None:
    with pytest.raises(CodeNotFound) as err:
        make_store(tmp_path, s3).fetch(bucket, "functions/nope/v1.zip")
    assert str(err.value) == f"code s3://{bucket}/functions/nope/v1.zip not found"
    assert err.value.retryable
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_bucket_is_code_not_found(tmp_path: Path, s3: CountedClient) -> None:
    missing = "no-such-bucket-for-nanogrid"
    with pytest.raises(CodeNotFound, match=rf"^code s3://{missing}/k.zip not found"):
        make_store(tmp_path, s3).fetch(missing, "k.zip")


def test_unreachable_endpoint_fails_fast(
    tmp_path: Path, aws: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store = CodeStore(tmp_path / "cache", 1 << 20)  # its own client, from the environment
    start = time.monotonic()
    with pytest.raises(CodeNotFound, match=r"^S3 unreachable: ") as err:
        store.fetch("bucket", KEY)
    assert time.monotonic() - start < 5
    assert f"127.0.0.1:{closed_port}" in str(err.value)
    assert "\n" not in str(err.value)


def test_client_is_created_lazily(tmp_path: Path, aws: Any, bucket: str) -> None:
    aws.s3().put_object(Bucket=bucket, Key=KEY, Body=code_zip())
    store = CodeStore(tmp_path / "cache", 1 << 20)
    assert store._client is None  # nothing to inherit across a fork
    assert store.fetch(bucket, KEY).downloaded
    assert store._client is not None


@pytest.mark.parametrize("known", [False, True], ids=["new to the host", "known"])
def test_oversize_zip_is_refused_by_its_length(
    tmp_path: Path, s3: CountedClient, bucket: str, known: bool
) -> None:
    """By the Content-Length of the GET (its body left unread) when the key is new to the
    host, else of the HEAD, with no GET."""
    store = make_store(tmp_path, s3, max_zip_bytes=4096)
    zips: list[str] = []
    if known:
        s3.client.put_object(Bucket=bucket, Key=KEY, Body=code_zip())
        zips.append(store.fetch(bucket, KEY).zip_path.name)
    s3.client.put_object(Bucket=bucket, Key=KEY, Body=code_zip(padding=5000))
    with pytest.raises(InvalidCodePackage, match=r"code zip s3://.* is larger than 4096 bytes"):
        store.fetch(bucket, KEY)
    assert (s3.calls["HeadObject"], s3.calls["GetObject"]) == (int(known), 1)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()
                  if not p.name.startswith(".etag-")) == zips


@pytest.mark.parametrize("known", [False, True], ids=["new to the host", "known"])
def test_download_stops_at_limit_even_if_s3_understates(
    tmp_path: Path, s3: CountedClient, bucket: str, known: bool
) -> None:
    store = make_store(tmp_path, s3, max_zip_bytes=1 << 20)
    zips: list[str] = []
    if known:
        s3.client.put_object(Bucket=bucket, Key=KEY, Body=code_zip())
        zips.append(store.fetch(bucket, KEY).zip_path.name)
    s3.client.put_object(Bucket=bucket, Key=KEY, Body=code_zip(padding=3 << 20))

    def lie(parsed: dict[str, Any], **_: Any) -> None:
        parsed["ContentLength"] = 100

    s3.client.meta.events.register("after-call.s3.HeadObject", lie)
    s3.client.meta.events.register("after-call.s3.GetObject", lie)
    with pytest.raises(InvalidCodePackage, match="larger than 1048576 bytes"):
        store.fetch(bucket, KEY)
    assert s3.calls["GetObject"] == 1 + int(known)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()
                  if not p.name.startswith(".etag-")) == zips  # no partial file left behind


def test_object_replaced_between_head_and_get(
    tmp_path: Path, s3: CountedClient, bucket: str
) -> None:
    """A HEAD gave a new ETag (the key is known to the host), and the GET pinned to it finds
    yet another version: the fetch fails as retryable, and nothing of it is cached."""
    s3.client.put_object(Bucket=bucket, Key=KEY, Body=code_zip("print(1)\n"))
    store = make_store(tmp_path, s3)
    first = store.fetch(bucket, KEY).zip_path.name
    s3.client.put_object(Bucket=bucket, Key=KEY, Body=code_zip("print(2)\n"))
    other = fresh_client()

    def replace_once(**_: Any) -> None:
        if s3.calls["GetObject"] == 2:
            other.put_object(Bucket=bucket, Key=KEY, Body=code_zip("print(3)\n"))

    s3.client.meta.events.register("before-call.s3.GetObject", replace_once)
    with pytest.raises(CodeNotFound, match="changed while it was being fetched"):
        store.fetch(bucket, KEY)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()
                  if not p.name.startswith(".etag-")) == [first]
    assert b"print(3)" in store.fetch(bucket, KEY).zip_path.read_bytes()  # the retry gets it


def test_cache_evicts_least_recently_used(
    tmp_path: Path, s3: CountedClient, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cachetrim, "EVICT_GRACE_SECONDS", 0.0)
    bodies = {name: code_zip(name, padding=10_000) for name in ("a", "b", "c")}
    for name, body in bodies.items():
        s3.client.put_object(Bucket=bucket, Key=f"{name}.zip", Body=body)
    store = make_store(tmp_path, s3, max_cache_bytes=int(len(bodies["a"]) * 2.5))

    a = store.fetch(bucket, "a.zip")
    time.sleep(0.02)
    b = store.fetch(bucket, "b.zip")
    time.sleep(0.02)
    assert not store.fetch(bucket, "a.zip").downloaded  # a is now more recent than b
    time.sleep(0.02)
    c = store.fetch(bucket, "c.zip")

    wait_until(lambda: not b.zip_path.exists(), timeout=5, what="the trim")  # in the background
    assert a.zip_path.exists() and c.zip_path.exists()
    assert store.fetch(bucket, "b.zip").downloaded


def test_a_download_does_not_wait_for_the_cache_to_be_trimmed(
    tmp_path: Path, s3: CountedClient, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trimming scans the whole cache directory (~10 ms per 1,000 cached zips): a new
    function's first call does not wait for it; the trim happens in the background."""
    monkeypatch.setattr(cachetrim, "EVICT_GRACE_SECONDS", 0.0)
    for name in ("a", "b"):
        s3.client.put_object(Bucket=bucket, Key=f"{name}.zip", Body=code_zip(name, 10_000))
    store = make_store(tmp_path, s3, max_cache_bytes=15_000)
    a = store.fetch(bucket, "a.zip")
    time.sleep(0.02)
    scan = store.trimmer.zips

    def slow_scan() -> list[tuple[float, int, Path]]:
        time.sleep(3.0)  # a cache of ~100,000 zips, slower still
        return scan()

    monkeypatch.setattr(store.trimmer, "zips", slow_scan)
    started = time.monotonic()
    b = store.fetch(bucket, "b.zip")
    assert time.monotonic() - started < 2.5 and b.zip_path.exists()  # a loaded moto: ~1 s
    wait_until(lambda: not a.zip_path.exists(), timeout=10, what="the trim")
    assert b.zip_path.exists()


def test_recently_used_zips_are_not_evicted(tmp_path: Path, s3: CountedClient, bucket: str) -> None:
    for name in ("a", "b"):
        s3.client.put_object(Bucket=bucket, Key=f"{name}.zip", Body=code_zip(name, 10_000))
    store = make_store(tmp_path, s3, max_cache_bytes=1)
    a = store.fetch(bucket, "a.zip")
    b = store.fetch(bucket, "b.zip")
    # Over budget, but another worker may be unpacking a right now.
    assert a.zip_path.exists() and b.zip_path.exists()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs: the code cache's disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_disk_running_short_trims_the_zips_unused_past_the_grace(
    small_disk: Path, s3: CountedClient, bucket: str
) -> None:
    """Two 3 MiB zips leave 2 MiB of 8 free, under paths.min_free_mb (4): the disk guard
    trims the cache. A zip used within TRIM_GRACE_SECONDS stays (a sandbox may be about to
    unpack it); one last used a minute ago goes, and then the disk has room."""
    for name in ("old", "new"):
        s3.client.put_object(Bucket=bucket, Key=f"{name}.zip", Body=code_zip(name, 3 * 2**20))
    store = CodeStore(small_disk / "cache", 4 * 2**20, s3.client, head_ttl_seconds=0.0)
    guard = DiskGuard([small_disk / "cache"], min_free_mb=4, freers=(store.trim,))
    old, new = store.fetch(bucket, "old.zip"), store.fetch(bucket, "new.zip")
    short = guard.trouble()
    assert short is not None and "under paths.min_free_mb (4 MB)" in short  # both in grace
    assert old.zip_path.exists() and new.zip_path.exists()

    last_used = time.time() - 2 * cachetrim.TRIM_GRACE_SECONDS
    os.utime(old.zip_path, (last_used, last_used))  # the mtime is the last use
    assert guard.trouble() is None
    assert not old.zip_path.exists() and new.zip_path.exists()
    assert store.fetch(bucket, "old.zip").downloaded  # needed again: fetched again


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("AccessDenied", 403, r"^code s3://b/k.zip not found \(access denied\)$"),
        ("NoSuchKey", 404, r"^code s3://b/k.zip not found$"),
        ("NoSuchBucket", 404, r"^code s3://b/k.zip not found \(no such bucket\)$"),
        ("SlowDown", 503, r"^S3 error fetching s3://b/k.zip: SlowDown"),
    ],
)
def test_s3_errors_become_code_not_found(
    tmp_path: Path, code: str, status: int, expected: str
) -> None:
    client = boto3.session.Session().client("s3", region_name="ap-northeast-2")
    with Stubber(client) as stub:
        stub.add_client_error("get_object", code, "msg", status)
        with pytest.raises(CodeNotFound, match=expected):
            CodeStore(tmp_path, 1 << 20, client).fetch("b", "k.zip")


@pytest.mark.parametrize(
    "exc",
    [
        ReadTimeoutError(endpoint_url="http://s3.example/b/k.zip"),
        ConnectTimeoutError(endpoint_url="http://s3.example/b/k.zip"),
        EndpointConnectionError(endpoint_url="http://s3.example/b/k.zip"),
    ],
)
def test_timeouts_become_s3_unreachable(tmp_path: Path, exc: Exception) -> None:
    client = boto3.session.Session().client("s3", region_name="ap-northeast-2")

    def fail(**_: Any) -> None:
        raise exc

    client.meta.events.register("before-call.s3.GetObject", fail)
    with pytest.raises(CodeNotFound, match=r"^S3 unreachable: .*s3\.example"):
        CodeStore(tmp_path, 1 << 20, client).fetch("b", "k.zip")


def test_a_damaged_cached_zip_is_downloaded_again(
    tmp_path: Path, s3: CountedClient, bucket: str
) -> None:
    s3.client.put_object(Bucket=bucket, Key=KEY, Body=code_zip())
    store = make_store(tmp_path, s3)
    store.fetch(bucket, KEY)
    cached = store.fetch(bucket, KEY)
    assert not cached.downloaded
    cached.zip_path.write_bytes(cached.zip_path.read_bytes()[:40])  # what a crash can leave
    with pytest.raises(CorruptCodePackage):
        unpack.extract(cached.zip_path, tmp_path / "broken", LimitsConfig())
    missing: list[float] = []
    done = threading.Event()

    def watch() -> None:  # a call of another thread about to unpack the same zip
        while not done.is_set():
            if not cached.zip_path.exists():
                missing.append(time.monotonic())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        again = store.download_again(cached)
    finally:
        done.set()
        watcher.join()
    assert missing == []  # replaced by a rename, never removed first
    assert again.downloaded and again.zip_path == cached.zip_path
    assert unpack.extract(again.zip_path, tmp_path / "whole", LimitsConfig()) == 1
    assert s3.calls["GetObject"] == 2
