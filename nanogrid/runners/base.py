"""What every runner (process, Docker) offers the worker: sandboxes from a warm pool.

A worker takes a sandbox for a function (``acquire``), puts the function's code into
``sandbox.code_dir`` unless it is there already, ``run``s it, and gives the sandbox back
(``release``). A sandbox that ran function F at code version V serves only F@V afterwards.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from nanogrid.common.config import Config

from .isolation import Isolation
from .lending import SandboxBoard, Ticket


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
    traceparent: str | None = None
    """The W3C trace context a span of the function's own would be a child of."""
    tracestate: str | None = None

    def environment(self, path: str, home: str) -> dict[str, str]:
        """The function's whole environment (the contract): nothing of the host's, and the
        trace context as OpenTelemetry's environment carrier names it, when there is one."""
        env = {
            "NANOGRID_REQUEST_ID": self.request_id,
            "NANOGRID_FUNCTION_ID": self.function_id,
            "NANOGRID_MEMORY_MB": str(self.memory_mb),
            "PATH": path,
            "HOME": home,
            "LANG": "C.UTF-8",
        }
        if self.traceparent is not None:
            env["TRACEPARENT"] = self.traceparent
            if self.tracestate is not None:
                env["TRACESTATE"] = self.tracestate
        return env


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


def server_oom_outcome(duration_ms: float, peak_bytes: int, source: str) -> RunOutcome:
    """The OOM killer took the sandbox's server rather than the function's own process (a
    node function runs inside it, or the kernel picked the server): still the function's
    out-of-memory; only its output is lost with the server."""
    return RunOutcome(
        exit_code=-signal.SIGKILL,
        timed_out=False,
        oom_killed=True,
        stdout=b"",
        stderr=b"",
        stdout_truncated=False,
        stderr_truncated=False,
        duration_ms=duration_ms,
        peak_memory_bytes=peak_bytes,
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
    limit_mb: int = 0
    """The memory limit its cgroup has now (written only when a call asks for another; on
    the board, so whichever worker runs its next call knows it)."""
    healthy: bool = field(default=True)
    ticket: Ticket | None = None
    """Its record on the host's board (lending.py) while a call has it."""
    borrowed: bool = False
    """Another worker's sandbox, as this worker's call runs in it (a view of it)."""
    frozen: bool = False
    """Left frozen after its last run: the next run thaws it."""
    settling: bool = False
    """Its server gets its next call ready after the run; it is frozen, and goes back to the
    board, once the server says it is (nanogrid/runners/freezer.py)."""


class SandboxMaker(Protocol):
    """What a pool (pool.py) needs of its runner."""

    def create(self, runtime: str) -> Sandbox:
        """A new generic sandbox of ``runtime``."""
        ...

    def prime(self, sandbox: Sandbox) -> None:
        """Ready a new sandbox made ahead of calls (SandboxError: it cannot be kept)."""
        ...

    def destroy(self, sandbox: Sandbox) -> None: ...

    def describe(self, sandbox: Sandbox) -> dict[str, Any]:
        """What another worker needs to run in ``sandbox`` (JSON, at most 1 KiB)."""
        ...

    def borrow(self, runtime: str, descriptor: dict[str, Any]) -> Sandbox:
        """A view of another worker's sandbox from its descriptor, to run one call in."""
        ...

    def attach(self, sandbox: Sandbox) -> None:
        """Connect to the sandbox's server for a call (SandboxError: it is gone)."""
        ...

    def detach(self, sandbox: Sandbox) -> None:
        """The call is over: disconnect (the next taker connects)."""
        ...

    def idle_bytes(self, sandbox: Sandbox) -> int:
        """The sandbox's memory now (what it costs the host while idle)."""
        ...

    def pausable(self, sandbox: Sandbox, idle_s: float) -> bool:
        """Whether to pause the idle ``sandbox`` now (its runner cannot freeze it)."""
        ...

    def pause(self, sandbox: Sandbox) -> None: ...

    def shrinkable(self, sandbox: Sandbox, idle_s: float) -> bool:
        """Whether the idle ``sandbox``'s server is to drop what it keeps started for a call
        now (a node Worker, ``pool.node_worker_idle_seconds``)."""
        ...

    def shrink(self, sandbox: Sandbox) -> bool:
        """Have the idle ``sandbox``'s server drop it (off the board meanwhile); False when
        the sandbox cannot be kept."""
        ...


class Runner:
    """Interface of a sandbox runner; ``process`` and ``docker`` implement it."""

    name = "runner"
    marker = "[RUNNER]"

    def __init__(
        self, config: Config, worker_index: int, board: SandboxBoard | None = None
    ) -> None:
        """One worker's runner, made after its fork: its slice of the warm pools, their idle
        sandboxes on the host's ``board`` (lending.py; None: a board of its own)."""

    def acquire(self, runtime: str, code_key: str) -> Sandbox:
        """A sandbox for ``code_key``: warm for it, else fresh warm, else a cold one."""
        raise NotImplementedError

    def run(self, sandbox: Sandbox, invocation: Invocation) -> RunOutcome:
        """Run the invocation in the sandbox; raise SandboxError when the sandbox failed."""
        raise NotImplementedError

    def release(self, sandbox: Sandbox) -> None:
        """Give the sandbox back; an unhealthy one is destroyed and replaced."""
        raise NotImplementedError

    def code_path(self, sandbox: Sandbox) -> str:
        """Where the function sees its code (its working directory): what its stack traces
        name, and the agent shows as /var/task (nanogrid/worker/diagnose.py)."""
        return str(sandbox.code_dir)

    def close(self) -> None:
        """Destroy every sandbox of this runner."""
        raise NotImplementedError

    def pool_stats(self) -> dict[str, dict[str, int]]:
        """Per runtime: ``warm`` (idle, ready) and ``busy`` sandboxes."""
        raise NotImplementedError

    def shed_idle(self) -> int:
        """Destroy idle sandboxes that hold a function's code (the disk runs short); how many."""
        return 0

    def unavailable_runtimes(self) -> dict[str, str]:
        """Runtimes this runner cannot start -> why; their tasks fail with RuntimeUnavailable."""
        return {}

    @classmethod
    def check_config(cls, config: Config) -> None:
        """The runner's own checks of a loaded config (ConfigError, one line)."""

    @classmethod
    def sandbox_dir(cls, config: Config) -> Path:
        """Where this runner keeps its sandboxes' code on the host (a disk the worker watches)."""
        return Path(config.paths.work_dir)

    @classmethod
    def isolation(cls, config: Config) -> Isolation:
        """What this host's sandboxes of this runner are isolated by, and what is missing."""
        return Isolation()

    @classmethod
    def runtime_problems(cls, config: Config) -> dict[str, str]:
        """The configured runtimes that cannot start on this host -> why (one line each)."""
        return {}

    @classmethod
    def remove_stale(cls) -> int:
        """Remove sandboxes an earlier agent on this host left behind; returns how many."""
        return 0
