"""The agent's side of the node server's protocol (see nanogrid/runners/nodeserver/protocol.js).

A node sandbox's long-lived process is ``node nodeserver SOCKET`` (a directory: node runs
its ``index.js``): it keeps a worker thread started and waiting, so a call never pays node's
start. Stdin, stdout and stderr travel as frames on one AF_UNIX stream socket (node cannot
receive file descriptors). One ``run`` is one select loop in the calling thread, as with the
fork server.

A function runs in a Worker of the server's own process, so it can write on that socket
too: what comes back is read as untrusted. Every frame is checked at its header against
what the server may send (``FrameReader``), so a forged one ends the run as a SandboxError
before its body is read, and the agent never holds more than one frame of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

from nanogrid.common.errors import SandboxError

from .sandboxclient import MAX_REPLY, Capped, RawRun, connect

NODESERVER_SOURCE = Path(__file__).with_name("nodeserver")
"""The node server: a directory, run as ``node NODESERVER_SOURCE SOCKET ...``."""
NODE_SOCKET_NAME = "nodeserver.sock"
"""As long as the fork server's socket name: docker.socket_dir's length check holds for both."""
NODE_PROGRAMS = ("node", "nodejs")
_HEADER = struct.Struct(">cI")
_READY = _HEADER.pack(b"W", 0)
_CHUNK = 65536
_KILL_GRACE_S = 5.0


def is_node_command(command: tuple[str, ...]) -> bool:
    """``node script.js ...``: served by the node server (other node invocations are exec'd)."""
    return (
        os.path.basename(command[0]) in NODE_PROGRAMS
        and len(command) >= 2
        and not command[1].startswith("-")
    )


class NodeServerClient:
    """A connection to one sandbox's node server."""

    def __init__(
        self, socket_path: str | os.PathLike[str], connect_timeout_s: float = 10.0
    ) -> None:
        self.socket_path = str(socket_path)
        self._sock = connect(self.socket_path, socket.SOCK_STREAM, connect_timeout_s, "node server")

    ready_at_reply = False
    """After a run (frame 'A') the server readies the next call's Worker, then says it is ready
    with a frame 'W' (nanogrid/runners/freezer.py)."""
    busy_until_ready = False
    """A call sent meanwhile waits in the server for that Worker."""
    preloaded: dict | None = None
    """What it preloads is in the run's reply (``RawRun.preload``)."""

    def close(self) -> None:
        self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def run(
        self,
        *,
        argv: list[str],
        cwd: str,
        env: dict[str, str],
        python: bool = False,
        stdin: bytes,
        timeout_s: float,
        max_output_bytes: int,
        rlimits: dict[str, int] | None = None,
        preload: str | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> RawRun:
        """Run one function to completion (or timeout) and return what it produced.
        ``preload``: the sandbox's code_key, when the server may preload its files;
        ``on_sent``: called once the request is sent (see ForkServerClient.run). The fork
        server's ``python`` and ``rlimits`` mean nothing here: every call is node, in a Worker
        of the server's own process, which takes no per-call rlimits (see docs/internals.md)."""
        request = {
            "argv": argv,
            "cwd": cwd,
            "env": env,
            "maxOutputBytes": max_output_bytes,
            "preload": preload,
        }
        try:
            self._sock.sendall(_frame(b"R", json.dumps(request).encode()) + _frame(b"I", stdin))
        except OSError as exc:
            raise SandboxError(f"sandbox node server is gone: {exc}") from None
        if on_sent is not None:
            on_sent()
        return self._collect(timeout_s, max_output_bytes)

    def _collect(self, timeout_s: float, cap: int) -> RawRun:
        deadline = time.monotonic() + timeout_s
        frames = FrameReader(cap)
        timed_out = False
        while True:
            wait = deadline - time.monotonic()
            if wait <= 0:
                if timed_out:
                    raise SandboxError("sandbox node server did not stop its function after a kill")
                timed_out = True
                self._send_kill()
                deadline = time.monotonic() + _KILL_GRACE_S
                continue
            if not select.select([self._sock], [], [], wait)[0]:
                continue
            reply = frames.receive(self._sock)
            if reply is not None:
                return _raw_run(reply, frames.out, frames.err, timed_out)

    def _send_kill(self) -> None:
        try:
            self._sock.sendall(_frame(b"K", b""))
        except OSError as exc:
            raise SandboxError(f"sandbox node server is gone: {exc}") from None

    def arm(self) -> None:
        """After the run's peak was read: the server may ready (and preload) the next Worker.
        A server that is gone is found out by the next run."""
        with contextlib.suppress(OSError):
            self._sock.sendall(_frame(b"A", b""))

    def shrink(self, timeout_s: float) -> bool:
        """Frame 'D': the server ends the Worker it keeps for the next call, and says so with
        a 'W'."""
        try:
            self._sock.sendall(_frame(b"D", b""))
            if not select.select([self._sock], [], [], timeout_s)[0]:
                return False
            return self._sock.recv(_HEADER.size, socket.MSG_WAITALL) == _READY
        except OSError:
            return False

    def take_ready(self) -> bool:
        """Between runs, once the socket is readable: take the server's 'W' frame off it, if
        that is what waits there; anything else is left to the next run, which refuses it."""
        with contextlib.suppress(OSError):
            if self._sock.recv(_HEADER.size, socket.MSG_PEEK | socket.MSG_DONTWAIT) == _READY:
                self._sock.recv(_HEADER.size)
        return True


def _frame(kind: bytes, body: bytes) -> bytes:
    return _HEADER.pack(kind, len(body)) + body


class FrameReader:
    """The frames of one run, as they arrive, each checked at its header against what the
    server sends (protocol.js): stdout and stderr frames that are not empty and stay within
    the output cap in all (the server drops the rest and says how much), one 'X' of at most
    MAX_REPLY bytes, and at most one 'W' left from before the run. Anything else ends the run
    as a SandboxError, so a frame announcing a gigabyte costs its five header bytes, and a
    flood of small frames at most the cap. The buffer grows linearly: appended to, consumed
    from the front (a bytearray's ``del b[:n]`` moves no bytes)."""

    def __init__(self, cap: int) -> None:
        self.out, self.err = Capped(cap), Capped(cap)
        self._buffer = bytearray()
        self._settled = False

    def receive(self, sock: socket.socket) -> dict | None:
        """Read what ``sock`` has (one recv) and take the whole frames in it; the run's reply
        once its 'X' frame came."""
        try:
            chunk = sock.recv(_CHUNK)
        except OSError as exc:
            raise SandboxError(f"sandbox node server failed: {exc}") from None
        if not chunk:
            raise SandboxError("sandbox node server died during the run")
        buffer = self._buffer
        buffer += chunk
        at = 0
        try:
            while len(buffer) - at >= _HEADER.size:
                kind, length = _HEADER.unpack_from(buffer, at)
                self._check(kind, length)
                end = at + _HEADER.size + length
                if len(buffer) < end:
                    break
                body = bytes(buffer[at + _HEADER.size : end])
                at = end
                if kind == b"O":
                    self.out.add(body)
                elif kind == b"E":
                    self.err.add(body)
                elif kind == b"X":
                    return _reply(body)
        finally:
            del buffer[:at]
        return None

    def _check(self, kind: bytes, length: int) -> None:
        if kind in (b"O", b"E"):
            stream = self.out if kind == b"O" else self.err
            if length == 0 or len(stream.data) + length > stream.limit:
                raise SandboxError(
                    f"sandbox node server sent a {kind.decode()} frame of {length} bytes "
                    f"after {len(stream.data)}, past the output cap ({stream.limit})"
                )
        elif kind == b"X":
            if length > MAX_REPLY:
                raise SandboxError(f"sandbox node server sent a reply of {length} bytes")
        elif kind == b"W" and length == 0 and not self._settled:
            self._settled = True  # said of the Worker armed before this run, which took it
        else:
            raise SandboxError(
                f"sandbox node server sent a frame it never sends ({kind!r}, {length} bytes)"
            )


def _reply(body: bytes) -> dict:
    try:
        reply = json.loads(body)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise SandboxError("sandbox node server sent a malformed reply")
    return reply


def _raw_run(reply: dict, out: Capped, err: Capped, timed_out: bool) -> RawRun:
    try:
        # As a wait status, so both servers' runs read the same: a killed run is a SIGKILL.
        status = signal.SIGKILL if reply["killed"] else (int(reply["exitCode"]) & 0xFF) << 8
        dropped = reply["dropped"]
        return RawRun(
            status=status,
            timed_out=timed_out,
            stdout=bytes(out.data),
            stderr=bytes(err.data),
            stdout_truncated=out.truncated or dropped["stdout"] > 0,
            stderr_truncated=err.truncated or dropped["stderr"] > 0,
            duration_ms=reply["durationNs"] / 1e6,
            maxrss_bytes=int(reply["maxrssBytes"]),
            preload=reply.get("preload"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SandboxError(f"sandbox node server sent a malformed reply: {exc!r}") from None
