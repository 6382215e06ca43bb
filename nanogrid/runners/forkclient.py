"""The agent's side of the fork-server protocol (see nanogrid/runners/forkserver/server.py).

One ``run`` is one poll loop in the calling thread: it writes stdin, drains stdout and
stderr with a cap (never an unbounded buffer, never a deadlock on a full pipe), enforces
the wall-clock timeout and collects the exit status — no helper threads per call, and no
epoll descriptor to make and close per call either.
"""

from __future__ import annotations

import array
import contextlib
import json
import math
import os
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path

from nanogrid.common.errors import SandboxError

from .sandboxclient import MAX_REPLY, Capped, RawRun, connect

FORKSERVER_SOURCE = Path(__file__).with_name("forkserver")
"""The fork server: a directory, run as ``python3 -I -S FORKSERVER_SOURCE SOCKET ...``."""
_CHUNK = 65536
_LINGER_S = 0.1
"""How long output may still arrive after the function exited (background writers)."""
PRELOAD_WAIT_S = 30.0
"""How long a server may take to preload a function's imports (it bounds its own vetting)."""


class ForkServerClient:
    """A connection to one sandbox's fork server."""

    def __init__(
        self, socket_path: str | os.PathLike[str], connect_timeout_s: float = 10.0
    ) -> None:
        self.socket_path = str(socket_path)
        self._sock = connect(
            self.socket_path, socket.SOCK_SEQPACKET, connect_timeout_s, "fork server"
        )
        self._preloading = False
        """The last run's reply said the server preloads its imports once asked (``arm``),
        and its account of them has not been taken yet."""
        self._asked = False

    preloaded: dict | None = None
    """The server's account of the imports it preloaded, once taken (``take_ready``)."""

    @property
    def ready_at_reply(self) -> bool:
        """The server waits for the next request once it replied, unless it preloads
        (nanogrid/runners/freezer.py)."""
        return not self._preloading

    @property
    def busy_until_ready(self) -> bool:
        """A server that preloads takes no request until it has: its sandbox settles."""
        return self._preloading

    def close(self) -> None:
        self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def arm(self) -> None:
        """After the run's peak was read: a server that said it preloads may now (a fork
        server has nothing else to get ready: it forks per call). A server that is gone is
        found out by whoever takes its account."""
        if self._preloading and not self._asked:
            self._asked = True
            with contextlib.suppress(OSError):
                self._sock.send(b'{"op": "preload"}')

    def shrink(self, timeout_s: float) -> bool:
        """Nothing to drop: a fork server keeps no call's process started between runs."""
        return True

    def take_ready(self) -> bool:
        """Once the socket is readable after ``arm``: take the server's account of what it
        preloaded. False when the server broke meanwhile."""
        if not self._preloading:
            return True
        try:
            self.preloaded = self._receive_preload()
        except SandboxError:
            return False
        finally:
            self._preloading = self._asked = False
        return True

    def run(
        self,
        *,
        argv: list[str],
        cwd: str,
        env: dict[str, str],
        python: bool,
        stdin: bytes,
        timeout_s: float,
        max_output_bytes: int,
        rlimits: dict[str, int] | None = None,
        preload: str | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> RawRun:
        """Run one function to completion (or timeout) and return what it produced.
        ``preload``: the sandbox's code_key, when the server may preload its imports;
        ``on_sent``: called once the request is sent (the runner thaws the sandbox then, so
        its server finds the request as it wakes)."""
        if self._preloading:  # run again before it settled: the preload goes first
            self.arm()
            if not self.take_ready():
                raise SandboxError("sandbox fork server broke while preloading")
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        request = {
            "op": "run",
            "argv": argv,
            "cwd": cwd,
            "env": env,
            "python": python,
            "rlimits": rlimits,
            "preload": preload,
        }
        try:
            self._sock.sendmsg(
                [json.dumps(request).encode()],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [in_r, out_w, err_w]))],
            )
        except OSError as exc:
            for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
                os.close(fd)
            raise SandboxError(f"sandbox fork server is gone: {exc}") from None
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        try:
            return self._collect(
                in_w, out_r, err_r, stdin, timeout_s, max_output_bytes, on_sent
            )
        finally:
            os.close(out_r)
            os.close(err_r)

    def _collect(
        self, in_w: int, out_r: int, err_r: int, stdin: bytes, timeout_s: float, cap: int,
        on_sent: Callable[[], None] | None,
    ) -> RawRun:
        deadline = time.monotonic() + timeout_s
        captured = {out_r: Capped(cap), err_r: Capped(cap)}
        open_outputs = {out_r, err_r}
        pending_in = memoryview(stdin)
        stdin_open = True
        reply: dict | None = None
        timed_out = False
        os.set_blocking(in_w, False)
        try:
            if on_sent is not None:
                on_sent()
            pending_in = _feed(in_w, pending_in)  # most stdins fit the pipe: no turn of the loop
            if not pending_in:
                os.close(in_w)
                stdin_open = False
            sock = self._sock.fileno()
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            poller.register(out_r, select.POLLIN)
            poller.register(err_r, select.POLLIN)
            if stdin_open:
                poller.register(in_w, select.POLLOUT)
            while reply is None or open_outputs:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    if reply is not None:
                        break  # exited, but something it left behind still holds the pipes
                    if timed_out:
                        raise SandboxError("sandbox did not stop its function after a kill")
                    timed_out = True
                    self._send_kill()
                    deadline = time.monotonic() + 5.0
                    continue
                for fd, _ in poller.poll(math.ceil(wait * 1000)):
                    if fd == in_w:
                        pending_in = _feed(in_w, pending_in)
                        if not pending_in:
                            poller.unregister(in_w)
                            os.close(in_w)
                            stdin_open = False
                    elif fd in captured:
                        chunk = os.read(fd, _CHUNK)
                        if chunk:
                            captured[fd].add(chunk)
                        else:
                            poller.unregister(fd)
                            open_outputs.discard(fd)
                    else:
                        reply = self._receive_reply()
                        deadline = time.monotonic() + _LINGER_S
                        poller.unregister(sock)  # what follows is the preload's
        finally:
            if stdin_open:
                os.close(in_w)
        out, err = captured[out_r], captured[err_r]
        try:
            self._preloading = bool(reply.get("preloading"))
            status = int(reply["status"])
            os.waitstatus_to_exitcode(status)  # one a process can end with
            return RawRun(
                status=status,
                timed_out=timed_out,
                stdout=bytes(out.data),
                stderr=bytes(err.data),
                stdout_truncated=out.truncated,
                stderr_truncated=err.truncated,
                duration_ms=reply["duration_ns"] / 1e6,
                maxrss_bytes=int(reply["maxrss_kb"]) * 1024,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SandboxError(f"sandbox fork server sent a malformed reply: {exc!r}") from None

    def _receive_preload(self) -> dict:
        """The server's account of the imports it preloaded after this run."""
        self._sock.settimeout(PRELOAD_WAIT_S)
        try:
            return self._receive("preloaded", "while preloading")
        finally:
            self._sock.settimeout(None)

    def _receive_reply(self) -> dict:
        """The run's end, the one message the server sends during a run."""
        return self._receive("status", "during the run")

    def _receive(self, key: str, when: str) -> dict:
        """The server's next packet, which must be a JSON object with ``key``: one packet of
        at most MAX_REPLY bytes, so a sandbox cannot make the agent buffer more than that."""
        try:
            data, _, flags, _ = self._sock.recvmsg(MAX_REPLY)
        except OSError as exc:
            raise SandboxError(f"sandbox fork server failed {when}: {exc}") from None
        if not data:
            raise SandboxError(f"sandbox fork server died {when}")
        try:
            message = json.loads(data) if not flags & socket.MSG_TRUNC else None
        except ValueError:
            message = None
        if not isinstance(message, dict) or key not in message:
            raise SandboxError(f"sandbox fork server sent a message it never sends {when}")
        return message

    def _send_kill(self) -> None:
        try:
            self._sock.send(b'{"op": "kill"}')
        except OSError as exc:
            raise SandboxError(f"sandbox fork server is gone: {exc}") from None


def _feed(fd: int, pending: memoryview) -> memoryview:
    """Write what the non-blocking pipe takes of ``pending``; what is left (nothing once the
    function closed its stdin)."""
    try:
        return pending[os.write(fd, pending[:_CHUNK]) :]
    except BlockingIOError:
        return pending
    except BrokenPipeError:
        return pending[:0]
