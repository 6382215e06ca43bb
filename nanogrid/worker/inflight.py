"""A worker's invocations in flight: received messages wait here until the host's capacity
admits them, then each runs on a thread of its own (its sandbox is a process; the thread
only waits on it).

Admission is first come, first served through the host's ledger (ledger.py): a message that
does not fit yet holds the line, so the worker takes no new message until it runs, and the
small tasks behind it (in SQS, or in other workers) cannot starve it. ``room`` is how many
messages to ask SQS for: what fits now (at most 10, SQS's limit), none while a message
waits; that room is held in the ledger until they are in, so two workers never both take
the same free room. What this host cannot start stays in SQS for other hosts.

A run just started is *getting ready* (claim, code, a sandbox, the code in it) until its
function runs. A lone run (one message received by an idle worker) is waited for before
the next receive (``wait_ready``): a boto3 call holds the interpreter for about a
millisecond before it blocks on the network, and the run's Redis and S3 round trips, its
sandbox's take and its unpacking would each wait behind it (+1.2 ms on a warm hello's
latency; +3 ms on a new function's first call when the wait ended once the code was
fetched). After a batch, or under load, the loop does not wait: there the next receive
matters more.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from loguru import logger

from .ledger import Ledger
from .sqs import SQS_BATCH_MAX

T = TypeVar("T")


class Inflight(Generic[T]):
    def __init__(
        self,
        ledger: Ledger,
        slot: int,
        run: Callable[[T], None],
        memory_of: Callable[[T], int],
        *,
        typical_mb: int,
        smallest_mb: int,
    ) -> None:
        self._ledger = ledger
        self._slot = slot
        self._run = run
        self._memory_of = memory_of
        self._typical_mb = typical_mb
        self._smallest_mb = smallest_mb
        self._waiting: deque[tuple[T, int]] = deque()
        self._running = 0
        self._getting_ready = 0
        self._own = threading.local()
        """Per run thread: whether its run still counts as getting ready."""
        self._changed = threading.Condition()
        self._threads = ThreadPoolExecutor(
            max_workers=max(1, ledger.max_concurrent), thread_name_prefix="run"
        )

    @property
    def running(self) -> int:
        return self._running

    def accept(self, messages: list[T]) -> None:
        """Queue received messages for admission, in order, and start what fits."""
        self._waiting.extend((m, self._memory_of(m)) for m in messages)
        self.start_admitted()

    def start_admitted(self) -> None:
        """Start waiting messages, first come first served, while the host admits them; what
        still waits holds its room in the ledger (or nothing is held)."""
        while self._waiting:
            message, memory_mb = self._waiting[0]
            if not self._ledger.admit(self._slot, memory_mb):
                self._ledger.hold(self._slot, 1, memory_mb)
                return
            self._waiting.popleft()
            with self._changed:
                self._running += 1
                self._getting_ready += 1
            self._threads.submit(self._run_admitted, message, memory_mb)
        self._ledger.hold(self._slot, 0, 0)

    def room(self) -> int:
        """How many messages to receive now (room the ledger then holds for them): what the
        host can start, 0 while one waits."""
        if self._waiting:
            return 0
        return self._ledger.hold_for_receive(
            self._slot, self._typical_mb, self._smallest_mb, SQS_BATCH_MAX
        )

    def wait_for_change(self, timeout: float) -> None:
        """Sleep until a run ends (or ``timeout``)."""
        with self._changed:
            self._changed.wait(timeout)

    def ready(self) -> None:
        """Called by a run (on its thread) once its function runs in its sandbox."""
        if getattr(self._own, "getting_ready", False):
            self._own.getting_ready = False
            with self._changed:
                self._getting_ready -= 1
                self._changed.notify_all()

    def wait_ready(self, timeout: float) -> None:
        """Wait until every run started is ready (or has ended), at most ``timeout``."""
        with self._changed:
            self._changed.wait_for(lambda: self._getting_ready == 0, timeout)

    def take_waiting(self) -> list[T]:
        """Give up the messages not started yet (they go back to SQS): drain."""
        taken = [message for message, _ in self._waiting]
        self._waiting.clear()
        self._ledger.hold(self._slot, 0, 0)
        return taken

    def drain(self) -> None:
        """Wait for every run in flight to end."""
        self._threads.shutdown(wait=True)

    def _run_admitted(self, message: T, memory_mb: int) -> None:
        self._own.getting_ready = True
        try:
            self._run(message)
        except BaseException as exc:  # noqa: BLE001 - the run's own handler reports; never lose the slot
            logger.opt(exception=exc).error(f"a run thread failed: {exc!r}")
        finally:
            self.ready()
            self._ledger.release(self._slot, memory_mb)
            with self._changed:
                self._running -= 1
                self._changed.notify_all()
