"""What a worker talks to, made once after the fork: ``connect`` is the worker's boot.

``Services`` is the seam between a worker's loop and the world (dramatiq's ``Worker(broker)``):
the worker and each message's run use only what is here, so a test or a benchmark builds a
worker from other services (nanogrid/worker/stubs.py ships small in-memory ones) instead of
rewiring one after it booted.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from nanogrid.common import capacity
from nanogrid.common.config import Config
from nanogrid.runners import create_runner
from nanogrid.runners.base import Runner

from . import faults
from .autotuner import PeakHistory
from .caps import CapGate
from .claim import ClaimLeases, ClaimStore
from .cloudwatch import MetricsPublisher
from .codestore import CodeStore
from .deleter import BatchDeleter
from .diskspace import DiskGuard
from .faults import FaultBoard
from .hostshare import HostShare
from .ledger import Ledger
from .redrive import Redrive
from .resultstore import ResultStore
from .sqs import TaskQueue
from .visibility import VisibilityHeartbeat

if TYPE_CHECKING:
    from .status import StatusReporter


@dataclass(frozen=True)
class Services:
    config: Config
    """The config the services were made for (``capacity`` pinned when the worker is alone)."""
    worker_id: str
    """``host:pid``: who ran a task (results, claims)."""
    queue: TaskQueue
    visibility: VisibilityHeartbeat
    """Keeps received messages invisible until they end."""
    deleter: BatchDeleter
    store: ResultStore
    claims: ClaimStore
    claim_leases: ClaimLeases
    caps: CapGate
    """What this worker does with a function at its cap across hosts."""
    redrive: Redrive
    """The task queue's redrive policy: hand-backs near its count are sent again."""
    history: PeakHistory
    codes: CodeStore
    runner: Runner
    metrics: MetricsPublisher
    faults: FaultBoard
    disk: DiskGuard
    ledger: Ledger
    """The host's capacity budget (shared by the workers of an agent)."""
    status: StatusReporter | None = None
    """The pipe to the arbiter (None for a worker on its own)."""

    def counts(self) -> dict[str, int]:
        """What went wrong with each peer and how many messages were dead-lettered, since
        the worker booted: the arbiter turns them into /metrics counters (status.py)."""
        return {
            "sqs": self.queue.errors + self.visibility.queue.errors,
            "s3": self.codes.errors,
            "redis": self.store.errors,
            "cloudwatch": self.metrics.errors,
            "deadLettered": self.queue.dead_lettered,
            "resent": self.redrive.resent,
        }

    def close(self) -> None:
        """Stop the background threads, flush what is pending, remove the sandboxes."""
        self.visibility.stop()
        self.claim_leases.stop()
        self.deleter.close()
        self.runner.close()
        self.metrics.close()
        self.store.close()


def connect(
    config: Config,
    index: int,
    board: FaultBoard,
    status: StatusReporter | None = None,
    host: HostShare | None = None,
) -> Services:
    """Make worker ``index``'s clients, stores and sandbox runner (after the fork). Peers
    that are away (Redis, SQS) are not a boot error: the loop waits for them DEGRADED.
    Raises on what cannot work (a queue SQS refuses, a runner that cannot start)."""
    queue = TaskQueue(config.queue, region=config.aws.region)
    redrive = Redrive(queue, config.queue.max_attempts)
    unreachable = queue.check()
    if unreachable is not None:
        logger.warning(f"[SQS] {unreachable} (booting anyway: the receive loop retries)")
    else:
        redrive.learn()
        if index == 0:  # one worker says it, not every one
            for problem in queue.check_dead_letter():
                logger.warning(f"[SQS] {problem}")
    history = PeakHistory(config.autotuner)
    store = ResultStore(
        config.redis.url,
        config.redis.result_ttl_seconds,
        Path(config.paths.outbox_dir),
        on_set_aside=lambda message: board.fault(faults.OUTBOX_SET_ASIDE, message),
        peaks=history,
    )
    # A probe write, not a boot condition: while Redis cannot take results (down, failing
    # over, or not there yet) the worker is up but DEGRADED, taking no work until it can.
    store.writable()
    store.start_flushing()
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    claims = ClaimStore(
        store.link, worker_id, config.queue.visibility_timeout_seconds, store.existing, history,
        config.concurrency.default_cap,
    )
    codes = CodeStore(
        Path(config.paths.code_cache_dir), config.limits.max_zip_bytes, region=config.aws.region
    )
    if host is None:  # a worker on its own (tests, benchmarks): the whole host's
        config = capacity.pin(config, capacity.resolve(config))
        host = HostShare.create(config)
    runner = create_runner(config, index, host.board)  # pools grow up to max_concurrent
    paths = config.paths
    return Services(
        config=config,
        worker_id=worker_id,
        queue=queue,
        visibility=VisibilityHeartbeat(TaskQueue.for_heartbeats(config.queue, config.aws.region)),
        deleter=BatchDeleter(queue),
        store=store,
        claims=claims,
        claim_leases=ClaimLeases(claims, lambda text: board.fault(faults.CLAIM_LOST, text)),
        caps=CapGate(status),
        redrive=redrive,
        history=history,
        codes=codes,
        runner=runner,
        metrics=MetricsPublisher(config.cloudwatch, region=config.aws.region),
        faults=board,
        disk=DiskGuard(
            [Path(paths.code_cache_dir), runner.sandbox_dir(config), Path(paths.outbox_dir)],
            paths.min_free_mb,
            (codes.trim, runner.shed_idle),
        ),
        ledger=host.ledger,
        status=status,
    )
