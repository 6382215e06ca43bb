"""The host's capacity budget, with its ``auto`` values computed once from the host.

``capacity.memory_mb: auto`` is the memory this agent may use (the host's, or its cgroup's
limit when lower) less a reserve for the system, the agent itself, the page cache and the
sandboxes' own overhead: 20% of it, at least 1 GiB, but never more than half. The budget
counts what functions asked for (``memoryMb``); idle sandboxes are not in it but in the
reserve: ``pool.max_idle_mb: auto`` is half of it (of what ``memory_mb`` leaves of the host,
when set; at least 256 MB), so the rest is slack that keeps the host out of the OOM killer
when every run uses its whole limit. ``pool.max_idle: auto`` is ``max_concurrent``: the host
keeps idle at most as many sandboxes as it runs at once.

``capacity.max_concurrent: auto`` is what the host can hold, the least of: the memory
budget at ``limits.min_memory_mb`` a run; the open files one worker may have (``ulimit -n``,
as one worker may hold every run) less ``FDS_RESERVE``, at ``FDS_PER_RUN`` a run; the tasks
the agent may start (its cgroup's ``pids.max``, the nearest limited ancestor's; else the
kernel's ``pid_max``/``threads-max`` less the tasks running) less ``PIDS_RESERVE``, at
``PIDS_PER_RUN`` a run; and 4096. A new sandbox costs a fork of a warm template, not an
interpreter start, so the count of runs is no longer bound by CPU: functions mostly wait.
A value set by hand that the open files or the tasks cannot hold is refused.

``limits.max_memory_mb`` left to its default (3008, Lambda's largest) is lowered to the
budget when the budget is smaller; only a value the operator set that cannot fit is an error.
"""

from __future__ import annotations

import dataclasses
import os
import resource
from dataclasses import dataclass
from pathlib import Path

from .config import AUTO, Config, MiB
from .errors import ConfigError

FDS_PER_RUN = 8
"""Descriptors a worker holds per run in flight: its sandbox's socket, pidfd and cgroup
files, and the run's pipes (5.5 measured at ~80 in flight a worker, rounded up)."""
FDS_RESERVE = 128
"""A worker's own descriptors: SQS, S3 and Redis sockets, logs, libraries (15 idle)."""
PIDS_PER_RUN = 4
"""Tasks per run in flight: the worker's thread, the sandbox's server, the call's process,
and one to spare (a function's own children are bounded by ``limits.max_pids``)."""
PIDS_RESERVE = 64
"""The supervisor's and the workers' own threads, the templates, the helpers."""
MAX_CONCURRENT = 4096
RESERVE_SHARE = 0.2
RESERVE_MIN_MB = 1024
IDLE_MIN_MB = 256
_NO_LIMIT = 2**62  # what cgroup v1 reports as "no memory limit" is about this large


@dataclass(frozen=True)
class Capacity:
    memory_mb: int
    max_concurrent: int
    source: str
    """How the values were found, for the start-up line and /status."""
    max_memory_mb: int
    """``limits.max_memory_mb``, the budget's when it was left to its default."""
    max_idle: int
    max_idle_mb: int
    """``pool.max_idle`` and ``pool.max_idle_mb``: the host's bound on idle sandboxes."""


