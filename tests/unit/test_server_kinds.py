"""The registry of in-sandbox servers (nanogrid/runners/sandbox_server.py): which server a
runtime's command gets, what each kind means to a runner, and the one client protocol both
servers' clients speak (nanogrid/runners/sandboxclient.py)."""

from __future__ import annotations

import array
import inspect
import json
import os
import socket
import threading
from pathlib import Path

import pytest

from nanogrid.common.errors import SandboxError
from nanogrid.runners.forkclient import ForkServerClient
from nanogrid.runners.nodeclient import NodeServerClient
from nanogrid.runners.sandbox_server import FORK, NODE, SERVERS, server_for
from nanogrid.runners.sandboxclient import SandboxClient


@pytest.mark.parametrize(("command", "server"), [
    (("python3", "main.py"), FORK),
    (("/usr/bin/python3", "-u", "main.py"), FORK),
    (("./main",), FORK),
    (("node", "index.js"), NODE),
    (("/usr/bin/node", "index.js", "--an-argument"), NODE),
    (("node", "--max-old-space-size=64", "index.js"), FORK),  # flags first: exec'd per call
    (("node",), FORK),
])
def test_a_runtime_command_gets_its_server(command: tuple[str, ...], server: object) -> None:
    assert server_for(command) is server


def test_what_each_kind_means_is_stated_not_inferred_from_its_name() -> None:
    assert SERVERS == {"fork": FORK, "node": NODE}
    # The fork server runs each function in a forked child and is the sandbox's first
    # process; the node server runs functions in its own process (a Worker thread) and is
    # exec'd by a fork server that set the sandbox up first.
    assert (FORK.runs_functions_itself, FORK.started_by_fork_server) == (False, False)
    assert (NODE.runs_functions_itself, NODE.started_by_fork_server) == (True, True)
    assert FORK.socket_name != NODE.socket_name


def test_a_servers_command_line_puts_its_flags_before_its_directory() -> None:
    assert FORK.command("/usr/bin/python3", "/srv/forkserver", "/c/s.sock") == [
        "/usr/bin/python3", "-I", "-S", "/srv/forkserver", "/c/s.sock"]
    assert NODE.command("/usr/bin/node", "/srv/nodeserver", "/c/n.sock") == [
        "/usr/bin/node", "/srv/nodeserver", "/c/n.sock"]


PROTOCOL = ("run", "arm", "fileno", "take_ready", "close")
STATE = ("ready_at_reply", "busy_until_ready", "preloaded")


@pytest.mark.parametrize("client", [ForkServerClient, NodeServerClient])
def test_both_clients_speak_the_one_protocol(client: type) -> None:
    for name in PROTOCOL:
        wanted = inspect.signature(getattr(SandboxClient, name)).parameters
        given = inspect.signature(getattr(client, name)).parameters
        assert [(p.name, p.kind) for p in given.values()] == \
            [(p.name, p.kind) for p in wanted.values()], f"{client.__name__}.{name}"
    assert all(hasattr(client, name) for name in STATE)
    # The node server says when its next Worker is ready ('W' frame), and takes a call
    # meanwhile (it waits there for the Worker).
    assert NodeServerClient.ready_at_reply is False
    assert NodeServerClient.busy_until_ready is False


def fake_fork_server(path: Path, reply: dict, report: dict) -> tuple[threading.Thread, list]:
    """A fork server for one run: it closes the run's pipes, replies ``reply``, and, once
    asked to preload, sends ``report``. What it received is in the list."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(1)
    received: list = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            data, ancdata, _, _ = conn.recvmsg(1 << 16, socket.CMSG_LEN(3 * 4))
            fds = array.array("i")
            fds.frombytes(ancdata[0][2])
            for fd in fds:
                os.close(fd)
            received.append(json.loads(data))
            conn.send(json.dumps(reply).encode())
            received.append(json.loads(conn.recv(1 << 16)))
            conn.send(json.dumps(report).encode())
            conn.recv(1)  # until the client hangs up

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread, received


def run_once(client: ForkServerClient) -> None:
    client.run(argv=["python3", "main.py"], cwd="/var/task", env={}, python=True, stdin=b"",
               timeout_s=5, max_output_bytes=1000, preload="f@1")


def test_a_fork_server_that_preloads_is_asked_once_its_run_was_measured(tmp_path: Path) -> None:
    """Its reply says it preloads: the client is not ready then, and busy (no call may be
    sent); ``arm`` asks for the preload, ``take_ready`` takes its account."""
    report = {"preloaded": ["json"], "left_out": {}}
    reply = {"status": 0, "maxrss_kb": 1, "duration_ns": 1, "preloading": True}
    server, received = fake_fork_server(tmp_path / "s.sock", reply, report)
    client = ForkServerClient(tmp_path / "s.sock")
    assert client.ready_at_reply and not client.busy_until_ready
    run_once(client)
    assert not client.ready_at_reply and client.busy_until_ready
    assert len(received) == 1  # no preload before the agent asks
    client.arm()
    assert client.take_ready() and client.preloaded == report
    assert received[1] == {"op": "preload"}
    assert client.ready_at_reply and not client.busy_until_ready
    client.close()
    server.join(timeout=5)


def test_a_run_sent_before_the_preload_was_taken_asks_for_it_and_takes_it_first(
    tmp_path: Path,
) -> None:
    report = {"preloaded": [], "left_out": {}}
    reply = {"status": 0, "maxrss_kb": 1, "duration_ns": 1, "preloading": True}
    server, received = fake_fork_server(tmp_path / "s.sock", reply, report)
    client = ForkServerClient(tmp_path / "s.sock")
    run_once(client)
    with pytest.raises(SandboxError, match="fork server"):  # the fake serves one run only
        run_once(client)
    assert received[1] == {"op": "preload"} and client.preloaded == report
    client.close()
    server.join(timeout=5)
