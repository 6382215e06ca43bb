"""What every runner (process, Docker) offers the worker: sandboxes from a warm pool.

A worker takes a sandbox for a function (``acquire``), puts the function's code into
``sandbox.code_dir`` unless it is there already, ``run``s it, and gives the sandbox back
(``release``). A sandbox that ran function F at code version V serves only F@V afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from supervisor.config import Config

    from .forkclient import RawRun
    from .pool import WarmPool


@dataclass(frozen=True)
class Invocation:
    """One function run as the runner sees it."""

    request_id: str
    function_id: str
    argv: tuple[str, ...]
    stdin: bytes
    memory_mb: int
    timeout_ms: int
    max_output_bytes: int
    max_pids: int

    def environment(self, path: str, home: str) -> dict[str, str]:
        """The function's whole environment (the contract): nothing of the host's."""
        return {
            "NANOGRID_REQUEST_ID": self.request_id,
            "NANOGRID_FUNCTION_ID": self.function_id,
            "NANOGRID_MEMORY_MB": str(self.memory_mb),
            "PATH": path,
            "HOME": home,
            "LANG": "C.UTF-8",
        }


@dataclass
class RunOutcome:
    """What a run produced, with its per-invocation peak memory."""

    exit_code: int | None
    """The function's exit code; -N when killed by signal N."""
    timed_out: bool
    oom_killed: bool
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    duration_ms: float
    peak_memory_bytes: int
    peak_source: str
    """Which reader measured the peak: ``cgroup-v1``, ``cgroup-v2``, ``rusage`` or ``psutil``."""

    @classmethod
    def from_raw(
        cls, raw: RawRun, *, exit_code: int | None, oom_killed: bool, peak: int, source: str
    ) -> RunOutcome:
        """A fork-server run as the worker sees it, with the runner's verdict and measurement."""
        return cls(
            exit_code=exit_code,
            timed_out=raw.timed_out,
            oom_killed=oom_killed,
            stdout=raw.stdout,
            stderr=raw.stderr,
            stdout_truncated=raw.stdout_truncated,
            stderr_truncated=raw.stderr_truncated,
            duration_ms=raw.duration_ms,
            peak_memory_bytes=peak,
            peak_source=source,
        )


@dataclass(eq=False)
class Sandbox:
    """A warm place to run code; runner-specific state lives in subclasses."""

    runtime: str
    name: str
    code_dir: Path
    cold_start: bool = False
    code_key: str | None = None
    """The function@version whose code is in ``code_dir``; it serves only that one."""
    runs: int = 0
    idle_since: float = 0.0
    healthy: bool = field(default=True)


class Runner:
    """Interface of a sandbox runner; ``process`` and ``docker`` implement it."""

    name = "runner"
    marker = "[RUNNER]"

    def acquire(self, runtime: str, code_key: str) -> Sandbox:
        """A sandbox for ``code_key``: warm for it, else fresh warm, else a cold one."""
        raise NotImplementedError

    def run(self, sandbox: Sandbox, invocation: Invocation) -> RunOutcome:
        """Run the invocation in the sandbox; raise SandboxError when the sandbox failed."""
        raise NotImplementedError

    def release(self, sandbox: Sandbox) -> None:
        """Give the sandbox back; an unhealthy one is destroyed and replaced."""
        raise NotImplementedError

    def close(self) -> None:
        """Destroy every sandbox of this runner."""
        raise NotImplementedError

    def pool_stats(self) -> dict[str, dict[str, int]]:
        """Per runtime: ``warm`` (idle, ready) and ``busy`` sandboxes."""
        raise NotImplementedError


class PooledRunner(Runner):
    """A runner whose sandboxes come from one WarmPool per runtime (``self.pools``)."""

    pools: dict[str, WarmPool]
    marker = "[POOL]"

    def make_pools(
        self,
        config: Config,
        worker_index: int,
        on_idle: Callable[[Sandbox, float], None] | None = None,
    ) -> None:
        """One pool per runtime, sized to this worker's share of its ``warm`` count."""
        from .pool import WarmPool

        self.pools = {
            name: WarmPool(
                name,
                warm_share(rt.warm, config.workers, worker_index),
                lambda name=name: self.create(name),
                self.destroy,
                idle_expiry_s=config.pool.idle_expiry_seconds,
                on_idle=on_idle,
                marker=self.marker,
            )
            for name, rt in config.runtimes.items()
        }

    def create(self, runtime: str) -> Sandbox:
        """A new generic sandbox of ``runtime`` (called by the pool)."""
        raise NotImplementedError

    def destroy(self, sandbox: Sandbox) -> None:
        """Remove a sandbox for good (called by the pool)."""
        raise NotImplementedError

    def acquire(self, runtime: str, code_key: str) -> Sandbox:
        return self.pools[runtime].acquire(code_key)

    def release(self, sandbox: Sandbox) -> None:
        self.pools[sandbox.runtime].release(sandbox)

    def pool_stats(self) -> dict[str, dict[str, int]]:
        return {name: pool.stats() for name, pool in self.pools.items()}

    def close_pools(self) -> None:
        for pool in self.pools.values():
            pool.close()


def warm_share(warm: int, workers: int, index: int) -> int:
    """This worker's slice of a runtime's warm pool size, split evenly across workers."""
    return warm // workers + (1 if index < warm % workers else 0)
