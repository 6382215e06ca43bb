"""A fork whose child is born in a cgroup: ``clone3(CLONE_INTO_CGROUP)`` (Linux 5.7+, a
cgroup2 directory), so the sandbox's server never runs outside its cgroup and no write to a
``cgroup.procs`` file moves it there afterwards (a move takes the kernel's cgroup-wide
lock: ~55 us here, a v1 memory move ~265 us and up to 11 ms). Python has no clone3, so
this calls the syscall with the interpreter's own fork hooks around it, as ``os.fork``
does (the interpreter lock held throughout: the process is single-threaded). Where the
kernel refuses it (too old, a seccomp filter, no such directory) it is a plain fork and
the child joins by writing its pid, as before.
"""

import ctypes
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


def fork_into(cgroup2: str | None) -> tuple[int, bool]:
    """Fork; the child born in the cgroup2 directory ``cgroup2`` where the kernel allows it.
    Returns (pid, whether the child is in that cgroup): (0, ...) in the child, as os.fork."""
    if cgroup2 is None:
        return os.fork(), False
    try:
        directory = os.open(cgroup2, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return os.fork(), False
    args = CloneArgs(flags=CLONE_INTO_CGROUP, exit_signal=signal.SIGCHLD, cgroup=directory)
    _api.PyOS_BeforeFork()
    pid = _libc.syscall(SYS_CLONE3, ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
    if pid == 0:
        _api.PyOS_AfterFork_Child()
    else:
        _api.PyOS_AfterFork_Parent()
    os.close(directory)
    if pid < 0:  # ENOSYS, E2BIG or EINVAL (before 5.7), EPERM (seccomp), ENOENT, ...
        return os.fork(), False
    return pid, True
