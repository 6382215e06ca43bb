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

For each it forks: the child is born in the sandbox's cgroup2 directory where the kernel
allows it and, for an isolated sandbox, as PID 1 of a new PID namespace (clone.py); it lets go
of what is the template's (its socket, its wake-up pipe, its SIGCHLD handler), starts a
session of its own in ``cwd`` and becomes the sandbox exactly as a fork server started with
``SOCKET OPTIONS`` does (server.start: namespaces, cgroups, rlimits, uid, the ready line on
the ready fd). What a sandbox does afterwards cannot reach the template: their pages are
copied on write, and a sandbox drops root before it serves. The template reaps the children
it forked (each sandbox's server, PID 1 of its namespace: when it exits the kernel ends every
other process of the sandbox) and exits when the agent goes (its socket's end): each sandbox
dies with it (its parent-death signal; a pidfd of the template tells a sandbox whose
getppid() is 0, seen from its own namespace, whether it is gone already).
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

from .clone import fork_into
from .sandbox import CLONE_NEWPID
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
    itself = os.pidfd_open(os.getpid())  # inherited by each sandbox (not across exec)
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
            pid, born = fork_sandbox(request["options"])
            if pid == 0:
                become(request, dict(born, parent_fd=itself), fds, conn, wakeup, start)
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


def fork_sandbox(options: dict) -> tuple[int, dict]:
    """Fork a sandbox's server: born in its cgroup2 directory (``options["cgroup2"]``) where
    the kernel allows it, and as PID 1 of a new PID namespace if it is isolated. Returns its
    pid (0 in the child) and what the child is told of its birth: ``born_in`` (the cgroup2
    directory it was born in, or None) and ``pid_namespace`` (True, or why not)."""
    cgroup2 = options.get("cgroup2")
    pid_namespace: object = None
    if options.get("isolate"):
        try:
            pid, joined = fork_into(cgroup2, CLONE_NEWPID)
            pid_namespace = True
        except OSError as exc:
            pid_namespace = f"the kernel refused the namespace: {exc.strerror}"
    if pid_namespace is not True:
        pid, joined = fork_into(cgroup2)
    return pid, {"born_in": cgroup2 if joined else None, "pid_namespace": pid_namespace}


def become(request: dict, born: dict, fds: list, conn: socket.socket, wakeup: tuple,
           start: object) -> None:
    """In the forked child: let go of the template, become the sandbox (told how it was
    ``born``: fork_sandbox). Never returns."""
    code = 1
    try:
        conn.close()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for end in wakeup:
            os.close(end)
        os.setsid()
        os.chdir(request["cwd"])
        set_title(f"nanogrid: sandbox starting {request['socket']}")  # until it serves
        options = dict(request["options"], **born, ready_fd=fds[0] if fds else None)
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
    """Reap the sandboxes that ended (their servers are the template's children)."""
    with contextlib.suppress(BlockingIOError):
        os.read(wakeup, 512)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
