"""The idle process inside every sandbox: forks a function run on request.

Stdlib only and self-contained: it is copied into Docker containers and started there as
``python3 -I -S forkserver.py SOCKET``, or started on the host by the process runner. Paying
interpreter start-up once per sandbox instead of once per call is what makes a warm
invocation cost a fork (about a millisecond) instead of a ``docker exec`` or a fresh
``python3`` (tens of milliseconds).

Protocol on an AF_UNIX SOCK_SEQPACKET socket, one JSON object per packet, one client at a
time, one run at a time:

    -> {"op": "run", "argv": [...], "cwd": ..., "env": {...}, "python": bool,
        "rlimits": {"as": bytes, "nproc": n} | null,
        "preload": code_key | null}                        + SCM_RIGHTS [stdin, stdout, stderr]
    <- {"pid": pid}
    -> {"op": "kill"}                                        (optional, e.g. on timeout)
    <- {"status": waitstatus, "maxrss_kb": n, "duration_ns": n, "preloading": bool}
    <- {"preloaded": [module, ...], "left_out": {module: why}}   (only after "preloading")

With ``"python": true`` the child runs ``argv[1]`` with runpy as ``python3 argv[1]`` would
(``__main__``, ``sys.argv``, ``sys.path[0]``, exit codes, tracebacks), without exec'ing a
new interpreter; otherwise it exec's ``argv``.

Import-warm (``"preload"``, python runs only): the first run reports, over a pipe, the modules
it imported from the standard library and from its own directory; after replying, the server
vets them in a forked helper (each must import without error, within ``PRELOAD_BUDGET_S`` for
the lot, without leaving a thread or a file descriptor behind, without reading the environment
or stdin, writing to stdout or stderr, or keeping a reference to them: all of that belongs to
the call) and imports the ones that pass itself, with the function's directory on sys.path.
Every later fork starts with them in memory, as copies: what a run changes in a module never
reaches the next run. A sandbox serves one function@version (the agent's ``code_key``), so
this happens once per sandbox; a run for another key gets none of the function's modules.

Started by a root agent with ``"isolate"`` in its options, the server sets its sandbox up
once, before it serves (every run inherits it, so a call costs nothing more): its own mount
namespace (private /tmp and /dev/shm tmpfs, /var/tmp and the sandbox directory read-only),
network namespace (loopback only) and PID namespace, whose PID 1 it becomes: it forks once,
the original process stays outside as the namespace's keeper (it waits for the server and
dies with the agent), and the server mounts a fresh /proc, reaps orphans during a run and
kills what a run left behind after it. A namespace the kernel refuses is left out and named
in the ready line: ``{"pid": <the server's pid on the host>, "holds": [...],
"missing": {name: reason}}``.

With ``"exec"`` in its options (another runtime's server, e.g. ``node nodeserver.js``), it
sets the same sandbox up and then exec's that server instead of serving: within a PID
namespace it stays PID 1 (reaping what runs orphan, exiting with the server) and the server
runs as its child; the exec'd server writes the ready line when it serves.
"""

import array
import atexit
import contextlib
import ctypes  # at the top: after drop_privileges() the sandbox's uid may not be able to
import fcntl  # read the stdlib of the interpreter that started it (a pyenv in /root)
import gc
import io
import json
import os
import pkgutil  # noqa: F401  loaded once here: runpy imports it lazily in every child
import resource
import runpy
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import traceback

MAX_PACKET = 1 << 20
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
PR_SET_PDEATHSIG = 1
RLIMITS = {"nofile": "RLIMIT_NOFILE", "fsize": "RLIMIT_FSIZE", "core": "RLIMIT_CORE"}
PRELOAD_BUDGET_S = 2.0
"""How long the vetting of a function's imports may take, for all of them together."""
STDLIB = os.path.dirname(os.__file__)
_libc = ctypes.CDLL(None, use_errno=True)


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
    if sys.path[:1] != [cwd]:  # a server that preloaded the function's modules has it there
        sys.path.insert(0, cwd)
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


