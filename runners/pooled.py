"""What the process and Docker runners share: sandboxes from warm pools (one per runtime), a
server inside each, and one run sequence for all of them.

``PooledRunner.run`` is that sequence, top to bottom: set the run's limits and reset its peak
(``limit``), send the call to the sandbox's server with its place (``placement``), thaw the
sandbox as the request goes out, read the run's memory (the cgroup's peak and OOM kills, or
what the server reported), end what the run left behind (``leftovers``), let the server get
its next call ready, and freeze the sandbox again while it idles. A runner says how each
step is done on its sandboxes through those hooks; what each kind of in-sandbox server
means (does it run the function in its own process, does it reap its runs) is an attribute
of the server kind (sandbox_server.py), not a test of its name.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from loguru import logger

from common.config import Config, MiB
from common.errors import RuntimeUnavailable, SandboxError

from .base import Invocation, Runner, RunOutcome, Sandbox, server_oom_outcome
from .freezer import Freezer, IdleFreezer
from .launch import Launch
from .memory import CgroupMemory
from .pool import WarmPool, warm_share
from .sandbox_server import log_preload, preload_key
from .sandboxclient import RawRun, SandboxClient


@dataclass(eq=False)
class ServerSandbox(Sandbox):
    """A sandbox with a server inside that takes the calls."""

    client: SandboxClient | None = None
    limit_mb: int = 0
    """The memory limit its cgroup has now (written only when a call asks for another)."""


@dataclass
class Meter:
    """One run's memory as its runner measures it: the sandbox cgroup's reader (None without
    one) and its OOM kills before the run; without a cgroup, the rlimits the run gets."""

    memory: CgroupMemory | None
    oom_before: int = 0
    rlimits: dict[str, int] | None = None


class PooledRunner(Runner):
    """A runner whose sandboxes come from one WarmPool per runtime (``self.pools``)."""

    pools: dict[str, WarmPool]
    unavailable: dict[str, str]
    """Runtimes that cannot start on this host -> why; they get no pool."""
    launches: dict[str, Launch]
    """How each runtime's command starts from its sandbox's server."""
    idle: IdleFreezer
    config: Config
    marker = "[POOL]"
    made_at_once: int | None = None
    """Most sandboxes one pool makes at once (None: up to its limit)."""
    limit_errors: tuple[type[BaseException], ...] = (OSError,)
    """What setting a sandbox's limits raises when the sandbox cannot take them."""

    # -- the run ------------------------------------------------------------------------------

    def run(self, sandbox: Sandbox, invocation: Invocation) -> RunOutcome:
        assert isinstance(sandbox, ServerSandbox) and sandbox.client is not None
        launch = self.launches[sandbox.runtime]
        try:
            meter = self.limit(sandbox, invocation)
        except self.limit_errors as exc:
            sandbox.healthy = False
            raise SandboxError(f"cannot set the sandbox's limits: {self.describe(exc)}") from None
        freezer = self.freezer(sandbox)
        # Only a sandbox that can be frozen between its runs may hold its function's code.
        preload = preload_key(self.config, sandbox) if freezer and launch.script else None
        cwd, env = self.placement(sandbox, invocation)
        started = time.monotonic()
        try:
            raw = sandbox.client.run(
                argv=list(launch.argv),
                cwd=cwd,
                env=env,
                python=launch.python,
                stdin=invocation.stdin,
                timeout_s=invocation.timeout_ms / 1000,
                max_output_bytes=invocation.max_output_bytes,
                rlimits=meter.rlimits,
                preload=preload,
                on_sent=(lambda: self.idle.wake(sandbox, freezer)) if freezer else None,
            )
            exit_code = os.waitstatus_to_exitcode(raw.status)
        except SandboxError:
            sandbox.healthy = False
            peak, oom_kills = self._read(sandbox, meter)
            if not oom_kills:
                raise
            return server_oom_outcome(
                (time.monotonic() - started) * 1000,
                invocation.memory_mb * MiB if peak is None else peak,
                meter.memory.source if meter.memory else "rusage",
            )
        except (KeyError, TypeError, ValueError) as exc:  # the reply is not what ours sends
            sandbox.healthy = False
            raise SandboxError(f"sandbox {launch.server.name} server misbehaved: {exc!r}") from None
        sandbox.runs += 1
        log_preload(self.marker, sandbox, raw)
        peak, oom_kills = self._read(sandbox, meter)
        killed = exit_code == -signal.SIGKILL and not raw.timed_out
        oom = killed and oom_kills > 0 if meter.memory else self.oom_without_cgroup(
            exit_code, raw
        )
        healthy = sandbox.healthy and not (raw.timed_out or oom or oom_kills)
        if healthy:
            healthy = self.leftovers(sandbox, launch)
        sandbox.client.arm()
        if healthy and freezer and preload is not None and launch.script is not None:
            healthy = self.idle.rest(sandbox, freezer, sandbox.client, launch.script)
        sandbox.healthy = healthy
        if peak is None or meter.memory is None:  # no cgroup, or v2 without a resettable peak
            return raw.outcome(exit_code=exit_code, oom_killed=oom, peak=raw.maxrss_bytes,
                               source="rusage")
        return raw.outcome(exit_code=exit_code, oom_killed=oom, peak=peak,
                           source=meter.memory.source)

    @staticmethod
    def _read(sandbox: Sandbox, meter: Meter) -> tuple[int | None, int]:
        """The run's cgroup peak (None when unknown) and the OOM kills during the run."""
        if meter.memory is None:
            return None, 0
        try:
            return meter.memory.peak_bytes(), meter.memory.oom_kills() - meter.oom_before
        except OSError:  # the sandbox went away under the run
            sandbox.healthy = False
            return None, 0

    # -- the runner's hooks -------------------------------------------------------------------

    def limit(self, sandbox: ServerSandbox, invocation: Invocation) -> Meter:
        """Set the run's memory limit, count the OOM kills so far, reset the peak."""
        raise NotImplementedError

    def placement(self, sandbox: ServerSandbox, invocation: Invocation
                  ) -> tuple[str, dict[str, str]]:
        """Where the function runs, as its server sees it: its directory and environment."""
        raise NotImplementedError

    def leftovers(self, sandbox: ServerSandbox, launch: Launch) -> bool:
        """End what the run left running; False when the sandbox cannot be kept."""
        raise NotImplementedError

    def oom_without_cgroup(self, exit_code: int, raw: RawRun) -> bool:
        """Whether a run without a cgroup to ask ran out of memory."""
        raise NotImplementedError

    def freezer(self, sandbox: ServerSandbox) -> Freezer | None:
        """The sandbox's freezer, when it can be frozen between its runs."""
        return None

    def describe(self, exc: BaseException) -> str:
        """One line for people from an error of this runner's peers."""
        return str(exc)

    def create(self, runtime: str) -> Sandbox:
        """A new generic sandbox of ``runtime`` (called by the pool)."""
        raise NotImplementedError

    def destroy(self, sandbox: Sandbox) -> None:
        """Remove a sandbox for good (called by the pool)."""
        raise NotImplementedError

    # -- the pools ----------------------------------------------------------------------------

    def make_pools(
        self,
        config: Config,
        worker_index: int,
        on_idle: Callable[[Sandbox, float], None] | None = None,
        unavailable: Mapping[str, str] | None = None,
    ) -> None:
        """One pool per runtime that can start, sized to this worker's share of its ``warm``
        count, growing on demand up to ``capacity.max_concurrent`` (what the host may run at
        once)."""
        self.unavailable = dict(unavailable or {})
        self.pools = {
            name: WarmPool(
                name,
                warm_share(rt.warm, config.workers, worker_index),
                self._maker(name),
                self.destroy,
                idle_expiry_s=config.pool.idle_expiry_seconds,
                on_idle=on_idle,
                marker=self.marker,
                limit=config.capacity.max_concurrent,
                max_making=self.made_at_once,
            )
            for name, rt in config.runtimes.items()
            if name not in self.unavailable
        }

    def _maker(self, runtime: str) -> Callable[[], Sandbox]:
        return lambda: self.create(runtime)

    def pool(self, runtime: str) -> WarmPool:
        """The runtime's pool; RuntimeUnavailable (with the reason) when it cannot start."""
        if runtime in self.unavailable:
            raise RuntimeUnavailable(unavailable_message(runtime, self.unavailable[runtime]))
        return self.pools[runtime]

    def acquire(self, runtime: str, code_key: str) -> Sandbox:
        return self.pool(runtime).acquire(code_key)

    def mark_unavailable(self, runtime: str, reason: str) -> RuntimeUnavailable:
        """Found out while making a sandbox: stop filling its pool; the error to raise."""
        if runtime not in self.unavailable:
            logger.error(f"{self.marker} {unavailable_message(runtime, reason)}")
        self.unavailable[runtime] = reason
        self.pools[runtime].size = 0
        return RuntimeUnavailable(unavailable_message(runtime, reason))

    def release(self, sandbox: Sandbox) -> None:
        self.pools[sandbox.runtime].release(sandbox)

    def pool_stats(self) -> dict[str, dict[str, int]]:
        return {name: pool.stats() for name, pool in self.pools.items()}

    def shed_idle(self) -> int:
        shed = sum(pool.shed_idle() for pool in self.pools.values())
        if shed:
            logger.warning(f"{self.marker} removed {shed} idle sandboxes to free disk space")
        return shed

    def unavailable_runtimes(self) -> dict[str, str]:
        return dict(self.unavailable)

    def close_pools(self) -> None:
        for pool in self.pools.values():
            pool.close()


def unavailable_message(runtime: str, reason: str) -> str:
    """One line naming a runtime that cannot start here, and why."""
    return f"runtime {runtime!r} cannot start on this host: {reason}"
