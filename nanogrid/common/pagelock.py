"""The lock of a page the host's workers share (the capacity ledger, the sandbox board).

One POSIX record lock (``lockf``) on the page's memfd, plus a thread lock: the kernel drops
the record lock of a process that dies, so a SIGKILLed worker cannot wedge the others, but a
record lock belongs to a process, so it does not keep the process's own threads apart.

The kernel's deadlock detection also sees processes, not threads: while one thread of worker
A holds the ledger and another waits for the board, and worker B's threads do the mirror, the
kernel refuses one wait with EDEADLK, although each lock is held only for a read-modify-write
of the page and no code holds one while taking the other. Such a wait is tried again.
"""

from __future__ import annotations

import errno
import fcntl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_RETRY_S = 0.0005


class PageLock:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._threads = threading.Lock()

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._threads:
            while True:
                try:
                    fcntl.lockf(self.fd, fcntl.LOCK_EX)
                    break
                except OSError as exc:
                    if exc.errno != errno.EDEADLK:
                        raise
                    time.sleep(_RETRY_S)
            try:
                yield
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)
