"""The fork server's namespace setup degrades instead of dying where a host refuses part of
it (e.g. a container that may unshare but not mount, or lacks CAP_NET_ADMIN)."""

from __future__ import annotations

import ctypes
import errno
import json
import os

import pytest

from nanogrid.runners.forkserver import clone, sandbox

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
        holds, missing = sandbox.isolate(SETTINGS, True)
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
        holds, missing = sandbox.isolate(SETTINGS, True)
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
        holds, missing = sandbox.isolate({**SETTINGS, "cover": ["/var", "/run/lock"]}, True)
        return {"holds": holds, "missing": missing, "lock": os.statvfs("/run/lock").f_flag & 1}

    report = in_child(check)
    assert {"mount", "ipc", "network", "pid"} <= set(report["holds"])
    assert report["missing"] == {
        "writable host paths": "cannot mount over /var (Permission denied)"}
    assert report["lock"] == 1  # ST_RDONLY: the other one is covered, read-only


def test_a_sandbox_whose_template_is_gone_exits_at_once() -> None:
    """Seen from a new PID namespace getppid() is 0 whoever the parent is: the template's
    pidfd tells a sandbox that its template died before it asked for the death signal."""
    gone = os.fork()
    if gone == 0:
        os._exit(0)
    parent_fd = os.pidfd_open(gone)
    os.waitpid(gone, 0)
    pid = os.fork()
    if pid == 0:
        sandbox.die_with_parent(os.getppid(), parent_fd)
        os._exit(3)  # still here: it would outlive its template
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    alive = os.pidfd_open(os.getpid())
    pid = os.fork()
    if pid == 0:
        sandbox.die_with_parent(os.getppid(), alive)
        os._exit(3)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 3
    os.close(parent_fd)
    os.close(alive)


def test_without_clone3_a_sandbox_is_still_born_pid_1_of_its_own_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """systemd's RestrictNamespaces= refuses clone3 whole (ENOSYS): the server is then forked
    after an unshare of its PID namespace, and the template's next children are back in its
    own."""
    def no_clone3(flags: int, cgroup: int) -> int:
        ctypes.set_errno(errno.ENOSYS)
        return -1

    monkeypatch.setattr(clone, "_clone3", no_clone3)

    def born(flags: int) -> int:
        read_fd, write_fd = os.pipe()
        pid = clone.fork_into(None, flags)[0]
        if pid == 0:
            os.write(write_fd, str(os.getpid()).encode())
            os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as reader:
            seen = int(reader.read())
        os.waitpid(pid, 0)
        return seen

    assert born(sandbox.CLONE_NEWPID) == 1 and born(sandbox.CLONE_NEWPID) == 1
    assert born(0) > 1  # a plain fork after them: in this process's namespace
