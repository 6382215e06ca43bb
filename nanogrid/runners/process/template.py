"""The agent's side of the sandbox templates (nanogrid/runners/forkserver/template.py): one warm
interpreter per worker and interpreter that forks each new process sandbox, so a cold
sandbox costs a fork instead of an interpreter start (~35-65 ms here).

A template is started on first use (``python3 -I -S forkserver --template FD``), with one
end of a socketpair as its only input; the worker keeps the other end. The template exits
once that end closes, however the worker ends (no thread's death signal is involved: a
sandbox made on a passing thread outlives it), and its sandboxes die with it. A template
that died meanwhile is started again for the next sandbox.

A sandbox's server (PID 1 of its PID namespace, where it has one) is the template's child,
not the worker's: the worker holds it as a pidfd (``Forked``), which it signals and waits on;
the template reaps it.
"""

from __future__ import annotations

import array
import json
import os
import select
import signal
import socket
import subprocess
import threading

from loguru import logger

from nanogrid.common.errors import SandboxError

from ..forkclient import FORKSERVER_SOURCE

REPLY_TIMEOUT_S = 10.0
TITLE_ROOM = 256
"""Bytes of command line each sandbox's server writes its title over (forkserver/title.py):
it inherits the template's, so the template's holds the longest title (runtime, function,
version, socket path)."""


class Forked:
    """A sandbox's first process, forked by a template: signalled and waited on by pidfd."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self._ended = False

    def kill(self) -> None:
        if not self._ended and self._pidfd >= 0:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                self._ended = True

    def wait(self, timeout_s: float) -> bool:
        """True once it has exited (within ``timeout_s``)."""
        if not self._ended and self._pidfd >= 0:
            self._ended = bool(select.select([self._pidfd], [], [], timeout_s)[0])
        return self._ended

    def ended(self) -> bool:
        return self.wait(0)

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


class Template:
    """One interpreter's template (started on first use, again after it died)."""

    def __init__(self, interpreter: str, env: dict[str, str]) -> None:
        self.interpreter = interpreter
        self._env = env
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None

    def fork(self, socket_path: str, cwd: str, options: dict[str, object], ready_fd: int
             ) -> Forked:
        """A new sandbox serving on ``socket_path``, set up with ``options`` (its server's
        OPTIONS); its ready line comes on ``ready_fd``'s pipe."""
        request = json.dumps({"socket": socket_path, "cwd": cwd, "options": options}).encode()
        with self._lock:
            for attempt in (1, 2):
                sock = self._sock if self._sock is not None else self._start()
                try:
                    sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                              array.array("i", [ready_fd]))])
                    return self._reply(sock)
                except (OSError, ValueError) as exc:
                    self._stop()
                    if attempt == 2:
                        raise SandboxError(f"the sandbox template failed: {exc}") from None
                    logger.warning(f"[PROCESS] sandbox template of {self.interpreter} "
                                   f"gone ({exc}); starting it again")
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _reply(self, sock: socket.socket) -> Forked:
        fds = array.array("i")
        data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_LEN(fds.itemsize))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
        if not data:
            raise ConnectionResetError("the template closed its socket")
        return Forked(int(json.loads(data)["pid"]), fds[0] if fds else -1)

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = subprocess.Popen(
                [self.interpreter, "-I", "-S", str(FORKSERVER_SOURCE), "--template",
                 str(theirs.fileno()), " " * TITLE_ROOM],
                cwd="/",
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
                pass_fds=(theirs.fileno(),),
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.settimeout(REPLY_TIMEOUT_S)
        self._sock = ours
        return ours

    def _stop(self) -> None:
        if self._sock is not None:
            self._sock.close()  # the template exits at its end of the socket
            self._sock = None
        if self._process is not None:
            try:
                self._process.wait(REPLY_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


class Templates:
    """A worker's templates, one per interpreter its sandboxes start on."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self._lock = threading.Lock()
        self._by_interpreter: dict[str, Template] = {}

    def of(self, interpreter: str) -> Template:
        with self._lock:
            template = self._by_interpreter.get(interpreter)
            if template is None:
                template = self._by_interpreter[interpreter] = Template(interpreter, self._env)
            return template

    def close(self) -> None:
        """Stop every template (their sandboxes die with them)."""
        with self._lock:
            templates = list(self._by_interpreter.values())
            self._by_interpreter.clear()
        for template in templates:
            template.close()
