"""A forked worker's first steps: drop the arbiter's signals and fds, die with the arbiter,
run the worker, and never return into the arbiter's loop."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable, Iterable
from typing import NoReturn

from loguru import logger

from nanogrid.common import proctitle
from nanogrid.common.config import Config
from nanogrid.common.exitcodes import EXIT_OK, EXIT_WORKER_CRASH
from nanogrid.worker.hostshare import HostShare

WorkerMain = Callable[[Config, int, int, HostShare], int]
"""(config, worker index, status pipe fd, what the host's workers share) -> exit code."""
HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
"""The arbiter's signals: blocked across fork, given default dispositions in the child."""
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """In a child: get SIGTERM when the arbiter dies; exit now if it died already."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # died between fork and prctl: no signal will come
        os._exit(EXIT_OK)


def run_child(
    worker_main: WorkerMain,
    config: Config,
    index: int,
    status_fd: int,
    host: HostShare,
    *,
    parent: int,
    close_fds: Iterable[int],
) -> NoReturn:
    """In the child: drop the arbiter's signals and fds, run the worker, never return."""
    code = EXIT_WORKER_CRASH
    try:
        die_with_parent(parent)
        proctitle.set_title(f"worker {index}", config.path)
        signal.set_wakeup_fd(-1)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN if signum == signal.SIGINT else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        for fd in close_fds:
            os.close(fd)
        code = int(worker_main(config, index, status_fd, host))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else EXIT_WORKER_CRASH
    except BaseException as exc:  # noqa: B036 - nothing may return into the arbiter's loop
        logger.error(f"worker {index} crashed: {type(exc).__name__}: {exc}")
    finally:
        os._exit(code)