def host_memory_mb() -> tuple[int, str]:
    """Memory this process may use, in MB, and where that number comes from."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MiB
    limit = _cgroup_limit_mb()
    if limit is not None and limit < total:
        return limit, f"cgroup limit {limit} MB"
    return total, f"host memory {total} MB"


def resolve(config: Config) -> Capacity:
    """The budget ``config`` asks for, ``auto`` values computed; ConfigError when the largest
    task ``limits.max_memory_mb`` allows could never fit it."""
    wanted = config.capacity
    sources = []
    memory_mb = wanted.memory_mb
    usable, where = host_memory_mb()
    if memory_mb == AUTO:
        reserve = min(max(RESERVE_MIN_MB, int(usable * RESERVE_SHARE)), usable // 2)
        memory_mb = usable - reserve
        sources.append(f"memory_mb auto: {where} less {reserve} MB reserve")
    else:
        reserve = max(0, usable - memory_mb)
    max_concurrent = wanted.max_concurrent
    nofile = open_files_limit()
    pids, pids_where = pids_limit()
    by_files = (nofile - FDS_RESERVE) // FDS_PER_RUN
    by_pids = (pids - PIDS_RESERVE) // PIDS_PER_RUN
    if max_concurrent == AUTO:
        by_memory = memory_mb // config.limits.min_memory_mb
        max_concurrent = max(1, min(by_memory, by_files, by_pids, MAX_CONCURRENT))
        sources.append(
            f"max_concurrent auto: least of {by_memory} (memory at "
            f"{config.limits.min_memory_mb} MB), {by_files} (ulimit -n {nofile}), "
            f"{by_pids} ({pids_where}), {MAX_CONCURRENT}")
    elif max_concurrent > by_pids:
        raise ConfigError(
            f"capacity.max_concurrent: {max_concurrent} runs need "
            f"{max_concurrent * PIDS_PER_RUN + PIDS_RESERVE} tasks, but {pids_where}: "
            "raise it (systemd: TasksMax=) or lower capacity.max_concurrent")
    elif max_concurrent > by_files:
        raise ConfigError(
            f"capacity.max_concurrent: {max_concurrent} runs need "
            f"{max_concurrent * FDS_PER_RUN + FDS_RESERVE} open files in one worker, but "
            f"ulimit -n is {nofile}: raise it (systemd: LimitNOFILE=) or lower "
            "capacity.max_concurrent")
    pool = config.pool
    max_idle = max_concurrent if pool.max_idle == AUTO else pool.max_idle
    max_idle_mb = pool.max_idle_mb
    if max_idle_mb == AUTO:
        max_idle_mb = max(IDLE_MIN_MB, reserve // 2)
        sources.append(f"pool.max_idle_mb auto: half the {reserve} MB reserve")
    limits = config.limits
    max_memory_mb = limits.max_memory_mb
    if max_memory_mb > memory_mb:
        if "limits.max_memory_mb" in config.given:
            raise ConfigError(
                f"limits.max_memory_mb: {max_memory_mb} MB does not fit "
                f"capacity.memory_mb ({memory_mb} MB"
                + (", auto" if wanted.memory_mb == AUTO else "")
                + "): lower limits.max_memory_mb or raise capacity.memory_mb"
            )
        max_memory_mb = memory_mb
        sources.append(f"limits.max_memory_mb {memory_mb}: the budget's")
    if limits.default_memory_mb > max_memory_mb:
        raise ConfigError(
            f"capacity.memory_mb: {memory_mb} MB cannot hold one run of "
            f"limits.default_memory_mb ({limits.default_memory_mb} MB): raise "
            "capacity.memory_mb or lower limits.default_memory_mb"
        )
    return Capacity(
        memory_mb, max_concurrent, "; ".join(sources) or "as configured", max_memory_mb,
        max_idle, max_idle_mb,
    )


def pin(config: Config, capacity: Capacity) -> Config:
    """``config`` with its capacity values computed: every worker then uses the same."""
    return dataclasses.replace(
        config,
        limits=dataclasses.replace(config.limits, max_memory_mb=capacity.max_memory_mb),
        pool=dataclasses.replace(
            config.pool, max_idle=capacity.max_idle, max_idle_mb=capacity.max_idle_mb
        ),
        capacity=dataclasses.replace(
            config.capacity,
            memory_mb=capacity.memory_mb,
            max_concurrent=capacity.max_concurrent,
            source=capacity.source,
        ),
    )


def open_files_limit() -> int:
    """``ulimit -n`` of this process, which its workers inherit."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pids_limit() -> tuple[int, str]:
    """Tasks (processes and threads) the agent may have, and where that number comes from:
    the least of its cgroup's and its ancestors' ``pids.max`` and the kernel's limits less
    the tasks running on the host."""
    kernel = min(_read_int(Path("/proc/sys/kernel/pid_max")) or 2**22,
                 _read_int(Path("/proc/sys/kernel/threads-max")) or 2**22)
    running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[1])
    found = [(kernel - running, f"the kernel's limit {kernel} less {running} tasks running")]
    found += [(limit, f"pids.max is {limit} in {where}") for limit, where in _cgroup_pids_max()]
    return min(found)


def _cgroup_pids_max() -> list[tuple[int, str]]:
    """(pids.max, its cgroup) of every limited cgroup from this process's up to the root."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            root = Path("/sys/fs/cgroup")
        elif "pids" in controllers.split(","):
            root = Path("/sys/fs/cgroup/pids")
        else:
            continue
        directory = root / path.lstrip("/")
        while True:
            limit = _read_int(directory / "pids.max")
            if limit is not None:
                found.append((limit, "/" + str(directory.relative_to(root)).lstrip(".")))
            if directory == root:
                break
            directory = directory.parent
    return found


def _read_int(path: Path) -> int | None:
    """The number in ``path``; None when it is missing or not a number ("max")."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_limit_mb() -> int | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            candidate = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"
        elif "memory" in controllers.split(","):
            candidate = (
                Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
            )
        else:
            continue
        try:
            text = candidate.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < _NO_LIMIT:
            return int(text) // MiB
    return None
