"""The idle process inside every sandbox: forks a function run on request.

Stdlib only and self-contained: it is copied into Docker containers and started there as
``python3 -I -S forkserver.py SOCKET``, or started on the host by the process runner. Paying
interpreter start-up once per sandbox instead of once per call is what makes a warm
invocation cost a fork (about a millisecond) instead of a ``docker exec`` or a fresh
``python3`` (tens of milliseconds).

Protocol on an AF_UNIX SOCK_SEQPACKET socket, one JSON object per packet, one client at a
time, one run at a time:

    -> {"op": "run", "argv": [...], "cwd": ..., "env": {...}, "python": bool,
        "rlimits": {"as": bytes, "nproc": n} | null}      + SCM_RIGHTS [stdin, stdout, stderr]
    <- {"pid": pid}
    -> {"op": "kill"}                                        (optional, e.g. on timeout)
    <- {"status": waitstatus, "maxrss_kb": n, "duration_ns": n}

With ``"python": true`` the child runs ``argv[1]`` with runpy as ``python3 argv[1]`` would
(``__main__``, ``sys.argv``, ``sys.path[0]``, exit codes, tracebacks), without exec'ing a
new interpreter; otherwise it exec's ``argv``.
"""

import array
import atexit
import contextlib
import ctypes  # here, not in die_with_parent: after become() the sandbox's uid may not
import gc  # be able to read the stdlib of the interpreter that started it (a pyenv in /root)
import io
import json
import os
import pkgutil  # noqa: F401  loaded once here: runpy imports it lazily in every child
import resource
import runpy
import selectors
import signal
import socket
import sys
import threading
import time
import traceback

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


def run_python(argv: list, cwd: str) -> int:
    """Run argv[1] as ``python3 argv[1] argv[2:]`` would, in this (forked) interpreter."""
    script = argv[1]
    sys.argv = list(argv[1:])
    sys.path[0:0] = [cwd]
    sys.stdin = sys.__stdin__ = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(
        open(2, "wb", buffering=0, closefd=False),  # noqa: SIM115
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
    )
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exit_code_of(exc)
    except BaseException as exc:  # the function's own error, reported as python would
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != script:
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb or exc.__traceback__)
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    return code


def exit_code_of(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1


def child(request: dict, fds: list, keep_closed: list) -> None:
    """In the forked child: become the function. Never returns."""
    code = 127
    try:
        os.setsid()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds + keep_closed:
            if fd > 2:
                os.close(fd)
        limits = request.get("rlimits") or {}
        if limits.get("as"):
            resource.setrlimit(resource.RLIMIT_AS, (limits["as"], limits["as"]))
        if limits.get("nproc"):
            resource.setrlimit(resource.RLIMIT_NPROC, (limits["nproc"], limits["nproc"]))
        os.umask(0o022)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        argv = request["argv"]
        if request.get("python"):
            code = run_python(argv, request["cwd"])
        else:
            os.execvpe(argv[0], argv, request["env"])
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(2, f"nanogrid: cannot start {request.get('argv')}: {exc}\n".encode())
    os._exit(code)


def serve_run(conn: socket.socket, request: dict, fds: list, listener: socket.socket) -> None:
    started = time.monotonic_ns()
    pid = os.fork()
    if pid == 0:
        child(request, fds, [conn.fileno(), listener.fileno()])
    for fd in fds:
        os.close(fd)
    send_packet(conn, {"pid": pid})
    pidfd = os.pidfd_open(pid)
    with selectors.DefaultSelector() as sel:
        sel.register(pidfd, selectors.EVENT_READ)
        sel.register(conn, selectors.EVENT_READ)
        exited = False
        while not exited:
            for key, _ in sel.select():
                if key.fileobj == pidfd:
                    exited = True
                    continue
                message, extra = recv_packet(conn)
                for fd in extra:
                    os.close(fd)
                if message is None:  # the agent went away: do not leave the run behind
                    sel.unregister(conn)
                kill_group(pid)
    _, status, usage = os.wait4(pid, 0)
    duration = time.monotonic_ns() - started
    os.close(pidfd)
    kill_group(pid)
    send_packet(conn, {"status": status, "maxrss_kb": usage.ru_maxrss, "duration_ns": duration})


def kill_group(pgid: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pgid, signal.SIGKILL)


def die_with_parent(parent: int) -> None:
    """Ask the kernel to kill this server when the agent worker that started it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(0)


def become(uid: int, gid: int, cgroup_procs: list) -> None:
    """Join the sandbox's cgroups and drop root, in that order (joining needs root)."""
    for path in cgroup_procs:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
    if uid >= 0 and os.getuid() == 0:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)


def warm_up(directory: str) -> None:
    """Run an empty script once, then freeze the heap, before serving.

    The first run_path loads what runpy needs lazily; freezing keeps the garbage collector of
    every forked child off the server's objects, so their pages stay shared (less copying,
    a lower per-invocation peak). Not named main.py: the import system would remember that
    path as "not a zip" and a real zipped main.py would break.
    """
    script = os.path.join(directory, "nanogrid-warmup.py")
    try:
        with open(script, "w") as f:
            f.write("pass\n")
        runpy.run_path(script)
        os.unlink(script)
    except OSError:
        pass  # an unwritable directory only costs the first run its lazy imports
    gc.collect()
    gc.freeze()


def main(argv: list) -> int:
    path = argv[1]
    options = json.loads(argv[2]) if len(argv) > 2 else {}
    parent = os.getppid()
    become(options.get("uid", -1), options.get("gid", -1), options.get("cgroup_procs", []))
    if options.get("pdeathsig"):  # after become(): changing uid clears the death signal
        die_with_parent(parent)
    if options.get("exec"):  # another runtime's server, in the sandbox made above
        os.execv(options["exec"][0], options["exec"])
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    os.umask(0o077)
    warm_up(os.path.dirname(path))  # before the socket appears: its existence means ready
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if os.path.exists(path):
        os.unlink(path)
    listener.bind(path)
    listener.listen(1)
    ready = options.get("ready_fd")
    if ready is not None:
        os.write(ready, b"ready\n")
        os.close(ready)
    while True:
        conn, _ = listener.accept()
        with conn:
            while True:
                request, fds = recv_packet(conn)
                if request is None:
                    break
                if request.get("op") == "run" and len(fds) == 3:
                    serve_run(conn, request, fds, listener)
                else:
                    for fd in fds:
                        os.close(fd)
                    send_packet(conn, {"error": "expected a run request with 3 descriptors"})


if __name__ == "__main__":
    sys.exit(main(sys.argv))
