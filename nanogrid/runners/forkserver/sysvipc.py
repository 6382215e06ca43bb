"""The SysV IPC objects (shared memory, semaphores, message queues) a run leaves behind,
removed after each run when the server's IPC namespace is its sandbox's own.

They outlive the processes that made them: shared memory stays charged to the sandbox's
cgroup, so what one run left would count against the next run's memory limit. Only a
server whose namespace no one else shares may remove everything in it: the process
runner's, which made one in ``isolate``, and a container's (``"own_ipc"`` in its options);
a server in the host's namespace (the agent not root) leaves it alone. After a run the
server checks three counters (one syscall each); it reads ``/proc/sysvipc`` (which lists
every object, whatever its mode) only when one is not zero.
"""

import ctypes

IPC_RMID = 0
_libc = ctypes.CDLL(None, use_errno=True)


def _shmctl(ident: int, command: int, buf: object) -> int:
    return _libc.shmctl(ident, command, buf)


def _semctl(ident: int, command: int, buf: object) -> int:
    return _libc.semctl(ident, 0, command, buf)


def _msgctl(ident: int, command: int, buf: object) -> int:
    return _libc.msgctl(ident, command, buf)


_INFO = ctypes.create_string_buffer(128)
"""Filled by each INFO call: made once, as the server makes what every run needs."""
KINDS = (
    ("shm", _shmctl, 14, ctypes.c_int.from_buffer(_INFO, 0)),  # SHM_INFO: shm_info.used_ids
    ("sem", _semctl, 19, ctypes.c_int.from_buffer(_INFO, 28)),  # SEM_INFO: seminfo.semusz
    ("msg", _msgctl, 12, ctypes.c_int.from_buffer(_INFO, 0)),  # MSG_INFO: msginfo.msgpool
)
"""Per kind: its /proc/sysvipc file, its ctl call, the INFO command and the field of the
structure it fills in with the number of objects that exist."""
_own = False


def own_namespace() -> None:
    """This server's IPC namespace is its sandbox's alone: ``remove_left`` clears it."""
    global _own
    _own = True


def remove_left() -> None:
    """After a run (its processes ended): remove every SysV object in the namespace."""
    if not _own:
        return
    for kind, ctl, info_command, count in KINDS:
        if ctl(0, info_command, _INFO) >= 0 and count.value:
            for ident in ids(kind):
                ctl(ident, IPC_RMID, None)


def ids(kind: str) -> list:
    """The ids of the namespace's objects of one kind (the second column)."""
    try:
        with open(f"/proc/sysvipc/{kind}") as listing:
            return [int(line.split()[1]) for line in listing.readlines()[1:]]
    except OSError:
        return []
