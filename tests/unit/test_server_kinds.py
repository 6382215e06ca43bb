"""The registry of in-sandbox servers (nanogrid/runners/sandbox_server.py): which server a
runtime's command gets, what each kind means to a runner, and the one client protocol both
servers' clients speak (nanogrid/runners/sandboxclient.py)."""

from __future__ import annotations

import inspect

import pytest

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


@pytest.mark.parametrize(("client", "ready_at_reply"),
                         [(ForkServerClient, True), (NodeServerClient, False)])
def test_both_clients_speak_the_one_protocol(client: type, ready_at_reply: bool) -> None:
    for name in PROTOCOL:
        wanted = inspect.signature(getattr(SandboxClient, name)).parameters
        given = inspect.signature(getattr(client, name)).parameters
        assert [(p.name, p.kind) for p in given.values()] == \
            [(p.name, p.kind) for p in wanted.values()], f"{client.__name__}.{name}"
    # The node server says when its next Worker is ready ('W' frame); the fork server is
    # ready once it replied.
    assert "ready_at_reply" in SandboxClient.__annotations__
    assert client.ready_at_reply is ready_at_reply
