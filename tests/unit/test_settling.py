"""A sandbox whose server is not ready at its reply settles: it stays off the board from its
call's release until the server's word (a node server's next Worker, a fork server's
preload), then goes back, frozen if its function holds code; one that never answers while
it takes no call is given up."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until

from nanogrid.runners import freezer
from nanogrid.runners.base import Sandbox
from nanogrid.runners.freezer import IdleFreezer


class Client:
    """A server's client whose word is a byte on one end of a socket pair."""

    def __init__(self, *, ready_at_reply: bool, busy_until_ready: bool) -> None:
        self.ready_at_reply, self.busy_until_ready = ready_at_reply, busy_until_ready
        self.preloaded: dict | None = None
        self.server, self._sock = socket.socketpair()
        self.took = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def take_ready(self) -> bool:
        self.took += 1
        return self._sock.recv(1) == b"W"

    def close(self) -> None:
        self.server.close()
        self._sock.close()


class Freezer:
    def __init__(self) -> None:
        self.frozen = 0
        self.directory = Path("/nonexistent/sandbox")

    def freeze(self) -> None:
        self.frozen += 1


@pytest.fixture
def idle() -> Iterator[tuple[IdleFreezer, list[Sandbox]]]:
    settled: list[Sandbox] = []
    watcher = IdleFreezer(settled.append)
    yield watcher, settled
    watcher.close()


def rested(watcher: IdleFreezer, tmp_path: Path, files: list[str], *, busy: bool
           ) -> tuple[Sandbox, Client, Freezer]:
    """A sandbox holding ``files`` (the first its main) after a run whose server is not
    ready at its reply (``busy``: it takes no call until it is), as the run leaves it."""
    for name in files:
        (tmp_path / name).write_text("")
    box = Sandbox(runtime="python", name="python-w0-0", code_dir=tmp_path, code_key="f@1")
    client, cold = Client(ready_at_reply=False, busy_until_ready=busy), Freezer()
    assert watcher.rest(box, cold, client, files[0])  # type: ignore[arg-type]
    return box, client, cold


def test_a_preloading_server_settles_from_the_release_until_its_word_even_holding_no_code(
    idle: tuple[IdleFreezer, list[Sandbox]], tmp_path: Path
) -> None:
    watcher, settled = idle
    box, client, cold = rested(watcher, tmp_path, ["main.py"], busy=True)
    assert box.settling
    client.server.send(b"W")
    threading.Event().wait(0.1)
    assert settled == [] and client.took == 0  # not watched before its call released it
    watcher.settle(box)
    wait_until(lambda: settled == [box], timeout=2, what="the sandbox to settle")
    assert not box.settling and box.healthy and client.took == 1
    assert cold.frozen == 0 and not box.frozen  # nothing of its function to hold still
    client.close()


def test_a_settling_sandbox_whose_function_holds_code_is_frozen_once_ready(
    idle: tuple[IdleFreezer, list[Sandbox]], tmp_path: Path
) -> None:
    watcher, settled = idle
    box, client, cold = rested(watcher, tmp_path, ["main.py", "lib.py"], busy=True)
    watcher.settle(box)
    client.server.send(b"W")
    wait_until(lambda: settled == [box], timeout=2, what="the sandbox to settle")
    assert cold.frozen == 1 and box.frozen and box.healthy
    client.close()


@pytest.mark.parametrize(("files", "busy", "kept"), [
    (["main.py"], True, False),  # a fork server that never gave its preload's account
    (["main.js", "lib.js"], False, True),  # a node server late with its Worker: frozen anyway
])
def test_a_server_that_never_answers_is_given_up_only_when_it_takes_no_call(
    idle: tuple[IdleFreezer, list[Sandbox]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    files: list[str], busy: bool, kept: bool,
) -> None:
    monkeypatch.setattr(freezer, "PRELOAD_WAIT_S", 0.2)
    monkeypatch.setattr(freezer, "SETTLE_WAIT_S", 0.2)
    watcher, settled = idle
    box, client, cold = rested(watcher, tmp_path, files, busy=busy)
    watcher.settle(box)
    wait_until(lambda: settled == [box], timeout=2, what="the deadline")
    assert box.healthy is kept and box.frozen is kept and client.took == 0
    client.close()


def test_a_node_server_holding_no_code_does_not_settle(
    idle: tuple[IdleFreezer, list[Sandbox]], tmp_path: Path
) -> None:
    watcher, _ = idle
    box, client, _ = rested(watcher, tmp_path, ["main.js"], busy=False)
    assert not box.settling
    client.close()


def test_a_sandbox_run_again_before_its_release_does_not_settle(
    idle: tuple[IdleFreezer, list[Sandbox]], tmp_path: Path
) -> None:
    """Its client takes the server's word on the way into the next run."""
    watcher, settled = idle
    box, client, _ = rested(watcher, tmp_path, ["main.py"], busy=True)
    watcher.resume(box)
    assert not box.settling
    watcher.settle(box)  # the release after that run, which asked for no settling
    client.server.send(b"W")
    threading.Event().wait(0.2)
    assert settled == [] and client.took == 0
    client.close()
