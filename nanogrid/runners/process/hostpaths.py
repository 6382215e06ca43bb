"""The host paths a process sandbox could write to although they are not its own: the
world-writable directories and files a sandbox uid can reach (``/run/lock``, ``/var/tmp``,
``/dev/mqueue``, ...). Found once, when a worker's runner starts, and passed to every
sandbox's server, which hides each under a read-only mount in its mount namespace
(forkserver/sandbox.py's ``cover``): systemd's ``ProtectSystem=strict`` does the same for
most of the file system, but the agent may run without it.

The scan is bounded so that it stays cheap on any host: it looks ``SCAN_DEPTH`` levels
deep from ``/`` (``/var/lib/php/sessions`` is 4), does not go below a directory that other
users cannot pass through (nothing below it is theirs to reach) nor into one that is
world-writable itself (its tmpfs hides all of it), and skips the kernel's pseudo file
systems and the sandbox's own ``/tmp`` and ``/dev/shm``. On a Debian host with Docker: 11,000
entries, ~70 ms (the directories alone would take ~35 ms; the files are checked too, a
world-writable one is as writable as a directory). A full walk there took ~0.9 s.
"""

from __future__ import annotations

import os
import stat

SCAN_DEPTH = 4
PSEUDO_FILE_SYSTEMS = frozenset({
    "proc", "sysfs", "cgroup", "cgroup2", "devpts", "debugfs", "tracefs", "securityfs", "bpf",
    "configfs", "pstore", "fusectl", "binfmt_misc", "autofs", "nsfs", "efivarfs", "rpc_pipefs",
})
"""Mounted file systems that hold no files a sandbox could write to (mqueue is not one)."""
PRIVATE = ("/tmp", "/dev/shm")
"""A sandbox's own tmpfs mounts: not the host's."""


def world_writable() -> tuple[str, ...]:
    """The world-writable directories and regular files within reach of any user, sorted;
    none below one listed."""
    skipped = {*PRIVATE, *pseudo_mount_points()}
    found = []
    pending = [("/", 0)]
    while pending:
        directory, depth = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            if entry.path in skipped:
                continue
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError:
                continue
            if stat.S_ISDIR(mode):
                if mode & stat.S_IWOTH:
                    found.append(entry.path)
                elif mode & stat.S_IXOTH and depth + 1 < SCAN_DEPTH:
                    pending.append((entry.path, depth + 1))
            elif stat.S_ISREG(mode) and mode & stat.S_IWOTH:
                found.append(entry.path)
    return tuple(sorted(found))


def pseudo_mount_points() -> set[str]:
    """Where the kernel's pseudo file systems are mounted (/proc/self/mountinfo)."""
    points = set()
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                fstype = fields[fields.index("-") + 1]
                if fstype in PSEUDO_FILE_SYSTEMS:
                    points.add(unescape(fields[4]))
    except (OSError, ValueError, IndexError):
        pass
    return points


def unescape(field: str) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes come as octal escapes."""
    for escaped, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escaped, char)
    return field
