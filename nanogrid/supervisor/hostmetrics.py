"""What /metrics reads from the host when it is scraped: the agent's processes (the
``process_*`` families of Prometheus's client libraries, for the arbiter; per worker, its
CPU and memory), the result outbox's depth, and the build. Read per scrape, in the HTTP
thread: nothing between scrapes."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from pathlib import Path

import psutil

from nanogrid.common.version import VERSION
from nanogrid.worker.outbox import Outbox

from .prometheus import Registry


class HostMetrics:
    def __init__(self, registry: Registry) -> None:
        reg = registry
        build = reg.gauge("nanogrid_build_info", "The agent's version and Python, as labels.",
                          ("version", "python"))
        build.set(1, version=VERSION, python=platform.python_version())
        self.cpu = reg.counter("process_cpu_seconds_total",
                               "User and system CPU time of the supervisor (arbiter) process.")
        self.rss = reg.gauge("process_resident_memory_bytes", "Resident memory of the arbiter.")
        self.vms = reg.gauge("process_virtual_memory_bytes", "Virtual memory of the arbiter.")
        self.fds = reg.gauge("process_open_fds", "Open file descriptors of the arbiter.")
        self.max_fds = reg.gauge("process_max_fds", "The arbiter's file descriptor limit.")
        self.start = reg.gauge("process_start_time_seconds",
                               "Start of the arbiter, in seconds since the epoch.")
        self.worker_cpu = reg.counter(
            "nanogrid_worker_cpu_seconds_total",
            "User and system CPU time of each worker process (its sandboxes not included).",
            ("worker",))
        self.worker_rss = reg.gauge(
            "nanogrid_worker_resident_memory_bytes", "Resident memory of each worker process.",
            ("worker",))
        self.outbox = reg.gauge(
            "nanogrid_outbox_results",
            "Results waiting in the on-disk outbox for Redis to take them.")
        self.set_aside = reg.gauge(
            "nanogrid_outbox_set_aside_results",
            "Outbox results Redis kept refusing, set aside (tried again every 10 minutes).")

    def sample(self, outbox_dir: str, workers: Iterable[tuple[int, int]]) -> None:
        """Read the arbiter, the ``(index, pid)`` workers and the outbox now."""
        me = psutil.Process()
        with me.oneshot():
            times = me.cpu_times()
            memory = me.memory_info()
            self.cpu.set(times.user + times.system)
            self.rss.set(memory.rss)
            self.vms.set(memory.vms)
            self.fds.set(me.num_fds())
            self.start.set(me.create_time())
        self.max_fds.set(os.sysconf("SC_OPEN_MAX"))
        cpu: dict[tuple[str, ...], float] = {}
        rss: dict[tuple[str, ...], float] = {}
        for index, pid in workers:
            try:
                worker = psutil.Process(pid)
                with worker.oneshot():
                    t = worker.cpu_times()
                    cpu[(str(index),)] = t.user + t.system
                    rss[(str(index),)] = worker.memory_info().rss
            except psutil.Error:
                continue  # it exited meanwhile
        self.worker_cpu.replace(cpu)
        self.worker_rss.replace(rss)
        outbox = Outbox(Path(outbox_dir))
        self.outbox.set(outbox.depth())
        self.set_aside.set(outbox.set_aside_count())
