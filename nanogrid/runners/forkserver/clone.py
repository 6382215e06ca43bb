"""A fork whose child is born in a cgroup (``clone3(CLONE_INTO_CGROUP)``, Linux 5.7+, a
cgroup2 directory), and, when asked, as PID 1 of a new PID namespace (``CLONE_NEWPID``).

Born in its cgroup, the sandbox's server never runs outside it and no write to a
``cgroup.procs`` file moves it there afterwards (a move takes the kernel's cgroup-wide
lock: ~55 us here, a v1 memory move ~265 us and up to 11 ms). Born as PID 1, the sandbox
needs no process outside its namespace to hold it (its own unshare would leave it out
there). Python has no clone3, so this calls the syscall with the interpreter's own fork hooks
around it, as ``os.fork`` does (the interpreter lock held throughout: the process is
single-threaded). Where the kernel refuses the cgroup (too old, a seccomp filter, no such
directory) the child is born outside it and joins by writing its pid, as before.
"""

import ctypes
import errno
import os
import signal

SYS_CLONE3 = 435
"""The same number on every architecture (the generic syscall table)."""
CLONE_INTO_CGROUP = 0x200000000


class CloneArgs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
        "tls", "set_tid", "set_tid_size", "cgroup")]


_libc = ctypes.PyDLL(None, use_errno=True)
"""PyDLL: the interpreter lock stays held across the call, as ``os.fork`` holds it."""
_libc.syscall.restype = ctypes.c_long
_api = ctypes.pythonapi


def fork_into(cgroup2: str | None, flags: int = 0) -> tuple[int, bool]:
    """Fork with the clone ``flags`` (namespaces: OSError where the kernel refuses them); the
    child born in the cgroup2 directory ``cgroup2`` where the kernel allows it. Returns (pid,
    whether the child is in that cgroup): (0, ...) in the child, as os.fork."""
    if cgroup2 is not None:
        try:
            directory = os.open(cgroup2, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            directory = -1
        if directory >= 0:
            pid = _clone3(flags | CLONE_INTO_CGROUP, directory)
            os.close(directory)
            if pid >= 0:
                return pid, True
            # ENOSYS, E2BIG or EINVAL (before 5.7), EPERM (seccomp), ENOENT, ...: without it
    if not flags:
        return os.fork(), False
    pid = _clone3(flags, 0)
    if pid >= 0:
        return pid, False
    if ctypes.get_errno() != errno.ENOSYS:
        raise _refused()
    return _fork_unshared(flags), False


def _fork_unshared(flags: int) -> int:
    """Where there is no clone3 (before 5.3, or under a seccomp filter such as systemd's
    ``RestrictNamespaces=``, which cannot read clone3's flags and so refuses the call whole):
    unshare the PID namespace of this process's children, fork, then give the parent's next
    children its own namespace again (setns to it)."""
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.unshare(flags) != 0:
            raise _refused()
        pid = -1
        try:
            pid = os.fork()
        finally:
            if pid != 0 and _libc.setns(own, flags) != 0:
                raise _refused()
        return pid
    finally:
        os.close(own)


def _refused() -> OSError:
    error = ctypes.get_errno()
    return OSError(error, os.strerror(error))


def _clone3(flags: int, cgroup: int) -> int:
    """clone3 as os.fork: the pid in the parent, 0 in the child, -1 (errno set) if refused."""
    args = CloneArgs(flags=flags, exit_signal=signal.SIGCHLD, cgroup=cgroup)
    _api.PyOS_BeforeFork()
    pid = _libc.syscall(SYS_CLONE3, ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
    if pid == 0:
        _api.PyOS_AfterFork_Child()
    else:
        _api.PyOS_AfterFork_Parent()
    return pid
