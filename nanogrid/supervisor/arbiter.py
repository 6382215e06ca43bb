"""The supervisor's parent process: forks N workers and keeps them running (gunicorn's arbiter).

Every turn of ``run``, top to bottom: wait (at most a tick) for a signal or a worker's status
line, dispatch the recorded signals to ``handle_<name>`` (SIGCHLD reaps), kill workers that
stopped heartbeating, spawn workers until every slot has one, ping the systemd watchdog and
publish the snapshot that /status and /health serve. Signal handlers only record.

Worker k lives in slot k. The slot outlives its processes: a replacement gets index k again,
and restarts, tasks done and the crash backoff are counted per slot. A slot holds at most one
process, so on reload the old worker k drains (its in-flight run finishes) and the new k is
forked once it has exited: two processes never share k's sandboxes and warm-pool share.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Any

from loguru import logger

from nanogrid.common import logsink, proctitle
from nanogrid.common.config import Config
from nanogrid.common.errors import ConfigError
from nanogrid.common.exitcodes import (
    EXIT_BOOT_ERROR,
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_SUPERVISOR_ERROR,
)
from nanogrid.common.version import VERSION
from nanogrid.worker.hostshare import HostShare
from nanogrid.worker.status import FAULT, HEARTBEAT, StatusReader

from . import hostcheck, sdnotify, snapshot
from .caps import FunctionCaps
from .child import HANDLED_SIGNALS, WorkerMain, run_child
from .configcheck import load_checked
from .health import HealthServer
from .metrics import SupervisorMetrics
from .wakeup import Wakeup
from .warmup import WarmUp
from .workerstate import Slot, WorkerProcess, describe_exit, heartbeat_timeout

TICK_S = 1.0
STATUS_GATHER_S = 0.05
"""After reading status lines, the arbiter lets the next ones gather this long before it reads
again (a signal still wakes it at once): under load, one wake per 50 ms instead of two per
task, and /status and /metrics at most this late."""
MURDER_GRACE_S = 5.0
"""Between SIGTERM and SIGKILL for a worker that stopped heartbeating."""
KILL_WAIT_S = 5.0
"""How long ``stop`` waits for killed workers to be reaped."""


class Arbiter:
    def __init__(self, config: Config, worker_main: WorkerMain | None = None) -> None:
        if worker_main is None:
            # Imported before any fork, so each child starts with boto3 & co. loaded.
            from nanogrid.worker.loop import main as loop_main

            worker_main = loop_main
        self.config = config
        self.worker_main: WorkerMain = worker_main
        self.pid = os.getpid()
        self.slots: dict[int, Slot] = {index: Slot(index) for index in range(config.workers)}
        """Every configured slot from the first snapshot on, so /status never lists fewer."""
        self.workers: dict[int, WorkerProcess] = {}
        self.signals: list[int] = []
        self.stopping = False
        self.started_at = time.monotonic()
        self.metrics = SupervisorMetrics()
        self.health: HealthServer | None = None
        self.wakeup = Wakeup()
        self._status_read_at = float("-inf")
        self._snapshot: dict[str, Any] = {}
        self.systemd = sdnotify.Notifier()
        self.host = HostShare.create(config)
        """The host's capacity ledger and sandbox board, shared by every worker."""
        self.isolation: dict[str, Any] = {}
        """The configured runner's isolation on this host, probed at start and on reload."""
        self.caps = FunctionCaps()
        """The per-function caps the workers met (/status, /metrics)."""
        self.runtimes: dict[str, dict[str, Any]] = {}
        """Per runtime: ``available`` and, when not, the ``problem`` (for /status)."""
        self.warm_up = WarmUp(config.pool.warm_timeout_seconds)
        """Since the start or the last reload: READY and /health UP wait for it."""

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until SIGTERM or SIGINT; returns the process exit code."""
        try:
            self.start()
        except ConfigError as exc:  # a log sink that the check let through and fails now
            print(f"nanogrid-supervisor: config error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        except OSError as exc:
            http = self.config.http
            logger.error(f"http: cannot listen on {http.host}:{http.port}: {exc.strerror or exc}")
            return EXIT_SUPERVISOR_ERROR
        try:
            while not self.stopping:
                self.wait_for_events()
                self.dispatch_signals()
                self.murder_workers()
                self.manage_workers()
                self.systemd.ping_if_due(time.monotonic())
                self.publish_status()
                self.notify_ready()
        except Exception:
            logger.opt(exception=True).critical("unexpected error in the supervisor loop")
            self.stop()
            return EXIT_SUPERVISOR_ERROR
        self.stop()
        return EXIT_OK

    def start(self) -> None:
        proctitle.set_title("supervisor", self.config.path)
        logsink.install(self.config.log, "arbiter")
        logger.info(f"supervisor {self.pid} starting: nanogrid {VERSION}, "
                    f"{self.config.workers} workers, runner {self.config.runner}, "
                    f"AWS region {self.config.aws.region}, config {self.config.path}")
        cap = self.config.capacity
        logger.info(f"capacity: {cap.memory_mb} MB, {cap.max_concurrent} invocations at once "
                    f"on this host ({cap.source})")
        self.warm_up = WarmUp(self.config.pool.warm_timeout_seconds)
        self.wakeup.install()
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._record_signal)
        hostcheck.remove_leftovers(self.config, "an earlier agent")
        self.isolation = hostcheck.isolation(self.config)
        self.runtimes = hostcheck.runtimes(self.config)
        self.publish_status()  # before the HTTP server can ask for it
        self.health = HealthServer(self.config.http.host, self.config.http.port,
                                   self.status_snapshot, self.render_metrics)
        self.manage_workers()
        self.publish_status()

    def _record_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)

    def wait_for_events(self) -> None:
        """Sleep until a signal, a status line or the next deadline; read the status lines.

        Lines that come within STATUS_GATHER_S of the last ones read wait in their pipes and
        are read together when that time is up.
        """
        gather_until = self._status_read_at + STATUS_GATHER_S
        now = time.monotonic()
        gathering = now < gather_until
        if gathering:
            ready = self.wakeup.wait(min(self._timeout(), gather_until - now), signals_only=True)
        else:
            ready = self.wakeup.wait(self._timeout())
        if gathering and time.monotonic() >= gather_until:
            ready = list(self.workers.values())
        if sum(self.read_status(worker) for worker in ready):
            self._status_read_at = time.monotonic()

    def _timeout(self) -> float:
        now = time.monotonic()
        due = [now + TICK_S]
        due += [w.kill_at for w in self.workers.values() if w.kill_at is not None and not w.killed]
        due += [s.not_before for s in self.slots.values() if s.not_before > now]
        if (ping := self.systemd.next_due()) is not None:
            due.append(ping)
        return max(0.0, min(due) - now)

    def dispatch_signals(self) -> None:
        while self.signals:
            name = signal.Signals(self.signals.pop(0)).name
            if name != "SIGCHLD":
                logger.info(f"received {name}")
            getattr(self, f"handle_{name[3:].lower()}")()

    # -- signals ----------------------------------------------------------------------------

    def handle_chld(self) -> None:
        self.reap_workers()

    def handle_hup(self) -> None:
        if self.stopping:
            logger.info("not reloading: stopping")
            return
        self.reload()

    def handle_term(self) -> None:
        """Stop gracefully; a second SIGTERM or SIGINT while draining kills what is left."""
        if self.stopping:
            logger.warning("asked again to stop: killing the workers still draining")
            for worker in self.workers.values():
                worker.kill_at = 0.0
        self.stopping = True

    handle_int = handle_term

    # -- workers ----------------------------------------------------------------------------

    def manage_workers(self) -> None:
        """Give every slot 0..N-1 a process once its backoff is over; forget slots beyond N."""
        occupied = {w.index for w in self.workers.values()}
        now = time.monotonic()
        for index in range(self.config.workers):
            slot = self.slots.setdefault(index, Slot(index))
            if index not in occupied and now >= slot.not_before:
                self.spawn_worker(slot)
        for index in [i for i in self.slots if i >= self.config.workers and i not in occupied]:
            del self.slots[index]

    def spawn_worker(self, slot: Slot) -> None:
        read_fd, write_fd = os.pipe()
        # Blocked across fork, so a signal meant for the child cannot hit the arbiter's
        # handlers in it: the child unblocks once its own dispositions are in place.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                inherited = [*self.wakeup.fds(), read_fd]
                inherited += [w.reader.fd for w in self.workers.values()]
                if self.health is not None:
                    inherited.append(self.health.fileno())
                run_child(self.worker_main, self.config, slot.index, write_fd, self.host,
                          parent=self.pid, close_fds=inherited)
        except OSError as exc:
            logger.error(f"cannot fork worker {slot.index}: {exc}; retrying in 1s")
            os.close(read_fd)
            os.close(write_fd)
            slot.not_before = time.monotonic() + 1.0
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(write_fd)
        now = time.monotonic()
        worker = WorkerProcess(pid, slot.index, StatusReader(read_fd), started=now, last_beat=now)
        self.workers[pid] = worker
        self.wakeup.watch(worker)
        logger.info(f"worker {slot.index} started (pid {pid})")

    def reap_workers(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self.read_status(worker)  # its last lines: a task it finished as it exited
                self.metrics.worker_gone(pid)
                self.wakeup.forget(worker)
                worker.reader.close()
                self._exited(worker, os.waitstatus_to_exitcode(wait_status))

    def _exited(self, worker: WorkerProcess, code: int) -> None:
        self.host.forget(worker.index)  # what a killed worker had running counts no more
        how = describe_exit(code)
        if worker.retiring or self.stopping:
            logger.info(f"worker {worker.index} (pid {worker.pid}) {how} after draining")
            return
        slot = self.slots[worker.index]
        delay = slot.crashed(worker, code, time.monotonic())
        self.metrics.restarts.inc()
        if code == EXIT_BOOT_ERROR:
            logger.error(f"worker {worker.index} could not boot ({how}); retry "
                         f"{slot.failures} in {delay:g}s")
        else:
            logger.error(f"worker {worker.index} (pid {worker.pid}) {how}; replacing it "
                         f"in {delay:g}s (restart {slot.restarts})")

    def murder_workers(self) -> None:
        """SIGTERM workers that stopped heartbeating; SIGKILL those past their time to exit."""
        now = time.monotonic()
        timeout = heartbeat_timeout(self.config)
        for worker in self.workers.values():
            if worker.kill_at is None and now - worker.last_beat > timeout:
                logger.error(f"worker {worker.index} (pid {worker.pid}) sent no heartbeat for "
                             f"{now - worker.last_beat:.0f}s; stopping it")
                self._terminate(worker, now + MURDER_GRACE_S)
            elif worker.kill_at is not None and now >= worker.kill_at and not worker.killed:
                logger.warning(f"worker {worker.index} (pid {worker.pid}) did not exit in time; "
                               f"sending SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
                worker.killed = True

    def retire(self, worker: WorkerProcess, deadline: float) -> None:
        """Let the worker drain: SIGTERM now, SIGKILL at ``deadline`` if it still runs."""
        worker.retiring = True
        self._terminate(worker, deadline)

    def _terminate(self, worker: WorkerProcess, kill_at: float) -> None:
        if worker.kill_at is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
        worker.kill_at = min(kill_at, worker.kill_at or kill_at)

    # -- status -----------------------------------------------------------------------------

    def read_status(self, worker: WorkerProcess) -> int:
        """Apply the worker's status lines waiting in its pipe; how many there were."""
        if worker.reader.eof:
            return 0
        messages = worker.reader.read()
        if worker.reader.eof:
            self.wakeup.forget(worker)
        for message in messages:
            finished = worker.apply(message)
            if finished is not None:
                if worker.index in self.slots:
                    self.slots[worker.index].tasks_done += 1
                self.metrics.task_finished(finished)
            elif message.get("type") == FAULT:
                self.metrics.faults.inc(kind=str(message.get("kind")))
            elif message.get("type") == HEARTBEAT:
                self.metrics.worker_counts(worker.pid, message.get("counts"))
            elif (deferred := self.caps.apply(message)) is not None:
                self.metrics.deferrals.inc(function_id=deferred)
        return len(messages)

    def publish_status(self) -> None:
        """Build the snapshot /status and /health serve; update the gauges and systemd."""
        now = time.monotonic()
        sandboxes = self.host.board.entries()
        self.warm_up.update(self.warm_wanted(), sandboxes, set(self.current_workers()), now)
        self._snapshot = snapshot.build(
            self.config, self.slots, self.workers, self.host.ledger, sandboxes, pid=self.pid,
            isolation=self.isolation, runtimes=self.runtimes, caps=self.caps.status(),
            warm_up=self.warm_up.status(now), stopping=self.stopping,
            uptime=now - self.started_at, now=now)
        alive = sum(1 for w in self._snapshot["workers"] if w["alive"])
        self.metrics.update(self._snapshot)
        self.systemd.status(f"{alive}/{self.config.workers} workers alive")

    def status_snapshot(self) -> dict[str, Any]:
        """The latest snapshot; called from the HTTP thread."""
        return self._snapshot

    def render_metrics(self) -> str:
        """/metrics, with the host read now; called from the HTTP thread (the snapshot, not
        the loop's own dicts, names the workers)."""
        workers = [(w["id"], w["pid"]) for w in self._snapshot.get("workers", ()) if w["pid"]]
        self.metrics.host.sample(self.config.paths.outbox_dir, workers)
        return self.metrics.render()

    def warm_wanted(self) -> dict[str, int]:
        """The runtimes that can start here -> their ``warm`` count (warmup.py)."""
        return {name: runtime.warm for name, runtime in self.config.runtimes.items()
                if self.runtimes.get(name, {}).get("available", True)}

    def current_workers(self) -> dict[int, WorkerProcess]:
        """The workers on the current config (not draining after a reload), by pid."""
        return {pid: w for pid, w in self.workers.items() if not w.retiring}

    def notify_ready(self) -> None:
        """READY=1, once per start or reload, when every slot's worker on the current config
        booted (or failed) and the pools are warm (or the warm-up timed out): `systemctl
        start` returns when the agent serves warm (or visibly cannot: /health and STATUS say
        why)."""
        if self.systemd.ready_sent or not self.warm_up.done:
            return
        booted = {w.index for w in self.current_workers().values() if w.booted}
        if all(s.index in booted or s.failures for s in self.slots.values()):
            self.systemd.ready()

    # -- reload and stop --------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the config file: valid, roll the workers over to it; invalid, keep the old."""
        if self.config.path is None:
            logger.warning("not reloading: the config did not come from a file")
            return
        self.systemd.reloading()
        try:
            config, _ = load_checked(self.config.path)
            logsink.swap(config.log, self.config.log, "arbiter")
        except ConfigError as exc:
            logger.error(f"reload refused, still running on the config loaded at "
                         f"{self.config.loaded_at}: {exc}")
            self.metrics.reloads.inc(result="refused")
            self.systemd.ready()
            return
        old_http = self.config.http
        if self.health is not None and (config.http.host, config.http.port) != (
                old_http.host, old_http.port):
            self.health = self.health.moved(config.http.host, config.http.port)
        self.config = config
        self.host = self.host.resized(config)
        self.warm_up = WarmUp(config.pool.warm_timeout_seconds)
        self.isolation = hostcheck.isolation(self.config)
        self.runtimes = hostcheck.runtimes(self.config)
        deadline = time.monotonic() + config.drain_timeout_seconds
        old = list(self.workers.values())
        for worker in old:
            self.retire(worker, deadline)
        for slot in self.slots.values():
            slot.failures, slot.not_before = 0, 0.0
        logger.info(f"reloaded {config.path}: {config.workers} workers, runner {config.runner}; "
                    f"{len(old)} old workers drain, each slot refills as its old worker exits")
        self.metrics.reloads.inc(result="ok")

    def stop(self) -> None:
        """Drain every worker within the drain timeout, SIGKILL the rest, remove sandboxes."""
        self.stopping = True
        sdnotify.stopping()
        timeout = self.config.drain_timeout_seconds
        logger.info(f"stopping: draining {len(self.workers)} workers (at most {timeout:g}s)")
        deadline = time.monotonic() + timeout
        for worker in self.workers.values():
            self.retire(worker, deadline)
        while self.workers and time.monotonic() < deadline + KILL_WAIT_S:
            self.publish_status()
            self.wait_for_events()
            self.dispatch_signals()
            self.murder_workers()
        self.reap_workers()
        hostcheck.remove_leftovers(self.config, "this agent")
        if self.health is not None:
            self.health.close()
        if self.workers:
            logger.error(f"stopped; {len(self.workers)} workers did not die even of SIGKILL")
        else:
            logger.info("stopped")