def child(request: dict, fds: list, keep_closed: list, preload: "Preload") -> None:
    """In the forked child: become the function. Never returns."""
    code = 127
    try:
        preload.enter(request.get("preload"))
        os.setsid()
        signal.set_wakeup_fd(-1)  # the function's own handlers must not write into a stale fd
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
            before = set(sys.modules) if preload.pending() else set()
            code = run_python(argv, request["cwd"])
            preload.report(before, request["cwd"])
        else:
            os.execvpe(argv[0], argv, request["env"])
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(2, f"nanogrid: cannot start {request.get('argv')}: {exc}\n".encode())
    os._exit(code)


def serve_run(
    conn: socket.socket,
    request: dict,
    fds: list,
    listener: socket.socket,
    wakeup: tuple | None,
    preload: "Preload",
) -> None:
    """Fork one run and report its end; then preload what it imported, if asked to.
    ``wakeup`` (PID 1 only): the SIGCHLD wake-up pipe, so orphans the run leaves to this
    server are reaped while it lasts."""
    preload.expect(request)
    started = time.monotonic_ns()
    pid = os.fork()
    if pid == 0:
        child(request, fds, [conn.fileno(), listener.fileno(), *(wakeup or ())], preload)
    for fd in fds:
        os.close(fd)
    send_packet(conn, {"pid": pid})
    pidfd = os.pidfd_open(pid)
    with selectors.DefaultSelector() as sel:
        sel.register(pidfd, selectors.EVENT_READ)
        sel.register(conn, selectors.EVENT_READ)
        if wakeup is not None:
            sel.register(wakeup[0], selectors.EVENT_READ)
        exited = False
        while not exited:
            for key, _ in sel.select():
                if key.fileobj == pidfd:
                    exited = True
                    continue
                if wakeup is not None and key.fileobj == wakeup[0]:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wakeup[0], 512)
                    exited = reap_orphans(pid) or exited
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
    if wakeup is not None:
        kill_namespace()
    else:
        kill_group(pid)
    preloading = preload.pending()
    send_packet(conn, {"status": status, "maxrss_kb": usage.ru_maxrss, "duration_ns": duration,
                       "preloading": preloading})
    if preloading:  # the agent waits for this before it measures and cleans up the sandbox
        loaded = preload.load(request["cwd"], [conn.fileno(), listener.fileno(), *(wakeup or ())])
        send_packet(conn, loaded)


