"""The fork server's start and its protocol: it sets the sandbox up, then forks one run per
request.

Protocol on an AF_UNIX SOCK_SEQPACKET socket, one JSON object per packet, one client at a
time, one run at a time:

    -> {"op": "run", "argv": [...], "cwd": ..., "env": {...}, "python": bool,
        "rlimits": {"as": bytes, "nproc": n} | null,
        "preload": code_key | null}                        + SCM_RIGHTS [stdin, stdout, stderr]
    -> {"op": "kill"}                                        (optional, e.g. on timeout)
    <- {"status": waitstatus, "maxrss_kb": n, "duration_ns": n, "preloading": bool}
    -> {"op": "preload"}              (after "preloading", once the agent read the run's peak)
    <- {"preloaded": [module, ...], "left_out": {module: why}}

What the forked child does is in child.py; ``"preload"`` (import-warm) in preload.py; the
sandbox made before serving (namespaces, cgroups, rlimits, uid) in sandbox.py. Options
(``OPTIONS``, JSON): what ``ProcessRunner.create`` passes; a container's server gets only
``{"own_ipc": true}`` (its IPC namespace is the container's own: see sysvipc.py).
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
import time

from . import sysvipc, template
from .child import Signals, Stdio, adopt_environment, child
from .preload import Preload
from .reaping import kill_group, kill_namespace, reap_orphans
from .sandbox import (
    die_with_parent,
    drop_privileges,
    exec_server,
    isolate,
    join_cgroups,
    keep_writable,
    own_proc,
    probe,
    seal,
    set_rlimits,
)
from .script import Scripts
from .title import set_title, title_for

MAX_PACKET = 1 << 20


def recv_packet(conn: socket.socket) -> tuple[dict | None, list[int]]:
    """Receive one JSON packet and any file descriptors passed with it."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = conn.recvmsg(MAX_PACKET, socket.CMSG_LEN(16 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        return None, list(fds)
    return json.loads(data), list(fds)


def send_packet(conn: socket.socket, message: dict) -> None:
    conn.send(json.dumps(message).encode())


def serve_run(
    conn: socket.socket,
    request: dict,
    fds: list,
    listener: socket.socket,
    wakeup: tuple | None,
    preload: Preload,
    scripts: Scripts,
    stdio: Stdio,
    signals: Signals,
) -> None:
    """Fork one run and report its end; then preload what it imported, if asked to.
    ``wakeup`` (PID 1 only): the SIGCHLD wake-up pipe, so orphans the run leaves to this
    server are reaped while it lasts."""
    preload.expect(request)
    set_title(title_for(request, listener.getsockname()))
    started = time.monotonic_ns()
    code = scripts.code_for(request["cwd"], request["argv"][1]) if request.get("python") else None
    adopt_environment(request["env"])
    wrapped = stdio.for_run(fds) if request.get("python") else None
    pid = os.fork()
    if pid == 0:
        keep_closed = [conn.fileno(), listener.fileno(), *(wakeup or ()), *stdio.saved]
        child(request, fds, keep_closed, preload, signals, code, wrapped)
    if wrapped is not None:
        stdio.restore()
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    poller = select.poll()  # no fd of its own to make and close per run, unlike epoll
    poller.register(pidfd, select.POLLIN)
    poller.register(conn, select.POLLIN)
    if wakeup is not None:
        poller.register(wakeup[0], select.POLLIN)
    exited = False
    while not exited:
        for fd, _ in poller.poll():
            if fd == pidfd:
                exited = True
                continue
            if wakeup is not None and fd == wakeup[0]:
                with contextlib.suppress(BlockingIOError):
                    os.read(wakeup[0], 512)
                exited = reap_orphans(pid) or exited
                continue
            message, extra = recv_packet(conn)
            for extra_fd in extra:
                os.close(extra_fd)
            if message is None:  # the agent went away: do not leave the run behind
                poller.unregister(conn)
            kill_group(pid)
    _, status, usage = os.wait4(pid, 0)
    duration = time.monotonic_ns() - started
    os.close(pidfd)
    if wakeup is not None:
        kill_namespace()
    else:
        kill_group(pid)
    sysvipc.remove_left()
    preloading = preload.pending() and preload.gather(request["cwd"])
    send_packet(conn, {"status": status, "maxrss_kb": usage.ru_maxrss, "duration_ns": duration,
                       "preloading": preloading})
    if preloading:
        preload_when_asked(
            conn, request["cwd"], preload, [conn.fileno(), listener.fileno(), *(wakeup or ())]
        )


