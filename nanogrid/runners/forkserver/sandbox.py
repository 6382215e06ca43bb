"""The sandbox's set-up, made once by its server before it serves (every run inherits it, so
a call costs nothing more).

Started by a root agent with ``"isolate"`` in its options, the server gets its own mount
namespace (private /tmp and /dev/shm tmpfs; of the work dir only the sandbox's own directory,
read-only; an empty read-only tmpfs over each world-writable host directory the agent found,
a read-only bind over each such file), IPC namespace (SysV objects and POSIX message queues
of its own, gone with the sandbox) and network namespace (loopback only). Its template forked
it as PID 1 of a PID namespace of its own (template.py): it mounts a fresh /proc, reaps
orphans during a run and kills what a run left behind after it; no process of the sandbox's
lies outside the namespace. A namespace the kernel refuses is left out and named in the ready
line: ``{"pid": <the server's pid on the host>, "holds": [...], "missing": {name:
reason}}``. Then it joins the sandbox's cgroups, sets its rlimits and drops root.

With ``"exec"`` in its options (another runtime's server, e.g. ``node nodeserver``), it
sets the same sandbox up and then exec's that server instead of serving, which thereby is the
namespace's PID 1 (a node server reaps only the processes it started: the agent does not keep
a sandbox whose run left any other behind, runner.py); the exec'd server writes the ready line
when it serves.
"""

import ctypes
import fcntl
import json
import os
import resource
import select
import signal
import socket
import stat
import struct