class Preload:
    """The function's imports this server holds (see the module docstring)."""

    def __init__(self) -> None:
        self.key: str | None = None
        """The code_key whose modules are loaded; set once, after its first run."""
        self.path = ""
        """The function's directory, first on this server's sys.path once loaded."""
        self.own: list = []
        """Modules loaded from the function's directory."""
        self._pipe: tuple | None = None
        self._asked: str | None = None

    def expect(self, request: dict) -> None:
        """Before the fork: open the pipe the run reports its imports on, if they are wanted."""
        key = request.get("preload")
        if key and request.get("python") and self.key is None:
            self._pipe = os.pipe2(os.O_CLOEXEC)
            self._asked = key

    def enter(self, key: str | None) -> None:
        """In the child: a run of another function must not find this one's modules."""
        if self._pipe is not None:
            os.close(self._pipe[0])
        if self.key is not None and key != self.key:
            for name in self.own:
                sys.modules.pop(name, None)
            if sys.path[:1] == [self.path]:
                del sys.path[0]

    def report(self, before: set, cwd: str) -> None:
        """In the child, after the run: name the modules it imported that may be preloaded."""
        if self._pipe is None:
            return
        roots = (os.path.join(STDLIB, ""), os.path.join(cwd, ""))
        skip = tuple(os.path.join(STDLIB, d, "") for d in ("site-packages", "dist-packages"))
        names = []
        for name, module in list(sys.modules.items()):
            origin = getattr(getattr(module, "__spec__", None), "origin", None)
            if name in before or name == "__main__" or not isinstance(origin, str):
                continue
            if origin in ("built-in", "frozen") or (
                origin.startswith(roots) and not origin.startswith(skip)
            ):
                names.append(name)
        with contextlib.suppress(OSError):
            os.set_blocking(self._pipe[1], False)  # a list too long for the pipe is dropped
            os.write(self._pipe[1], json.dumps(names).encode())

    def pending(self) -> bool:
        """This run reports its imports (in the child) / reported them (in the server)."""
        return self._pipe is not None

    def load(self, cwd: str, keep_closed: list) -> dict:
        """In the server, after the run: vet the reported modules, import those that pass.
        Returns what was loaded and what was left out."""
        assert self._pipe is not None
        read, write = self._pipe
        self._pipe = None
        os.close(write)
        data = b""
        os.set_blocking(read, False)
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read, 65536):
                data += chunk
        os.close(read)
        try:
            names = [n for n in json.loads(data) if isinstance(n, str)] if data else []
        except ValueError:
            names = []
        self.key, self.path = self._asked, cwd
        passed, left_out = vet(names, cwd, keep_closed)
        sys.path.insert(0, cwd)
        for name in passed:
            try:
                __import__(name)
            except BaseException as exc:  # passed in the helper; keep the server serving
                left_out[name] = f"{type(exc).__name__} in the server"
        own = os.path.join(cwd, "")
        self.own = [
            name
            for name, module in list(sys.modules.items())
            if str(getattr(module, "__file__", "") or "").startswith(own)
        ]
        gc.collect()
        gc.freeze()  # as warm_up: keeps the children's collector off these pages
        return {"preloaded": [n for n in passed if n not in left_out], "left_out": left_out}


def vet(names: list, cwd: str, keep_closed: list) -> tuple[list, dict]:
    """Import ``names`` in a forked helper first: (those that passed, {left out: why})."""
    todo = [name for name in names if name not in sys.modules]
    if not todo:
        return [], {}
    read, write = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read)
            for fd in keep_closed:
                os.close(fd)
            os.setsid()  # its group is killed with it: whatever an import started goes too
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            sys.path.insert(0, cwd)
            vet_in_helper(todo, write)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    deadline = time.monotonic() + PRELOAD_BUDGET_S
    data = b""
    timed_out = False
    while True:
        wait = deadline - time.monotonic()
        if wait <= 0 or not select_readable(read, wait):
            timed_out = True
            break
        chunk = os.read(read, 65536)
        if not chunk:
            break
        data += chunk
    os.close(read)
    kill_group(pid)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    verdicts = dict(json.loads(line) for line in data.decode().splitlines() if line)
    passed = [name for name in todo if verdicts.get(name) == "ok"]
    left_out = {name: why for name, why in verdicts.items() if why != "ok"}
    if timed_out:
        hung = next((name for name in todo if name not in verdicts), None)
        if hung is not None:
            left_out[hung] = f"took longer than {PRELOAD_BUDGET_S} s"
    return passed, left_out


def select_readable(fd: int, timeout: float) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        return bool(sel.select(timeout))


class _Watched:
    """Stands in for stdin, stdout or stderr in the vetting helper: notes any use."""

    def __init__(self, used: list) -> None:
        self._used = used

    def __getattr__(self, name: str) -> object:
        self._used.append("stdio")
        raise OSError("not during a preload")


def side_effect(fds: int, tasks: int, used: list, streams: list, refs: list) -> str:
    """What an import left that belongs to the call, not the server ("ok": nothing)."""
    if "thread" in used or len(os.listdir("/proc/self/task")) > tasks:
        return "started a thread"
    if len(os.listdir("/proc/self/fd")) > fds:
        return "left a file descriptor open"
    if used or [sys.getrefcount(stream) for stream in streams] != refs:
        return "uses the environment, stdin, stdout or stderr at import"
    if any(a is not b for a, b in zip((sys.stdin, sys.stdout, sys.stderr), streams, strict=True)):
        return "replaced stdin, stdout or stderr"
    return "ok"


