"""One worker process: receive messages from SQS, admit them under the host's budget, run each
on a thread of its own, drain.

``serve`` is a worker's life: connect (services.py, after the fork), then ``Worker.run``.
The loop, top to bottom: while told to go on, take no work while Redis cannot take results
or a disk is full (DEGRADED: messages stay in SQS for other hosts); start the received
messages the host's capacity admits; long-poll for as many as could start now (none while
full) -> drain (hand back what has not started, let the runs finish, close the services).
What happens to each message is its run's business (pipeline.py).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from loguru import logger

from nanogrid.common import logs
from nanogrid.common.config import Config
from nanogrid.common.errors import QueueUnavailable
from nanogrid.common.exitcodes import EXIT_BOOT_ERROR, EXIT_OK
from nanogrid.runners.pool import warm_share

from . import faults, tracing
from .endings import Endings
from .faults import FaultBoard
from .hooks import Hook, PhaseTimer, ReadyAtRun
from .hostshare import HostShare
from .inflight import Inflight
from .liveness import Liveness
from .pipeline import MessageRun
from .services import Services, connect
from .sqs import Message

if TYPE_CHECKING:
    from .status import StatusReporter

RECEIVE_ERROR_BACKOFF_S = (0.5, 1, 2, 5, 10)
DEGRADED_PROBE_S = 1.0
"""While Redis cannot take results or the disk is full, they are probed this often (and no
work is taken)."""
FULL_WAIT_S = 1.0
"""While no message could start, the loop wakes at least this often (Redis, the disks)."""
READY_WAIT_S = 0.02
"""The longest the loop waits for the runs it started to get ready before it polls again."""
STEP_SLACK_S = 15.0
"""What a bounded step of the main thread may overrun before its beats stop."""


class _Interrupted(BaseException):
    """Raised by the SIGTERM handler to cut a long poll short (nothing else is interrupted)."""


class StopRequest:
    """SIGTERM's flag; a long poll under way is cut short. Installed before the boot, so a
    SIGTERM during it is not lost."""

    def __init__(self) -> None:
        self.requested = False
        self.receiving = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _on_term(self, signum: int, frame: Any) -> None:
        self.requested = True
        if self.receiving:
            raise _Interrupted


class Worker:
    def __init__(
        self,
        services: Services,
        index: int,
        *,
        hooks: Sequence[Hook] = (),
        liveness: Liveness | None = None,
        stop: StopRequest | None = None,
    ) -> None:
        self.services = services
        self.config = services.config
        self.index = index
        self.endings = Endings(services)
        self.liveness = liveness or Liveness(None, services.faults)
        self.stop = stop or StopRequest()
        limits = self.config.limits
        self.inflight: Inflight[MessageRun] = Inflight(
            services.ledger,
            index,
            MessageRun.run,
            lambda run: run.memory_mb,
            typical_mb=limits.default_memory_mb,
            smallest_mb=limits.min_memory_mb,
        )
        self.hooks: tuple[Hook, ...] = (PhaseTimer(), ReadyAtRun(self.inflight.ready), *hooks)

    @property
    def stopping(self) -> bool:
        return self.stop.requested

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        services = self.services
        self.liveness.report_counts(services.counts)
        logger.info(f"worker {self.index} ready (pid {os.getpid()}): {self.warming()}")
        for name, problem in services.runner.unavailable_runtimes().items():
            logger.warning(f"runtime {name!r} cannot start here ({problem}): its tasks fail")
        if services.status:
            services.status.booted()
        failures = 0
        try:
            while not self.stopping:
                if not self.results_writable() or not self.disk_has_room():
                    self._sleep(DEGRADED_PROBE_S)
                    continue
                self.inflight.start_admitted()
                wanted = self.inflight.room()
                if wanted == 0:  # full, or a task waits for room: let a run end first
                    self.liveness.until(FULL_WAIT_S + STEP_SLACK_S)
                    self.inflight.wait_for_change(FULL_WAIT_S)
                    continue
                started = time.monotonic()
                try:
                    messages = self.receive(wanted)
                except QueueUnavailable as exc:
                    self.inflight.start_admitted()  # gives back the room held for the receive
                    delay = RECEIVE_ERROR_BACKOFF_S[min(failures, len(RECEIVE_ERROR_BACKOFF_S) - 1)]
                    failures += 1
                    logger.warning(f"[SQS] {exc}; retrying in {delay}s")
                    services.faults.degrade(
                        faults.QUEUE, f"sqs: tasks cannot be received ({exc})"
                    )
                    self._sleep(delay)
                    continue
                if failures:
                    failures = 0
                    services.faults.recover(faults.QUEUE)
                for hook in self.hooks:
                    hook.received(messages, started)
                lone = len(messages) == 1 and self.inflight.running == 0
                self.dispatch(messages)
                if lone:  # its latency is all there is to win; a batch means more may wait
                    self.inflight.wait_ready(READY_WAIT_S)
        finally:
            self.shutdown()
        return EXIT_OK

    def warming(self) -> str:
        """The ready line's words: the runner, and the warm sandboxes this worker is making."""
        config, runner = self.config, self.services.runner
        shares = [
            f"{share} {name}"
            for name, rt in config.runtimes.items()
            if name not in runner.unavailable_runtimes()
            and (share := warm_share(rt.warm, config.workers, self.index))
        ]
        making = " and ".join(shares) + " sandboxes" if shares else "no warm sandboxes"
        return f"{runner.name} runner, making {making} in the background"

    def results_writable(self) -> bool:
        """True when Redis takes results, so new work may be taken. Meanwhile the worker is
        DEGRADED and its messages stay in SQS for other hosts."""
        self.liveness.until(DEGRADED_PROBE_S + STEP_SLACK_S)
        trouble = self.services.store.trouble()
        if trouble is None:
            self.services.faults.recover(faults.REDIS)
            return True
        self.services.faults.degrade(
            faults.REDIS, f"redis: results cannot be written ({trouble}); taking no new work"
        )
        return False

    def disk_has_room(self) -> bool:
        """True when the worker's disks have room (paths.min_free_mb, and a probe write works
        after one was full); meanwhile it is DEGRADED and takes no new work."""
        trouble = self.services.disk.trouble()
        if trouble is None:
            self.services.faults.recover(faults.DISK)
            return True
        self.services.faults.degrade(faults.DISK, f"disk: {trouble}; taking no new work")
        return False

    def receive(self, wanted: int = 1) -> list[Message]:
        self.liveness.until(self.config.queue.wait_time_seconds + STEP_SLACK_S)
        try:
            # Nested: a SIGTERM landing in the finally clause (before the flag is down)
            # is caught by the outer handler too.
            try:
                self.stop.receiving = True
                if self.stopping:
                    return []
                # While results wait in the outbox, poll briefly so they go out soon after
                # Redis returns, instead of after a full long poll.
                wait = (
                    min(1, self.config.queue.wait_time_seconds)
                    if self.services.store.outbox_pending
                    else None
                )
                return self.services.queue.receive(wanted, wait)
            finally:
                self.stop.receiving = False
        except _Interrupted:
            return []

    def dispatch(self, messages: list[Message]) -> None:
        """Start what was received as capacity admits it; once told to stop, hand it back to
        the queue at once. Messages waiting for room stay invisible (their runs hold them)."""
        if self.stopping:
            for message in messages:
                self.endings.release(message)
            return
        self.inflight.accept([self.message_run(message) for message in messages])

    def message_run(self, message: Message) -> MessageRun:
        return MessageRun(self.services, self.endings, self.hooks, message)

    def handle(self, message: Message) -> None:
        """Take one message to its end on this thread (tests, benchmarks)."""
        self.message_run(message).run()

    def shutdown(self) -> None:
        waiting = self.inflight.take_waiting()
        logger.info(
            f"worker {self.index} draining: {self.inflight.running} running, "
            f"{len(waiting)} not started handed back"
        )
        for run in waiting:
            run.release()
        self.liveness.forever()  # the arbiter's drain deadline bounds this
        self.inflight.drain()
        for hook in self.hooks:
            hook.close()
        self.services.close()

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, deadline - time.monotonic()))


def serve(
    config: Config,
    index: int,
    status: StatusReporter | None = None,
    host: HostShare | None = None,
    hooks: Sequence[Hook] = (),
) -> int:
    """Worker ``index``'s life: boot (connect), then run until told to stop. A worker that
    cannot boot exits with EXIT_BOOT_ERROR (the arbiter retries it, with backoff)."""
    stop = StopRequest()
    stop.install()
    board = FaultBoard(status)
    liveness = Liveness(status, board)
    liveness.start()
    try:
        services = connect(config, index, board, status, host)
    except Exception as exc:  # noqa: BLE001 - one line for the operator, then the backoff
        logger.error(f"worker {index} cannot boot: {exc}")
        return EXIT_BOOT_ERROR
    return Worker(services, index, hooks=hooks, liveness=liveness, stop=stop).run()


def main(config: Config, index: int, status_fd: int, host: HostShare) -> int:
    """Entry point of a forked worker process."""
    from .status import StatusReporter

    logs.setup(config.log, f"worker-{index}")
    return serve(config, index, StatusReporter(status_fd), host.reopened(),
                 tracing.configured_hooks(config))