from .clone import fork_into

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
PR_SET_PDEATHSIG = 1
RLIMITS = {"nofile": "RLIMIT_NOFILE", "fsize": "RLIMIT_FSIZE", "core": "RLIMIT_CORE"}
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(parent: int, parent_fd: int | None = None) -> None:
    """Ask the kernel to kill this process when the one that started it dies; exit now if it
    is gone already: ``parent`` (its pid as getppid() saw it) changed, or its pidfd
    ``parent_fd`` says it exited (from a new PID namespace getppid() is 0 either way)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    gone = parent_fd is not None and select.select([parent_fd], [], [], 0)[0]
    if gone or os.getppid() != parent:
        os._exit(0)


def join_cgroups(cgroup_procs: list, joined: str | None = None) -> None:
    """Join the sandbox's cgroups (needs root: before dropping it), but the one this process
    was born in (``joined``, a directory: clone.py). It is single-threaded, so in a v1
    hierarchy it moves its one thread: "0" written to ``tasks`` moves the writer without the
    kernel's cgroup-wide lock, whose write waits for an RCU grace period when no other move
    came just before (0.5 ms against 11 ms p50 for memory and pids here, 29 ms at worst)."""
    for path in cgroup_procs:
        directory = os.path.dirname(path)
        if directory == joined:
            continue
        try:
            fd = os.open(os.path.join(directory, "tasks"), os.O_WRONLY)  # v1 only
            what = b"0"
        except FileNotFoundError:
            fd, what = os.open(path, os.O_WRONLY), str(os.getpid()).encode()
        try:
            os.write(fd, what)
        finally:
            os.close(fd)


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


def isolate(settings: dict, pid_namespace: object) -> tuple[list, dict]:
    """As root: new mount, IPC and network namespaces for this server; ``pid_namespace``:
    True if it was born as PID 1 of a new PID namespace, else why not. Returns (what holds,
    {what is missing: why})."""
    holds: list = []
    missing: dict = {}
    host_mounts = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    if unshare(CLONE_NEWNS, missing, "mount"):
        try:
            mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here reaches the host
            uncovered = private_mounts(settings)
            holds.append("mount")
            if uncovered:
                missing["writable host paths"] = "cannot mount over " + ", ".join(uncovered)
        except OSError as exc:  # e.g. in a container that may unshare but not mount
            _check(_libc.setns(host_mounts, CLONE_NEWNS), "back to the host's mounts")
            missing["mount"] = f"cannot mount in its namespace: {exc.strerror}"
    os.close(host_mounts)
    if unshare(CLONE_NEWIPC, missing, "ipc"):
        holds.append("ipc")
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
    elif pid_namespace is not True:
        missing["pid"] = str(pid_namespace or "not forked by a sandbox template")
    else:
        holds.append("pid")
    return holds, missing


def private_mounts(settings: dict) -> list:
    """Private /tmp and /dev/shm; an empty tmpfs over each world-writable host path of
    ``settings["cover"]`` (a read-only bind over a file) and over ``settings["work_dir"]``;
    ``settings["root"]`` (the sandbox's directory) bound at its own path again, below
    whichever of them hides it. Then the tmpfs over each is made read-only. Returns the
    paths it could not mount over, each with why."""
    root = settings.get("root")
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY) if root else None
    options = f"size={settings['tmpfs_mb']}m,mode=1777"
    for target in ("/tmp", "/dev/shm"):
        if os.path.isdir(target):
            mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, options)
    targets = [(path, 0o755) for path in settings.get("cover") or ()]
    if settings.get("work_dir"):
        targets.append((settings["work_dir"], 0o711))
    covered: list = []
    uncovered = []
    for path, mode in targets:
        try:
            cover(path, mode, covered)
        except OSError as exc:
            uncovered.append(f"{path} ({exc.strerror})")
    if root_fd is not None:
        missing = [p for p in [root, *parents(root)] if not os.path.exists(p)]
        for path in reversed(missing):
            os.mkdir(path)
            os.chmod(path, 0o711)  # the umask must not lock the sandbox out of its own path
        mount(f"/proc/self/fd/{root_fd}", root, None, MS_BIND)
        os.close(root_fd)
    for path, flags in covered:
        mount(None, path, None, flags | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    return uncovered


def cover(path: str, mode: int, covered: list) -> None:
    """Hide a directory at ``path`` under an empty tmpfs of ``mode``, or bind a file on itself
    (both made read-only once the sandbox's own directory is bound below them); notes what it
    mounted in ``covered``. A path gone (below one covered before) is left alone."""
    try:
        kind = stat.S_IFMT(os.lstat(path).st_mode)
    except FileNotFoundError:
        return
    if kind == stat.S_IFDIR:
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
              f"size=64k,nr_inodes=64,mode={mode:o}")
        covered.append((path, MS_NOEXEC))
    elif kind == stat.S_IFREG:
        mount(path, path, None, MS_BIND)
        covered.append((path, MS_BIND | MS_NOEXEC))


def parents(path: str) -> list:
    found = []
    while (parent := os.path.dirname(path)) != path:
        found.append(parent)
        path = parent
    return found


def keep_writable(path: str) -> None:
    """Bind ``path`` on itself: a mount of its own stays writable when ``seal`` makes the
    sandbox's directory around it read-only."""
    mount(path, path, None, MS_BIND)


def seal(root: str) -> None:
    """Make the sandbox's directory (its code, the control socket's) read-only to it."""
    mount(None, root, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def own_proc() -> int:
    """As PID 1 of its own PID namespace (and mount namespace): mount the namespace's /proc.
    Returns this process's pid on the host, read before in the host's procfs."""
    host_pid = int(os.readlink("/proc/self"))
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    return host_pid


def exec_server(command: list, options: dict, parent: int, report: dict) -> None:
    """Become another runtime's server (``options["exec"]``) in the sandbox made so far: join
    its cgroups (but the one it was born in), set its rlimits, drop root, then exec. The
    server is given the ready fd and the line to write there once it serves (this process's
    report). Never returns."""
    join_cgroups(options.get("cgroup_procs", []), options.get("born_in"))
    os.umask(0o077)
    set_rlimits(options.get("rlimits") or {})
    drop_privileges(options.get("uid", -1), options.get("gid", -1))
    if options.get("pdeathsig"):  # after dropping root: changing uid clears the death signal
        die_with_parent(parent, options.get("parent_fd"))
    ready = {"ready_fd": options.get("ready_fd"), "ready_line": json.dumps(report) + "\n"}
    os.execv(command[0], [*command, json.dumps(ready)])


def probe(settings: dict) -> int:
    """``--probe SETTINGS``: what isolation this host grants a sandbox, as one JSON line
    ``{"holds": [...], "missing": {...}}`` (the agent runs it at start for its warning and
    /status; the namespaces die with this process)."""
    try:
        holds, missing = isolate(settings, True)
    except OSError as exc:
        holds, missing = [], {"setup": str(exc)}
    if "pid" in holds:  # forked as the template forks a sandbox (template.fork_sandbox)
        try:
            pid = fork_into(None, CLONE_NEWPID)[0]
        except OSError as exc:
            pid = -1
            holds.remove("pid")
            missing["pid"] = f"the kernel refused the namespace: {exc.strerror}"
        if pid == 0:
            code = 0
            try:
                mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            except OSError:
                code = 1
            os._exit(code)
        if pid > 0 and os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
            holds.remove("pid")
            missing["pid"] = "cannot mount a /proc of its own"
    print(json.dumps({"holds": holds, "missing": missing}))
    return 0