def vet_in_helper(names: list, out: int) -> None:
    """In the helper: import each name, write one JSON line ``[name, "ok" | why]`` each."""
    used: list = []
    environ = type(os.environ)

    class WatchedEnviron(environ):  # type: ignore[misc, valid-type]
        def __getitem__(self, key: object) -> object:
            used.append("environ")
            return super().__getitem__(key)

        def __iter__(self) -> object:
            used.append("environ")
            return super().__iter__()

    os.environ.__class__ = WatchedEnviron
    start_thread = threading._start_new_thread  # type: ignore[attr-defined]

    def watched_start(*args: object, **kwargs: object) -> object:
        used.append("thread")  # noted even when the thread is over before it is looked for
        return start_thread(*args, **kwargs)

    threading._start_new_thread = watched_start  # type: ignore[attr-defined]
    streams = [_Watched(used) for _ in range(3)]
    sys.stdin, sys.stdout, sys.stderr = streams
    for name in names:
        if name in sys.modules:  # came with an earlier one
            verdict = "ok"
        else:
            fds, tasks = len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))
            refs = [sys.getrefcount(stream) for stream in streams]
            used.clear()
            try:
                __import__(name)
                verdict = "ok"
            except BaseException as exc:
                verdict = f"import failed: {type(exc).__name__}"
            verdict = verdict if verdict != "ok" else side_effect(fds, tasks, used, streams, refs)
        os.write(out, (json.dumps([name, verdict]) + "\n").encode())


def kill_group(pgid: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pgid, signal.SIGKILL)


def reap_orphans(run_pid: int) -> bool:
    """Reap exited children other than the run's own; True once the run's child has exited."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        if info is None:
            return False
        if info.si_pid == run_pid:
            return True  # left for wait4, which reads its rusage
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.si_pid, 0)


def kill_namespace() -> None:
    """As PID 1: SIGKILL every other process of the namespace and reap them all."""
    while True:
        with contextlib.suppress(OSError):
            os.kill(-1, signal.SIGKILL)  # from PID 1: everyone in the namespace but itself
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return
        time.sleep(0.001)  # killed, not yet gone


def die_with_parent(parent: int) -> None:
    """Ask the kernel to kill this process when the one that started it dies."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(0)


def join_cgroups(cgroup_procs: list) -> None:
    """Join the sandbox's cgroups (needs root: before dropping it)."""
    for path in cgroup_procs:
        with open(path, "w") as f:
            f.write(str(os.getpid()))


def drop_privileges(uid: int, gid: int) -> None:
    if uid >= 0 and os.getuid() == 0:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)


def set_rlimits(limits: dict) -> None:
    """Hard and soft limits, inherited by every run (a function cannot raise them again)."""
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, RLIMITS[name]), (value, value))


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    def arg(text: str | None) -> bytes | None:
        return None if text is None else text.encode()

    _check(_libc.mount(arg(source), arg(target), arg(fstype), flags, arg(data)), f"mount {target}")


def unshare(flag: int, missing: dict, name: str) -> bool:
    """Enter a new namespace of one kind; on refusal, note why under ``name``."""
    if _libc.unshare(flag) == 0:
        return True
    missing[name] = f"the kernel refused the namespace: {os.strerror(ctypes.get_errno())}"
    return False


