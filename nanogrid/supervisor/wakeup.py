"""What wakes the arbiter: a signal (through the wake-up pipe) or a worker's status line.

Two selectors: one over the wake-up pipe and every status pipe, one over the wake-up pipe
alone, for the moments the arbiter lets status lines gather and only a signal should wake it.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal

from .workerstate import WorkerProcess


class Wakeup:
    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        self._any = selectors.DefaultSelector()
        self._signals = selectors.DefaultSelector()
        for selector in (self._any, self._signals):
            selector.register(self._read, selectors.EVENT_READ, None)

    def install(self) -> None:
        """Have every signal write to the wake-up pipe."""
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)

    def watch(self, worker: WorkerProcess) -> None:
        self._any.register(worker.reader, selectors.EVENT_READ, worker)

    def forget(self, worker: WorkerProcess) -> None:
        with contextlib.suppress(KeyError):
            self._any.unregister(worker.reader)

    def fds(self) -> list[int]:
        """Its own descriptors, for a forked child to close."""
        return [self._read, self._write, self._any.fileno(), self._signals.fileno()]

    def wait(self, timeout: float, signals_only: bool = False) -> list[WorkerProcess]:
        """Sleep at most ``timeout``; returns the workers with status lines waiting."""
        selector = self._signals if signals_only else self._any
        ready = []
        for key, _ in selector.select(timeout):
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._read, 4096):
                        pass
            else:
                ready.append(key.data)
        return ready
