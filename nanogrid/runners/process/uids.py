"""The process runner's sandbox uids (when the agent runs as root): each worker has its own
range, and each live sandbox a uid of it that no other sandbox has.

A uid is what keeps one sandbox out of another's files (its code, control directory and a
node sandbox's staged stdin) and processes, so it is never shared: a new sandbox takes the
uid that has been free the longest, and a destroyed sandbox's uid is free again only once
nothing of it can run any more: its PID namespace's PID 1 is gone (the kernel ends every
process of the namespace first) or its cgroup was emptied and removed; with neither, every
process of the uid is killed first.

A worker with all 1000 uids of its range live gets a SandboxError for the next sandbox
instead of a shared uid. Its pools hold at most ``capacity.max_concurrent`` sandboxes per
runtime (``auto``: what the host's memory, open files and tasks hold, nanogrid/common/capacity.py),
so only a host whose runs spread over ~1000 function versions at once on one worker gets
there, with ~2 GB in idle sandboxes (a python server: ~2 MB PSS). A range
fixed by the worker's index keeps the uids, the accounts check (``check_sandbox_uids``) and
a firewall rule by uid independent of the capacity, which ``auto`` computes anew on each
host and reload.
"""

from __future__ import annotations

import collections
import os
import pwd
import subprocess
import sys
import threading

from loguru import logger

from nanogrid.common.config import Config
from nanogrid.common.errors import ConfigError, SandboxError

UIDS_PER_WORKER = 1000
SWEEP_TIMEOUT_S = 10.0
SWEEP = """
import os, signal, sys, time
uid = int(sys.argv[1])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
if os.getresuid() != (uid, uid, uid):
    sys.exit(2)
me = str(os.getpid())
def running():
    for pid in os.listdir("/proc"):
        if pid.isdigit() and pid != me:
            try:
                with open(f"/proc/{pid}/status") as status:
                    fields = dict(line.split(":", 1) for line in status)
                state, uids = fields["State"].split()[0], fields["Uid"].split()
            except (OSError, ValueError, KeyError):
                continue
            if state not in ("Z", "X") and str(uid) in uids:
                return True
    return False
for _ in range(1000):
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        sys.exit(0)
    if not running():
        sys.exit(0)
    time.sleep(0.001)
sys.exit(1)
"""
"""Run as the uid (root drops to it first, so it never signals as root): SIGKILL every
process of the uid (``kill(-1)`` reaches exactly those, itself spared) until none runs
(zombies, killed already, wait for their parents)."""


def uid_range(base: int, worker: int) -> range:
    """The uids of one worker's sandboxes."""
    first = base + worker * UIDS_PER_WORKER
    return range(first, first + UIDS_PER_WORKER)


class SandboxUids:
    """One worker's sandbox uids: which are free, oldest freed first."""

    def __init__(self, uids: range, worker: int) -> None:
        self.uids = uids
        self._worker = worker
        self._free = collections.deque(uids)
        self._lock = threading.Lock()

    def take(self) -> int:
        """A uid no live sandbox has; SandboxError when every one of the range is live."""
        with self._lock:
            if self._free:
                return self._free.popleft()
        raise SandboxError(
            f"all {len(self.uids)} sandbox uids of worker {self._worker} "
            f"({self.uids.start}-{self.uids.stop - 1}) belong to live sandboxes"
        )

    def defer_busy(self) -> int:
        """Hand out last the uids of the range that something still runs as: the sandboxes
        of this slot's earlier worker may outlive it for a moment (and tests run agents one
        after another on one range). Not killed here: another agent given the same range
        by mistake would lose its sandboxes. Returns how many; called before any take."""
        busy = running_uids(self.uids)
        with self._lock:
            for uid in sorted(busy):
                self._free.remove(uid)
                self._free.append(uid)
        return len(busy)

    def give_back(self, uid: int, *, ended: bool) -> None:
        """The uid of a destroyed sandbox. ``ended``: nothing of the sandbox can run any
        more; else every process of the uid is killed first, and a uid whose processes
        cannot all be ended is never handed out again by this worker."""
        if not ended and not end_processes(uid):
            logger.warning(f"[PROCESS] processes of sandbox uid {uid} outlived their sandbox; "
                           "the uid stays out of use")
            return
        with self._lock:
            self._free.append(uid)

    def free(self) -> int:
        with self._lock:
            return len(self._free)


def running_uids(uids: range) -> set[int]:
    """The uids of ``uids`` that a live process (not a zombie) has as its real, effective,
    saved or filesystem uid, from /proc."""
    found: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as status:
                text = status.read()
        except OSError:  # gone meanwhile
            continue
        state = text.partition(b"\nState:")[2].split(None, 1)[:1]
        ids = text.partition(b"\nUid:")[2].split(b"\n", 1)[0].split()
        if state and state[0] not in (b"Z", b"X"):
            found.update(uid for uid in map(int, ids) if uid in uids)
    return found


def end_processes(uid: int) -> bool:
    """SIGKILL every process of ``uid`` until none is left; True once none is."""
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", SWEEP, str(uid)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=SWEEP_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def check_sandbox_uids(config: Config) -> None:
    """Sandbox uids must belong to no account: a sandbox would get that account's files."""
    base = config.process.sandbox_uid_base
    used = range(base, uid_range(base, config.workers - 1).stop)
    taken = sorted(user.pw_uid for user in pwd.getpwall() if user.pw_uid in used)
    if taken:
        name = pwd.getpwuid(taken[0]).pw_name
        raise ConfigError(
            f"process.sandbox_uid_base: the sandbox uids {used.start}-{used.stop - 1} include "
            f"uid {taken[0]} of the account {name!r}; pick a free range"
        )
