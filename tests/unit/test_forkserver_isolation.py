"""The fork server's namespace setup degrades instead of dying where a host refuses part of
it (e.g. a container that may unshare but not mount, or lacks CAP_NET_ADMIN)."""

from __future__ import annotations

import json
import os

import pytest

from nanogrid.runners.forkserver import sandbox

SETTINGS = {"tmpfs_mb": 8, "network": True, "root": None}


def in_child(check: object) -> dict:
    """Run ``check`` (which returns a JSON-able dict) in a forked child: namespaces die with it."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            os.write(write_fd, json.dumps(check()).encode())  # type: ignore[operator]
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
        data = reader.read()
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.fixture(autouse=True)
def as_root() -> None:
    assert os.geteuid() == 0, "these tests make namespaces: run them as root (as CI does)"


def test_a_refused_mount_leaves_the_server_in_the_hosts_mount_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refused(*args: object) -> None:
        raise OSError(1, "mount /: Operation not permitted")

    monkeypatch.setattr(sandbox, "mount", refused)

    host = os.readlink("/proc/self/ns/mnt")

    def check() -> dict:
        holds, missing = sandbox.isolate(SETTINGS)
        same = os.readlink("/proc/self/ns/mnt") == host
        return {"holds": holds, "missing": missing, "host_mounts": same}

    report = in_child(check)
    assert report["host_mounts"] is True
    assert "mount" not in report["holds"] and "network" in report["holds"]
    assert report["missing"]["mount"] == (
        "cannot mount in its namespace: mount /: Operation not permitted"
    )
    assert report["missing"]["pid"] == "needs the mount namespace"


def test_lo_that_cannot_come_up_keeps_the_network_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refused() -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(sandbox, "loopback_up", refused)

    host = os.readlink("/proc/self/ns/net")

    def check() -> dict:
        holds, missing = sandbox.isolate(SETTINGS)
        own = os.readlink("/proc/self/ns/net") != host
        return {"holds": holds, "missing": missing, "own_network": own}

    report = in_child(check)
    assert report["own_network"] is True and "network" in report["holds"]
    assert report["missing"] == {"loopback": "cannot bring up lo: Operation not permitted"}



def test_a_host_path_that_cannot_be_covered_is_named_and_the_rest_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One world-writable path the server cannot mount over (here refused, as a FUSE mount
    may) must not cost the sandbox its mount namespace: it is named, the rest holds."""
    real_mount = sandbox.mount

    def refuse_var(source: object, target: str, *args: object) -> None:
        if target == "/var":
            raise OSError(13, "Permission denied")
        real_mount(source, target, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(sandbox, "mount", refuse_var)

    def check() -> dict:
        holds, missing = sandbox.isolate({**SETTINGS, "cover": ["/var", "/run/lock"]})
        return {"holds": holds, "missing": missing, "lock": os.statvfs("/run/lock").f_flag & 1}

    report = in_child(check)
    assert {"mount", "ipc", "network", "pid"} <= set(report["holds"])
    assert report["missing"] == {
        "writable host paths": "cannot mount over /var (Permission denied)"}
    assert report["lock"] == 1  # ST_RDONLY: the other one is covered, read-only
