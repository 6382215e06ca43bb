"""sd_notify against a bound datagram socket: a path, an abstract '@' address, or none."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nanogrid.supervisor import sdnotify


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    if request.param == "path":
        address = bind = str(tmp_path / "notify.sock")
    else:
        address = f"@nanogrid-test-{uuid.uuid4().hex}"
        bind = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(bind)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        yield sock


def test_ready_with_status(notify_socket: socket.socket) -> None:
    assert sdnotify.ready("2/2 workers alive")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=2/2 workers alive"


def test_reloading_carries_monotonic_usec_in_the_same_datagram(
        notify_socket: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = notify_socket.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_stopping_watchdog_and_status(notify_socket: socket.socket) -> None:
    assert sdnotify.stopping() and sdnotify.watchdog() and sdnotify.status("draining")
    assert [notify_socket.recv(4096) for _ in range(3)] == [
        b"STOPPING=1", b"WATCHDOG=1", b"STATUS=draining"]


def test_a_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.ready("x")
    assert not sdnotify.watchdog()


def test_an_unreachable_socket_is_not_fatal(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not sdnotify.stopping()


@pytest.mark.parametrize(("usec", "pid", "interval"), [
    ("10000000", None, 5.0),
    ("10000000", "self", 5.0),
    ("10000000", "1", None),
    ("0", None, None),
    (None, None, None),
])
def test_watchdog_interval_is_half_of_watchdog_usec(
        monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None,
        interval: float | None) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert sdnotify.watchdog_interval() == interval