def preload_when_asked(conn: socket.socket, cwd: str, preload: Preload, keep_closed: list
                       ) -> None:
    """Preload the run's imports once the agent asks: it has read the run's peak by then, so
    what the server loads is not counted as the run's, and the call's result did not wait
    for it. An agent that hangs up instead gets no preload (its next run reports anew)."""
    message, extra = recv_packet(conn)
    for fd in extra:
        os.close(fd)
    if message != {"op": "preload"}:
        preload.cancel()
        if message is not None:
            send_packet(conn, {"error": "expected the word to preload"})
        return
    loaded = preload.load(cwd, keep_closed)
    with contextlib.suppress(OSError):  # the agent stopped waiting: the next one connects anew
        send_packet(conn, loaded)


def warm_up() -> None:
    """Freeze the heap before serving: keeps the garbage collector of every forked child off
    the server's objects, so their pages stay shared (less copying, a lower peak)."""
    gc.collect()
    gc.freeze()


def main(argv: list) -> int:
    """``SOCKET [OPTIONS]``: set the sandbox up, then serve (``start``); ``--template FD``:
    fork sandboxes on request (template.py); ``--probe SETTINGS``: see sandbox.probe.
    Returns an exit code (see ``start``)."""
    if argv[1] == "--probe":
        return probe(json.loads(argv[2]))
    if argv[1] == "--template":
        return template.serve(int(argv[2]), start)
    return start(argv[1], json.loads(argv[2]) if len(argv) > 2 else {})


def start(path: str, options: dict) -> int:
    """Set the sandbox up, then serve on ``path``, or exec ``options["exec"]``. Returns an
    exit code after a failed set-up."""
    uid, gid = options.get("uid", -1), options.get("gid", -1)
    parent = os.getppid()  # 0 as PID 1 of a new namespace: its parent lies outside
    settings = options.get("isolate")
    command = options.get("exec")
    try:
        holds, missing = isolate(settings, options.get("pid_namespace")) if settings else ([], {})
        if command and "mount" in holds and settings.get("root"):
            # The exec'd server stages each call's stdin in its control directory: it stays
            # writable when the rest is sealed (the agent takes its ownership once it is ready).
            keep_writable(os.path.dirname(path))
        host_pid = own_proc() if "pid" in holds else os.getpid()
    except OSError as exc:
        print(f"nanogrid fork server: cannot set up the sandbox: {exc}", file=sys.stderr)
        return 1
    if "ipc" in holds or options.get("own_ipc"):
        sysvipc.own_namespace()
    if command:
        if "mount" in holds and settings.get("root"):
            seal(settings["root"])
        exec_server(command, options, parent,
                    {"pid": host_pid, "holds": holds, "missing": missing})
    wakeup = None
    if os.getpid() == 1:  # PID 1 of its namespace: it reaps what runs orphan
        wakeup = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wakeup[1], warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes serve_run to reap orphans
    else:  # PID 1 keeps the default: signals from its own namespace cannot kill it
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    join_cgroups(options.get("cgroup_procs", []), options.get("born_in"))
    os.umask(0o077)
    warm_up()  # before the socket appears: its existence means ready
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if os.path.exists(path):
        os.unlink(path)
    listener.bind(path)
    listener.listen(1)
    if "mount" in holds and settings.get("root"):
        seal(settings["root"])
    set_rlimits(options.get("rlimits") or {})
    drop_privileges(uid, gid)
    if options.get("pdeathsig"):  # after dropping root: changing uid clears the death signal
        die_with_parent(parent, options.get("parent_fd"))
    if options.get("parent_fd") is not None:
        os.close(options["parent_fd"])  # no run of its inherits the template's pidfd
    ready = options.get("ready_fd")
    if ready is not None:
        line = json.dumps({"pid": host_pid, "holds": holds, "missing": missing}) + "\n"
        os.write(ready, line.encode())
        os.close(ready)
    preload, scripts, stdio = Preload(), Scripts(), Stdio()
    signals = Signals(wakeup is not None)
    set_title(title_for({}, path))
    while True:
        conn, _ = listener.accept()
        with conn:
            while True:
                request, fds = recv_packet(conn)
                if request is None:
                    break
                if request.get("op") == "run" and len(fds) == 3:
                    serve_run(
                        conn, request, fds, listener, wakeup, preload, scripts, stdio, signals
                    )
                else:
                    for fd in fds:
                        os.close(fd)
                    send_packet(conn, {"error": "expected a run request with 3 descriptors"})