def loopback_up() -> None:
    """Bring up ``lo``, the only interface of a new network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def isolate(settings: dict) -> tuple[list, dict]:
    """As root: new mount, network and PID namespaces for this server (the PID namespace is
    for its children). Returns (what holds, {what is missing: why})."""
    holds: list = []
    missing: dict = {}
    host_mounts = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    if unshare(CLONE_NEWNS, missing, "mount"):
        try:
            mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here reaches the host
            private_mounts(settings["tmpfs_mb"], settings.get("root"))
            holds.append("mount")
        except OSError as exc:  # e.g. in a container that may unshare but not mount
            _check(_libc.setns(host_mounts, CLONE_NEWNS), "back to the host's mounts")
            missing["mount"] = f"cannot mount in its namespace: {exc.strerror}"
    os.close(host_mounts)
    if not settings["network"]:
        missing["network"] = "process.network is host"
    elif unshare(CLONE_NEWNET, missing, "network"):
        holds.append("network")
        try:
            loopback_up()
        except OSError as exc:  # no CAP_NET_ADMIN (a container): no network at all, not even lo
            missing["loopback"] = f"cannot bring up lo: {exc.strerror}"
    if "mount" not in holds:  # its /proc would be mounted over the host's
        missing["pid"] = "needs the mount namespace"
    elif unshare(CLONE_NEWPID, missing, "pid"):
        holds.append("pid")
    return holds, missing


def private_mounts(tmpfs_mb: int, root: str | None) -> None:
    """Private /tmp and /dev/shm, read-only /var/tmp; ``root`` (the sandbox's directory) bound
    at its own path again, which the new /tmp hides when it lies below /tmp."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY) if root else None
    options = f"size={tmpfs_mb}m,mode=1777"
    for target in ("/tmp", "/dev/shm"):
        if os.path.isdir(target):
            mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, options)
    if os.path.isdir("/var/tmp"):
        mount("/var/tmp", "/var/tmp", None, MS_BIND)
        mount(None, "/var/tmp", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    if root_fd is not None:
        missing = [p for p in [root, *parents(root)] if not os.path.exists(p)]
        for path in reversed(missing):
            os.mkdir(path)
            os.chmod(path, 0o711)  # the umask must not lock the sandbox out of its own path
        mount(f"/proc/self/fd/{root_fd}", root, None, MS_BIND)
        os.close(root_fd)


def parents(path: str) -> list:
    found = []
    while (parent := os.path.dirname(path)) != path:
        found.append(parent)
        path = parent
    return found


def seal(root: str) -> None:
    """Make the sandbox's directory (its code, the control socket's) read-only to it."""
    mount(None, root, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def become_init(parent: int, uid: int, gid: int) -> int:
    """Fork into the new PID namespace: the child goes on as its PID 1 and gets a /proc of its
    own; this process stays outside as the keeper, which waits for it and exits with it (and
    dies with ``parent``, the agent). Returns the server's pid on the host."""
    server = os.fork()
    if server:
        keep(server, parent, uid, gid)
    host_pid = int(os.readlink("/proc/self"))  # still the host's procfs: the pid seen there
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    return host_pid


def keep(server: int, parent: int, uid: int, gid: int) -> None:
    """The keeper: wait for the server (PID 1 of the namespace), exit with it. Never returns."""
    code = 1
    try:
        drop_privileges(uid, gid)
        if parent:
            die_with_parent(parent)
        _, status = os.waitpid(server, 0)
        code = os.waitstatus_to_exitcode(status) & 0xFF
    finally:
        os._exit(code)


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


def exec_server(command: list, options: dict, parent: int, report: dict) -> None:
    """Become another runtime's server (``options["exec"]``) in the sandbox made so far: join
    its cgroups, set its rlimits, drop root, then exec. The server is given the ready fd and
    the line to write there once it serves (this process's report). Never returns."""
    join_cgroups(options.get("cgroup_procs", []))
    os.umask(0o077)
    set_rlimits(options.get("rlimits") or {})
    drop_privileges(options.get("uid", -1), options.get("gid", -1))
    if options.get("pdeathsig"):  # after dropping root: changing uid clears the death signal
        die_with_parent(parent)
    ready = {"ready_fd": options.get("ready_fd"), "ready_line": json.dumps(report) + "\n"}
    os.execv(command[0], [*command, json.dumps(ready)])


def init_for(command: list, options: dict, host_proc: int, report: dict) -> int:
    """As PID 1 of the sandbox's namespace: start the exec'd server as its child, reap what
    its runs orphan (a node server cannot) and exit with the server."""
    root = (options.get("isolate") or {}).get("root")
    if "mount" in report["holds"] and root:
        seal(root)
    server = os.fork()
    if server == 0:
        code = 127
        try:
            # The pid on the host, read in the host's procfs (this namespace's /proc has 2).
            host_pid = int(os.readlink("self", dir_fd=host_proc))
            os.close(host_proc)
            exec_server(command, options, 1, {"pid": host_pid, **report})
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(host_proc)
    drop_privileges(options.get("uid", -1), options.get("gid", -1))
    if options.get("pdeathsig"):
        die_with_parent(0)  # the keeper, outside this namespace
    while True:
        pid, status = os.wait()
        if pid == server:
            return os.waitstatus_to_exitcode(status) & 0xFF


def probe(settings: dict) -> int:
    """``--probe SETTINGS``: what isolation this host grants a sandbox, as one JSON line
    ``{"holds": [...], "missing": {...}}`` (the agent runs it at start for its warning and
    /status; the namespaces die with this process)."""
    try:
        holds, missing = isolate(settings)
    except OSError as exc:
        holds, missing = [], {"setup": str(exc)}
    if "pid" in holds:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            except OSError:
                code = 1
            os._exit(code)
        if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
            holds.remove("pid")
            missing["pid"] = "cannot mount a /proc of its own"
    print(json.dumps({"holds": holds, "missing": missing}))
    return 0


def main(argv: list) -> int:
    if argv[1] == "--probe":
        return probe(json.loads(argv[2]))
    path = argv[1]
    options = json.loads(argv[2]) if len(argv) > 2 else {}
    uid, gid = options.get("uid", -1), options.get("gid", -1)
    parent = os.getppid()
    settings = options.get("isolate")
    command = options.get("exec")
    try:
        holds, missing = isolate(settings) if settings else ([], {})
        if command and "mount" in holds and settings.get("root"):
            # The exec'd server stages each call's stdin in its control directory: it stays
            # writable when the rest is sealed (the agent takes its ownership once it is ready).
            mount(os.path.dirname(path), os.path.dirname(path), None, MS_BIND)
        host_proc = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) if command else -1
    except OSError as exc:
        print(f"nanogrid fork server: cannot set up the sandbox: {exc}", file=sys.stderr)
        return 1
    host_pid = os.getpid()
    wakeup = None
    if "pid" in holds:
        host_pid = become_init(parent if options.get("pdeathsig") else 0, uid, gid)
        parent = 0  # the keeper lies outside this namespace: getppid() is 0 from now on
        if command:
            report = {"holds": holds, "missing": missing}
            return init_for(command, options, host_proc, report)
        wakeup = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wakeup[1], warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes serve_run to reap orphans
    elif command:
        if "mount" in holds and settings.get("root"):
            seal(settings["root"])
        os.close(host_proc)
        report = {"pid": host_pid, "holds": holds, "missing": missing}
        exec_server(command, options, parent, report)
    else:  # PID 1 keeps the default: signals from its own namespace cannot kill it
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    join_cgroups(options.get("cgroup_procs", []))
    os.umask(0o077)
    warm_up(os.path.dirname(path))  # before the socket appears: its existence means ready
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
        die_with_parent(parent)
    ready = options.get("ready_fd")
    if ready is not None:
        line = json.dumps({"pid": host_pid, "holds": holds, "missing": missing}) + "\n"
        os.write(ready, line.encode())
        os.close(ready)
    preload = Preload()
    while True:
        conn, _ = listener.accept()
        with conn:
            while True:
                request, fds = recv_packet(conn)
                if request is None:
                    break
                if request.get("op") == "run" and len(fds) == 3:
                    serve_run(conn, request, fds, listener, wakeup, preload)
                else:
                    for fd in fds:
                        os.close(fd)
                    send_packet(conn, {"error": "expected a run request with 3 descriptors"})


if __name__ == "__main__":
    sys.exit(main(sys.argv))
