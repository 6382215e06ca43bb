"""The template (``--template FD``): a warm interpreter that forks new sandboxes, so a new
sandbox costs a fork instead of an interpreter start.

One per worker and interpreter (nanogrid/runners/process/template.py starts it). It holds the
interpreter and this server's own modules, loaded, collected and frozen (gc.freeze), and
nothing else: it never runs a request of a function, never imports a module of one, never
reads a file a sandbox can write. Its only input is the agent's requests on the socket
``FD`` (one end of a socketpair: no path anyone else could connect to), one JSON packet
each:

    -> {"socket": path, "cwd": directory, "options": {...}}    + SCM_RIGHTS [ready fd]
    <- {"pid": n}                                               + SCM_RIGHTS [pidfd of n]

For each it forks; the child lets go of what is the template's (its socket, its wake-up
pipe, its SIGCHLD handler), starts a session of its own in ``cwd`` and becomes the sandbox
exactly as a fork server started with ``SOCKET OPTIONS`` does (server.start: namespaces,
cgroups, rlimits, uid, the ready line on the ready fd). What a sandbox does afterwards
cannot reach the template: their pages are copied on write, and a sandbox drops root
before it serves. The template reaps the children it forked (the sandboxes' first processes: a
keeper outside the sandbox's PID namespace, or the server itself) and exits when the agent
goes (its socket's end): each sandbox dies with it (its parent-death signal).
"""

import array
import contextlib
import gc
import json
import os
import select
import signal
import socket
import sys

from .title import set_title

MAX_REQUEST = 1 << 20


def serve(fd: int, start: object) -> int:
    """Fork a sandbox per request on the socket ``fd``; ``start(path, options)`` is what its
    child becomes (server.start). Returns 0 once the agent is gone."""
    conn = socket.socket(fileno=fd)
    set_title(f"nanogrid: sandbox template {sys.executable}")
    wakeup = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wakeup[1], warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    gc.collect()
    gc.freeze()  # every sandbox shares these pages: no collector of theirs touches them
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    poller.register(wakeup[0], select.POLLIN)
    while True:
        for ready, _ in poller.poll():
            if ready == wakeup[0]:
                reap(wakeup[0])
                continue
            request, fds = receive(conn)
            if request is None:
                return 0
            pid = os.fork()
            if pid == 0:
                become(request, fds, conn, wakeup, start)
            for received in fds:
                os.close(received)
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:  # gone already (and reaped): its ready fd says so to the agent
                conn.send(json.dumps({"pid": pid}).encode())
                continue
            conn.sendmsg([json.dumps({"pid": pid}).encode()],
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pidfd]))])
            os.close(pidfd)


def become(request: dict, fds: list, conn: socket.socket, wakeup: tuple, start: object
           ) -> None:
    """In the forked child: let go of the template, become the sandbox. Never returns."""
    code = 1
    try:
        conn.close()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for end in wakeup:
            os.close(end)
        os.setsid()
        os.chdir(request["cwd"])
        set_title(f"nanogrid: sandbox keeper {request['socket']}")  # its server sets its own
        options = dict(request["options"], ready_fd=fds[0] if fds else None)
        code = start(request["socket"], options)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        sys.__excepthook__(*sys.exc_info())
    finally:
        os._exit(code)


def receive(conn: socket.socket) -> tuple[dict | None, list]:
    """The agent's next request and the descriptor sent with it; (None, []) once it is gone."""
    fds = array.array("i")
    try:
        data, ancdata, _, _ = conn.recvmsg(MAX_REQUEST, socket.CMSG_LEN(4 * fds.itemsize))
    except ConnectionError:
        return None, []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), list(fds)


def reap(wakeup: int) -> None:
    """Reap the sandboxes that ended (their processes are the template's children)."""
    with contextlib.suppress(BlockingIOError):
        os.read(wakeup, 512)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
