"""One worker process: receive a task from SQS, run it in a warm sandbox, publish the result.

The loop, top to bottom: boot (clients made here, after the fork) -> until told to stop:
re-send the outbox, long-poll one message, handle it -> drain (close the pool, flush metrics).
``handle`` turns every outcome into one of the DESIGN's SQS cases, decided from the error
class in one place.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from common import logs
from common.config import Config
from common.errors import (
    InternalError,
    InvalidMessage,
    QueueUnavailable,
    ResultStoreUnavailable,
    TaskError,
)
from common.exitcodes import EXIT_BOOT_ERROR, EXIT_OK
from runners import create_runner
from runners.base import Invocation, Runner, RunOutcome

from . import autotuner, result, task
from .cloudwatch import MetricsPublisher
from .codestore import CodePackage, CodeStore
from .ledger import Ledger
from .phases import PhaseClock
from .result import MiB, Result, TaskIds, Timings
from .resultstore import ResultStore
from .sqs import BatchDeleter, Message, TaskQueue, VisibilityHeartbeat
from .unpack import extract

if TYPE_CHECKING:
    from .status import StatusReporter

RECEIVE_ERROR_BACKOFF_S = (0.5, 1, 2, 5, 10)


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
        self.stopping = False
        self._runner_ready = False
        self._receiving = False
        self._alive_until = time.monotonic() + 60
        self.queue: TaskQueue
        self.store: ResultStore
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
                self.store.flush_outbox()
                try:
                    messages = self.receive()
                    failures = 0
                except QueueUnavailable as exc:
                    delay = RECEIVE_ERROR_BACKOFF_S[min(failures, len(RECEIVE_ERROR_BACKOFF_S) - 1)]
                    failures += 1
                    logger.warning(f"[SQS] {exc}; retrying in {delay}s")
                    self._sleep(delay)
                    continue
                self.dispatch(messages)
        finally:
            self.shutdown()
        return EXIT_OK

    def boot(self) -> None:
        config = self.config
        self.queue = TaskQueue(config.queue, region=config.aws.region)
        self.queue.check()
        self.store = ResultStore(
            config.redis.url, config.redis.result_ttl_seconds, Path(config.paths.outbox_dir)
        )
        if not self.store.ping():
            raise ResultStoreUnavailable(f"Redis at {config.redis.url} does not answer")
        self.codes = CodeStore(
            Path(config.paths.code_cache_dir),
            config.limits.max_zip_bytes,
            region=config.aws.region,
        )
        self.metrics = MetricsPublisher(config.cloudwatch, region=config.aws.region)
        self.history = autotuner.PeakHistory(self.store.client, config.autotuner)
        self.visibility = VisibilityHeartbeat(self.queue)
        self.deleter = BatchDeleter(self.queue)
        self.runner = create_runner(config, self.index)
        self._runner_ready = True
        logger.info(
            f"worker {self.index} ready: runner={self.runner.name}, "
            f"pools={self.runner.pool_stats()}"
        )
        for name, problem in self.runner.unavailable_runtimes().items():
            logger.warning(f"runtime {name!r} cannot start here ({problem}): its tasks fail")
        if self.status:
            self.status.booted()

    def receive(self) -> list[Message]:
        self._alive_until = time.monotonic() + self.config.queue.wait_time_seconds + 15
        self._receiving = True
        try:
            if self.stopping:
                return []
            # While results wait in the outbox, poll briefly so they go out soon after Redis
            # returns, instead of after a full long poll.
            wait = (
                min(1, self.config.queue.wait_time_seconds) if self.store.outbox_pending else None
            )
            return self.queue.receive(1, wait)
        except _Interrupted:
            return []
        finally:
            self._receiving = False

    def shutdown(self) -> None:
        logger.info(f"worker {self.index} draining")
        self.visibility.stop()
        self.deleter.close()
        self.runner.close()
        self.metrics.close()
        self.store.close()

    def dispatch(self, messages: list[Message]) -> None:
        """Run what was received; once told to stop, hand the rest back to the queue at once."""
        for message in messages:
            if self.stopping:
                self._release(message)
            else:
                self.handle(message)

    # -- one message ------------------------------------------------------------------------

    def handle(self, message: Message) -> None:
        try:
            parsed = task.parse(message.body, self.config)
        except TaskError as exc:
            self._refuse(message, exc)
            return
        with logger.contextualize(requestId=parsed.request_id):
            previous = self._existing(parsed.request_id)
            if previous is not None:
                logger.info("[DUPLICATE] a result exists already; re-publishing it, not running")
                if self._publish(previous):
                    self._delete(message)
                return
            if self.status:
                self.status.task_started(parsed.request_id)
            self._alive_until = time.monotonic() + parsed.timeout_ms / 1000 + 60
            self.visibility.track(message)
            try:
                outcome = self._run_task(message, parsed)
            finally:
                self.visibility.track(None)
            if outcome is not None:
                self._finish(message, outcome)

    def _run_task(self, message: Message, t: task.Task) -> Result | None:
        """The result to publish, or None when the message is kept for a retry."""
        clock = PhaseClock(message.received_mono, message.queued_ms)
        try:
            with clock.phase("fetch"):
                package = self.codes.fetch(t.s3_bucket, t.s3_key)
            return self.execute(t, package, message.attempt, clock)
        except TaskError as exc:
            if exc.retryable and message.attempt < self.config.queue.max_attempts:
                logger.warning(
                    f"[RETRY] {exc} (attempt {message.attempt} of "
                    f"{self.config.queue.max_attempts}); message kept for a retry"
                )
                return None
            if exc.dead_letter and not self._dead_letter(message, str(exc)):
                return None
            return self._failed(t.ids, exc, t.memory_mb, message.attempt, clock.timings())
        except Exception as exc:  # a bug or a host problem: report it, do not crash-loop on it
            logger.opt(exception=exc).error(f"internal error while running the task: {exc!r}")
            error = InternalError(f"internal error in the worker: {type(exc).__name__}: {exc}")
            return self._failed(t.ids, error, t.memory_mb, message.attempt, clock.timings())

    def execute(
        self, t: task.Task, package: CodePackage, attempt: int, clock: PhaseClock
    ) -> Result:
        runtime = self.config.runtimes[t.runtime]
        with clock.phase("sandbox"):
            sandbox = self.runner.acquire(t.runtime, package.version_key)
        try:
            if sandbox.code_key != package.version_key:
                with clock.phase("unpack"):
                    shutil.rmtree(sandbox.code_dir, ignore_errors=True)
                    sandbox.code_key = None
                    extract(package.zip_path, sandbox.code_dir, self.config.limits)
                    sandbox.code_key = package.version_key
            invocation = Invocation(
                request_id=t.request_id,
                function_id=t.function_id,
                argv=runtime.command,
                stdin=t.input_json,
                memory_mb=t.memory_mb,
                timeout_ms=t.timeout_ms,
                max_output_bytes=self.config.limits.max_output_bytes,
                max_pids=self.config.limits.max_pids,
            )
            logger.info(
                f"{self.runner.marker} running {t.function_id} in {sandbox.name} "
                f"(cold={sandbox.cold_start}, memory={t.memory_mb}MB, "
                f"timeout={t.timeout_ms}ms)"
            )
            outcome = self.runner.run(sandbox, invocation)
        finally:
            self.runner.release(sandbox)
        return self._ran(t, outcome, sandbox.cold_start, attempt, clock)

    def _ran(
        self, t: task.Task, outcome: RunOutcome, cold: bool, attempt: int, clock: PhaseClock
    ) -> Result:
        peaks = self.history.add_and_get(t.function_id, outcome.peak_memory_bytes)
        tip = autotuner.recommend(
            outcome.peak_memory_bytes,
            t.memory_mb,
            self.config.autotuner,
            oom=outcome.oom_killed,
            history_peaks=peaks,
        )
        logger.info(f"[AUTO-TUNER] {tip.tip}")
        # Lambda's REPORT line; Init Duration (cold starts only) is the sandbox's creation.
        init = f" Init Duration: {clock.ms('sandbox'):.2f} ms" if cold else ""
        logger.info(
            f"REPORT RequestId: {t.request_id} Duration: {outcome.duration_ms:.2f} ms "
            f"Memory Size: {t.memory_mb} MB Max Memory Used: "
            f"{outcome.peak_memory_bytes // MiB} MB{init} ({outcome.peak_source})"
        )
        return result.ran(
            t.ids,
            outcome,
            memory_mb=t.memory_mb,
            recommended_mb=tip.recommended_mb,
            tip=tip.tip,
            cold_start=cold,
            attempt=attempt,
            worker_id=self.worker_id,
            timings=clock.timings(run_ms=outcome.duration_ms),
        )

    def _finish(self, message: Message, res: Result) -> None:
        if not self._publish(res):
            return
        self.metrics.record(
            res.function_id or "unknown",
            duration_ms=res.duration_millis,
            peak_memory_bytes=res.peak_memory_bytes,
            status=res.status,
            error_type=res.error_type,
            cold_start=res.cold_start,
        )
        self._delete(message)
        if self.status:
            self.status.task_finished(res)
        if res.ok:
            logger.info(f"[DONE][OK] {res.request_id} in {res.duration_millis:.1f} ms")
        else:
            logger.warning(f"[FAIL][{res.error_type}] {res.request_id}: {res.error_message}")

    def _publish(self, res: Result) -> bool:
        """Publish (or keep in the outbox); False only when the result could not be kept."""
        try:
            self.store.publish(res)
            return True
        except ResultStoreUnavailable as exc:  # neither Redis nor the outbox took it
            logger.error(
                f"[REDIS] result of {res.request_id} could not be kept: {exc}; "
                "the message stays on the queue"
            )
            return False

    def _refuse(self, message: Message, exc: TaskError) -> None:
        """A message that can never run: a result when it names a requestId; dead-letter; delete."""
        ids = task.peek_ids(message.body)
        if exc.dead_letter and not self._dead_letter(message, str(exc)):
            return
        with logger.contextualize(requestId=ids.request_id or "-"):
            if ids.request_id is not None:
                # A body that decoded into a task (e.g. an unknown runtime) has timings; one
                # that never parsed has none.
                timings = (
                    None
                    if isinstance(exc, InvalidMessage)
                    else PhaseClock(message.received_mono, message.queued_ms).timings()
                )
                self._finish(message, self._failed(ids, exc, None, message.attempt, timings))
            else:
                logger.warning(f"[FAIL][{exc.error_type}] message {message.message_id}: {exc}")
                self._delete(message)

    def _failed(
        self,
        ids: TaskIds,
        exc: TaskError,
        memory_mb: int | None,
        attempt: int,
        timings: Timings | None,
    ) -> Result:
        return result.failed(
            ids,
            exc.error_type,
            str(exc),
            memory_mb=memory_mb,
            attempt=attempt,
            worker_id=self.worker_id,
            timings=timings,
        )

    def _existing(self, request_id: str) -> Result | None:
        try:
            return self.store.existing(request_id)
        except ResultStoreUnavailable:
            return None

    def _dead_letter(self, message: Message, reason: str) -> bool:
        """Copy to the dead-letter queue; False (message kept for later) when that failed."""
        try:
            self.queue.dead_letter(message, reason)
            return True
        except QueueUnavailable as exc:
            logger.warning(
                f"[SQS] could not copy {message.message_id} to the dead-letter queue: {exc}; "
                "message kept, it comes back after the visibility timeout"
            )
            return False

    def _delete(self, message: Message) -> None:
        self.deleter.delete(message)

    def _release(self, message: Message) -> None:
        try:
            self.queue.release(message)
            logger.info(f"[SQS] released unstarted message {message.message_id}")
        except QueueUnavailable as exc:
            logger.warning(f"[SQS] could not release {message.message_id}: {exc}")

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
                    self.status.heartbeat()
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
