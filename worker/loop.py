"""One worker process: receive tasks from SQS, run them in warm sandboxes, publish results.

The loop, top to bottom: boot (clients made here, after the fork) -> until told to stop:
re-send the outbox and, while Redis cannot take results, probe it instead of taking work;
start the received messages the host's capacity admits; long-poll for as many as could
start now (none while full) -> drain (release what has not started, let the runs finish,
close the pool, flush metrics). Each admitted message runs on a thread of its own
(inflight.py), so a worker runs as many invocations at once as the host's budget allows.

``handle`` takes one message to its end and never raises: any error becomes one of the
DESIGN's SQS cases, decided from the error class in one place (dispositions.py), and a bug
while handling a message ends that message, not the worker. Before running, the requestId
is claimed in Redis (duplicates.py), so at-least-once delivery runs each task once. The
per-message methods keep their state on the stack: many threads run them at once.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from common import capacity, logs
from common.config import Config
from common.errors import (
    DiskFull,
    GaveUp,
    HostFault,
    QueueUnavailable,
    TaskError,
    UnexpectedError,
    as_task_error,
)
from common.exitcodes import EXIT_BOOT_ERROR, EXIT_OK
from runners import create_runner
from runners.base import Runner

from . import autotuner, duplicates, faults, task
from .claim import Claim, ClaimLeases, ClaimStore
from .cloudwatch import MetricsPublisher
from .codestore import CodeStore
from .diskspace import DiskGuard
from .dispositions import Disposition, decide
from .endings import Endings
from .faults import FaultBoard
from .inflight import Inflight
from .invoke import invoke
from .ledger import Ledger
from .phases import PhaseClock
from .result import Result
from .resultstore import ResultStore
from .sqs import BatchDeleter, Message, TaskQueue, VisibilityHeartbeat

if TYPE_CHECKING:
    from .status import StatusReporter

RECEIVE_ERROR_BACKOFF_S = (0.5, 1, 2, 5, 10)
DEGRADED_PROBE_S = 1.0
"""While Redis cannot take results or the disk is full, they are probed this often (and no
work is taken)."""
FULL_WAIT_S = 1.0
"""While no message could start, the loop wakes at least this often (outbox, Redis)."""
READY_WAIT_S = 0.02
"""The longest the loop waits for the runs it started to get ready before it polls again."""


class _Interrupted(BaseException):
    """Raised by the SIGTERM handler to cut a long poll short (nothing else is interrupted)."""


class Worker:
    def __init__(
        self,
        config: Config,
        index: int,
        status: StatusReporter | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.index = index
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.status = status
        self.faults = FaultBoard(status)
        self.stopping = False
        self._runner_ready = False
        self._receiving = False
        self._alive_until = time.monotonic() + 60
        self.queue: TaskQueue
        self.store: ResultStore
        self.claims: ClaimStore
        self.claim_leases: ClaimLeases
        self.disk: DiskGuard
        self.visibility: VisibilityHeartbeat
        self.endings: Endings
        self.runner: Runner

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self._start_heartbeat()
        try:
            self.boot()
        except Exception as exc:  # the arbiter retries a worker that cannot boot, with backoff
            logger.error(f"worker {self.index} cannot boot: {exc}")
            return EXIT_BOOT_ERROR
        failures = 0
        try:
            while not self.stopping:
                if not self.results_writable() or not self.disk_has_room():
                    self._sleep(DEGRADED_PROBE_S)
                    continue
                self.inflight.start_admitted()
                wanted = self.inflight.room()
                if wanted == 0:  # full, or a task waits for room: let a run end first
                    self._alive_until = time.monotonic() + FULL_WAIT_S + 15
                    self.inflight.wait_for_change(FULL_WAIT_S)
                    continue
                try:
                    messages = self.receive(wanted)
                except QueueUnavailable as exc:
                    self.inflight.start_admitted()  # gives back the room held for the receive
                    delay = RECEIVE_ERROR_BACKOFF_S[min(failures, len(RECEIVE_ERROR_BACKOFF_S) - 1)]
                    failures += 1
                    logger.warning(f"[SQS] {exc}; retrying in {delay}s")
                    self.faults.degrade(faults.QUEUE, f"sqs: tasks cannot be received ({exc})")
                    self._sleep(delay)
                    continue
                if failures:
                    failures = 0
                    self.faults.recover(faults.QUEUE)
                lone = len(messages) == 1 and self.inflight.running == 0
                self.dispatch(messages)
                if lone:  # its latency is all there is to win; a batch means more may wait
                    self.inflight.wait_ready(READY_WAIT_S)
        finally:
            self.shutdown()
        return EXIT_OK

    def boot(self) -> None:
        config = self.config
        self.queue = TaskQueue(config.queue, region=config.aws.region)
        unreachable = self.queue.check()
        if unreachable is not None:
            logger.warning(f"[SQS] {unreachable} (booting anyway: the receive loop retries)")
        elif self.index == 0:  # one worker says it, not every one
            for problem in self.queue.check_dead_letter():
                logger.warning(f"[SQS] {problem}")
        self.history = autotuner.PeakHistory(config.autotuner)
        self.store = ResultStore(
            config.redis.url,
            config.redis.result_ttl_seconds,
            Path(config.paths.outbox_dir),
            on_set_aside=lambda message: self.faults.fault(faults.OUTBOX_SET_ASIDE, message),
            peaks=self.history,
        )
        # A probe write, not a boot condition: while Redis cannot take results (down, failing
        # over, or not there yet) the worker is up but DEGRADED, taking no work until it can.
        self.store.writable()
        self.store.start_flushing()
        self.claims = ClaimStore(
            self.store.link, self.worker_id, config.queue.visibility_timeout_seconds,
            self.store.existing, self.history,
        )
        self.claim_leases = ClaimLeases(
            self.claims, lambda text: self.faults.fault(faults.CLAIM_LOST, text)
        )
        self.codes = CodeStore(
            Path(config.paths.code_cache_dir),
            config.limits.max_zip_bytes,
            region=config.aws.region,
        )
        self.metrics = MetricsPublisher(config.cloudwatch, region=config.aws.region)
        self.visibility = VisibilityHeartbeat(
            TaskQueue.for_heartbeats(config.queue, config.aws.region)
        )
        self.deleter = BatchDeleter(self.queue)
        self.endings = Endings(
            config,
            self.worker_id,
            self.queue,
            self.store,
            self.deleter,
            self.metrics,
            self.faults,
            self.status,
        )
        if self.ledger is None:  # a worker on its own (tests, benchmarks): the whole host's
            self.config = config = capacity.pin(config, capacity.resolve(config))
            self.ledger = Ledger(config.capacity.memory_mb, config.capacity.max_concurrent)
        self.runner = create_runner(config, self.index)  # pools grow up to max_concurrent
        paths = config.paths
        self.disk = DiskGuard(
            [Path(paths.code_cache_dir), self.runner.sandbox_dir(config), Path(paths.outbox_dir)],
            paths.min_free_mb,
            (self.codes.trim, self.runner.shed_idle),
        )
        limits = config.limits
        self.inflight = Inflight(
            self.ledger,
            self.index,
            self.handle,
            lambda message: task.memory_mb_of(message.body, config),
            typical_mb=limits.default_memory_mb,
            smallest_mb=limits.min_memory_mb,
        )
        self._runner_ready = True
        logger.info(
            f"worker {self.index} ready: runner={self.runner.name}, "
            f"pools={self.runner.pool_stats()}"
        )
        for name, problem in self.runner.unavailable_runtimes().items():
            logger.warning(f"runtime {name!r} cannot start here ({problem}): its tasks fail")
        if self.status:
            self.status.booted()

    def results_writable(self) -> bool:
        """True when Redis takes results, so new work may be taken. Meanwhile the worker is
        DEGRADED and its messages stay in SQS for other hosts."""
        self._alive_until = time.monotonic() + DEGRADED_PROBE_S + 15
        trouble = self.store.trouble()
        if trouble is None:
            self.faults.recover(faults.REDIS)
            return True
        self.faults.degrade(
            faults.REDIS, f"redis: results cannot be written ({trouble}); taking no new work"
        )
        return False

    def disk_has_room(self) -> bool:
        """True when the worker's disks have room (paths.min_free_mb, and a probe write works
        after one was full); meanwhile it is DEGRADED and takes no new work."""
        trouble = self.disk.trouble()
        if trouble is None:
            self.faults.recover(faults.DISK)
            return True
        self.faults.degrade(faults.DISK, f"disk: {trouble}; taking no new work")
        return False

    def receive(self, wanted: int = 1) -> list[Message]:
        self._alive_until = time.monotonic() + self.config.queue.wait_time_seconds + 15
        try:
            # Nested: a SIGTERM landing in the finally clause (before the flag is down)
            # is caught by the outer handler too.
            try:
                self._receiving = True
                if self.stopping:
                    return []
                # While results wait in the outbox, poll briefly so they go out soon after
                # Redis returns, instead of after a full long poll.
                wait = (
                    min(1, self.config.queue.wait_time_seconds)
                    if self.store.outbox_pending
                    else None
                )
                return self.queue.receive(wanted, wait)
            finally:
                self._receiving = False
        except _Interrupted:
            return []

    def shutdown(self) -> None:
        waiting = self.inflight.take_waiting()
        logger.info(
            f"worker {self.index} draining: {self.inflight.running} running, "
            f"{len(waiting)} not started handed back"
        )
        for message in waiting:
            self.visibility.discard(message)
            self.endings.release(message)
        self._alive_until = math.inf  # the arbiter's drain deadline bounds this
        self.inflight.drain()
        self.visibility.stop()
        self.claim_leases.stop()
        self.deleter.close()
        self.runner.close()
        self.metrics.close()
        self.store.close()

    def dispatch(self, messages: list[Message]) -> None:
        """Start what was received as capacity admits it; once told to stop, hand it back to
        the queue at once. Messages waiting for room keep their visibility extended."""
        if self.stopping:
            for message in messages:
                self.endings.release(message)
            return
        for message in messages:
            self.visibility.add(message)
        self.inflight.accept(messages)

    # -- one message ------------------------------------------------------------------------

    def handle(self, message: Message) -> None:
        """Take one message to its end; never raises: one message never takes a worker down."""
        try:
            self._handle(message)
        except Exception as exc:  # noqa: BLE001 - a bug ends its message, not the worker
            self.endings.after_bug(message, exc)
        finally:
            self.visibility.discard(message)  # kept invisible from its receive to its end

    def _handle(self, message: Message) -> None:
        try:
            parsed = task.parse(message.body, self.config)
        except TaskError as exc:
            self.endings.refuse(message, exc)
            return
        with logger.contextualize(requestId=parsed.request_id):
            claim = duplicates.claim(self.claims, self.endings, message, parsed.request_id,
                                     parsed.function_id,
                                     self.config.queue.visibility_timeout_seconds)
            if claim is not None:
                self._run_claimed(message, parsed, claim)

    def _run_claimed(self, message: Message, t: task.Task, claim: Claim) -> None:
        if self.status:
            self.status.task_started(t.request_id)
        self.visibility.add(message)
        self.claim_leases.add(claim)
        try:
            ending = self._run_task(message, t, claim)
        except BaseException:
            duplicates.release(self.claims, claim)
            raise
        finally:
            self.visibility.discard(message)
            self.claim_leases.discard(claim)  # before the publish frees it: not taken again
        finished = ending is not None and self.endings.finish(message, *ending, claim.token)
        if not finished and self.status:
            self.status.task_ended(t.request_id)

    def _run_task(self, message: Message, t: task.Task, claim: Claim) -> tuple[Result, bool] | None:
        """The result to publish and whether to dead-letter the message too; None when the
        message goes back for a later try (its claim released)."""
        clock = PhaseClock(message.received_mono, message.queued_ms)
        max_attempts = self.config.queue.max_attempts
        if claim.run > max_attempts:
            error: TaskError = GaveUp(
                f"gave up: tried {claim.run - 1} times already (queue.max_attempts is "
                f"{max_attempts}; the message came back {message.receives} times)"
            )
        else:
            try:
                with clock.phase("fetch"):
                    package = self.codes.fetch(t.s3_bucket, t.s3_key)
                self.inflight.ready()
                ran = invoke(
                    self.config, self.runner, self.history, claim.recent_peaks, self.worker_id,
                    t, package, claim.run, clock,
                )
                return ran, False
            except Exception as exc:  # noqa: BLE001 - translated, then decided by class
                error = self._translate(exc)
        disposition = decide(error, claim.run, max_attempts)
        if disposition is Disposition.DEFER:
            duplicates.release(self.claims, claim, count_run=False)
            self.endings.defer(message, f"[RETRY] {error}: not counted as a try")
            return None
        if disposition is Disposition.RETRY:
            logger.warning(
                f"[RETRY] {error} (attempt {claim.run} of {max_attempts}); "
                "message kept for another try"
            )
            duplicates.release(self.claims, claim)
            return None
        res = self.endings.failed(t.ids, error, t.memory_mb, claim.run, clock.timings())
        return res, disposition is Disposition.DEAD_LETTER

    def _translate(self, exc: Exception) -> TaskError:
        """``exc`` as a TaskError; bugs and host faults reported (the traceback of a bug goes
        to the debug log; the result's line says what it was)."""
        error = as_task_error(exc)
        if isinstance(error, UnexpectedError):
            logger.opt(exception=exc).debug("traceback of the internal error below")
            self.faults.fault(faults.UNEXPECTED, str(error))
        elif isinstance(error, HostFault):
            self.faults.fault(faults.HOST, str(error))
            if isinstance(error, DiskFull):
                self.disk.full(str(error))
        return error

    # -- signals and liveness -----------------------------------------------------------------

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stopping = True
        if self._receiving:
            raise _Interrupted

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, deadline - time.monotonic()))

    def _start_heartbeat(self) -> None:
        """Beat to the arbiter while the main thread is inside a bounded step.

        Each blocking step (a long poll, a run) first moves ``_alive_until`` past its own
        bound; a main thread stuck beyond that stops the beats and the arbiter kills it.
        """
        if self.status is None:
            return

        def beat() -> None:
            while True:
                if time.monotonic() < self._alive_until:
                    self.status.heartbeat(self.faults.reasons)
                    if self._runner_ready:  # pools refill in the background: report as they do
                        self.status.pools(self.runner.pool_stats())
                time.sleep(1.0)

        threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def main(config: Config, index: int, status_fd: int, ledger: Ledger) -> int:
    """Entry point of a forked worker process."""
    from .status import StatusReporter

    logs.setup(config.log, f"worker-{index}")
    # A ledger of its own over the inherited page: fresh locks in this process.
    own = Ledger(ledger.memory_mb, ledger.max_concurrent, ledger.fd)
    return Worker(config, index, StatusReporter(status_fd), own).run()
