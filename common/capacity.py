"""The host's capacity budget, with its ``auto`` values computed once from the host.

``capacity.memory_mb: auto`` is the memory this agent may use (the host's, or its cgroup's
limit when lower) less a reserve for the system, the agent itself, the page cache and the
sandboxes' own overhead: 20% of it, at least 1 GiB, but never more than half. The budget
counts what functions asked for (``memoryMb``); idle sandboxes are not in it but in the
reserve: ``pool.max_idle_mb: auto`` is half of it (of what ``memory_mb`` leaves of the host,
when set; at least 256 MB), so the rest is slack that keeps the host out of the OOM killer
when every run uses its whole limit. ``pool.max_idle: auto`` is ``max_concurrent``: the host
keeps idle at most as many sandboxes as it runs at once.

``capacity.max_concurrent: auto`` is 16 runs per CPU, at most what the memory budget holds
at ``limits.min_memory_mb`` each. Functions mostly wait on I/O, so a core serves many at
once; past about 16 per core the agent's own work per run (fork, pipes, results, SQS and
Redis round trips) starts to crowd out the functions on a busy host.

``limits.max_memory_mb`` left to its default (3008, Lambda's largest) is lowered to the
budget when the budget is smaller; only a value the operator set that cannot fit is an error.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from .config import AUTO, Config, MiB
from .errors import ConfigError

RUNS_PER_CPU = 16
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
    if max_concurrent == AUTO:
        cpus = len(os.sched_getaffinity(0))
        max_concurrent = max(1, min(RUNS_PER_CPU * cpus, memory_mb // config.limits.min_memory_mb))
        sources.append(f"max_concurrent auto: {RUNS_PER_CPU} per CPU x {cpus}")
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
