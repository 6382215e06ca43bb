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
from collections.abc import Mapping
from typing import Any

from loguru import logger

from nanogrid.common.config import AUTO, Config, MiB
from nanogrid.common.errors import RuntimeUnavailable, SandboxError, SandboxLost

from .base import Invocation, Runner, RunOutcome, Sandbox, server_oom_outcome
from .freezer import Freezer, IdleFreezer
from .launch import Launch
from .lending import SandboxBoard
from .pool import WarmPool, warm_share
from .sandbox_server import log_preload, preload_key
from .sandboxclient import RawRun
from .serversandbox import Meter, ServerSandbox

ATTACH_TIMEOUT_S = 1.0
"""How long a call waits for an idle sandbox's server to take its connection."""
OWNER_EXIT_S = 2.0
"""How long a lent sandbox's owner may take to show as gone after the sandbox died."""
SHRINK_WAIT_S = 5.0
"""How long an idle sandbox's server may take to drop its Worker (``shrink``)."""
PRIME_MEMORY_MB = 128
"""The memory limit of a sandbox's first, empty run (``prime``); a call sets its own."""
PRIME_TIMEOUT_MS = 10_000
OOM_COUNT_GRACE_S = 0.2
"""How long a run that was killed, with no OOM kill counted yet, waits for the count: the
kernel sends the OOM kill before it counts it, so the sandbox's server may reap the run and
reply, or die itself and close its socket, before the cgroup says why."""


class PooledRunner(Runner):
    """A runner whose sandboxes come from one WarmPool per runtime (``self.pools``)."""

    pools: dict[str, WarmPool]
    board: SandboxBoard
    """The host's sandboxes (lending.py): idle ones any worker's call may take."""
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
    primed = False
    """Whether a python sandbox made ahead of calls is primed (``prime``): its server is
    forked from a template, whose pages its first run copies."""

    # -- the run ------------------------------------------------------------------------------

    def run(self, sandbox: Sandbox, invocation: Invocation) -> RunOutcome:
        assert isinstance(sandbox, ServerSandbox) and sandbox.client is not None
        launch = self.launches[sandbox.runtime]
        self.idle.resume(sandbox)
        try:
            meter = self.limit(sandbox, invocation)
        except self.limit_errors as exc:
            sandbox.healthy = False
            raise SandboxError(f"cannot set the sandbox's limits: {self.explain(exc)}") from None
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
        except SandboxError as exc:
            sandbox.healthy = False
            peak, oom_kills = self._read(sandbox, meter, killed=True)
            if not oom_kills and self.died_of_oom(sandbox):
                oom_kills = 1
            if not oom_kills and self.lost(sandbox):
                raise SandboxLost(f"the worker that lent sandbox {sandbox.name} died during "
                                  f"the run ({exc})") from None
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
        log_preload(self.marker, sandbox, raw.preload)
        killed = exit_code == -signal.SIGKILL and not raw.timed_out
        peak, oom_kills = self._read(sandbox, meter, killed=killed)
        oom = killed and oom_kills > 0 if meter.memory else self.oom_without_cgroup(
            exit_code, raw
        )
        healthy = sandbox.healthy and not (raw.timed_out or oom or oom_kills)
        if healthy:
            healthy = self.leftovers(sandbox, launch)
        if healthy:
            sandbox.client.arm()
        if healthy and freezer and preload is not None and launch.script is not None:
            healthy = self.idle.rest(sandbox, freezer, sandbox.client, launch.script)
        sandbox.healthy = healthy
        if peak is None or meter.memory is None:  # no cgroup, or v2 without a resettable peak
            return raw.outcome(exit_code=exit_code, oom_killed=oom, peak=raw.maxrss_bytes,
                               source="rusage")
        return raw.outcome(exit_code=exit_code, oom_killed=oom, peak=peak,
                           source=meter.memory.source)

    def prime(self, sandbox: Sandbox) -> None:
        """Run one empty script in a sandbox made ahead of calls, before it goes to the board
        (``primed`` runners, python runtimes: a fork server runs the script). A server forked
        from a template runs its first run slower than the next ones: it copies the pages it
        shares with the template (~330 more page faults; a hello's run 4.8 ms against 1.6
        after), and that first run is then not a call's. (A container's server is not forked
        from one: its first call's run was as fast primed or not, 6.7 against 6.9 ms p50.)
        SandboxError when the sandbox cannot run it."""
        launch = self.launches[sandbox.runtime]
        if not self.primed or not launch.python or launch.script is None:
            return
        script = sandbox.code_dir / launch.script
        invocation = Invocation(
            "prime", "", launch.argv, b"", PRIME_MEMORY_MB, PRIME_TIMEOUT_MS, 4096,
            self.config.limits.max_pids,
        )
        self.attach(sandbox)
        try:
            script.write_bytes(b"")
            script.chmod(0o644)
            outcome = self.run(sandbox, invocation)
        except OSError as exc:
            raise SandboxError(f"cannot prime the sandbox: {exc}") from None
        finally:
            self.detach(sandbox)
            script.unlink(missing_ok=True)
        if outcome.exit_code != 0 or not sandbox.healthy:
            raise SandboxError(
                f"the sandbox's empty first run failed (exit code {outcome.exit_code}): "
                f"{outcome.stderr.decode(errors='replace').strip()[-200:]}"
            )

    def lost(self, sandbox: Sandbox) -> bool:
        """Whether a borrowed sandbox failed because its owner died (or took it back). A
        sandbox dies while its owner exits, before the owner shows as gone in /proc: the
        owner is given ``OWNER_EXIT_S`` to show it."""
        ticket = sandbox.ticket
        if not sandbox.borrowed or ticket is None:
            return False
        deadline = time.monotonic() + OWNER_EXIT_S
        while not ticket.owner_gone:
            if not self.board.holds(ticket):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    @staticmethod
    def _read(sandbox: Sandbox, meter: Meter, *, killed: bool) -> tuple[int | None, int]:
        """The run's cgroup peak (None when unknown) and the OOM kills during the run; for a
        run that was ``killed``, OOM kills counted within ``OOM_COUNT_GRACE_S``."""
        if meter.memory is None:
            return None, 0
        deadline = time.monotonic() + (OOM_COUNT_GRACE_S if killed else 0.0)
        while True:
            try:
                peak, oom_kills = meter.memory.peak_bytes(), meter.memory.oom_kills()
            except OSError:  # the sandbox went away under the run
                sandbox.healthy = False
                return None, 0
            if oom_kills > meter.oom_before or time.monotonic() >= deadline:
                return peak, oom_kills - meter.oom_before
            time.sleep(0.005)

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

    def died_of_oom(self, sandbox: ServerSandbox) -> bool:
        """Whether a sandbox whose server died during a run, and whose cgroup counted no OOM
        kill (or was gone before it could be read), was killed for its memory all the same,
        as something else that watched it recorded."""
        return False

    def freezer(self, sandbox: ServerSandbox) -> Freezer | None:
        """The sandbox's freezer, when it can be frozen between its runs."""
        return None

    def explain(self, exc: BaseException) -> str:
        """One line for people from an error of this runner's peers."""
        return str(exc)

    def create(self, runtime: str) -> Sandbox:
        """A new generic sandbox of ``runtime`` (called by the pool)."""
        raise NotImplementedError

    def destroy(self, sandbox: Sandbox) -> None:
        """Remove a sandbox for good (called by the pool)."""
        raise NotImplementedError

    def describe(self, sandbox: Sandbox) -> dict[str, Any]:
        """What another worker needs to run in ``sandbox`` (base.py's SandboxMaker)."""
        raise NotImplementedError

    def borrow(self, runtime: str, descriptor: dict[str, Any]) -> Sandbox:
        """Another worker's sandbox, from its ``describe``."""
        raise NotImplementedError

    def attach(self, sandbox: Sandbox) -> None:
        """Connect to the sandbox's server for one call; SandboxError when it is gone."""
        assert isinstance(sandbox, ServerSandbox)
        if sandbox.client is None:
            server = self.launches[sandbox.runtime].server
            sandbox.client = server.connect(self.socket_path(sandbox), ATTACH_TIMEOUT_S)

    def detach(self, sandbox: Sandbox) -> None:
        """The call is over: disconnect, so the next taker (any worker) can connect."""
        assert isinstance(sandbox, ServerSandbox)
        if sandbox.client is not None:
            sandbox.client.close()
            sandbox.client = None
        if sandbox.borrowed and sandbox.cgroup is not None:  # its files, open for the call
            sandbox.cgroup.memory.close()
            if sandbox.cgroup.freezer is not None:
                sandbox.cgroup.freezer.close()

    def socket_path(self, sandbox: Sandbox) -> str:
        """Where the sandbox's server listens."""
        raise NotImplementedError

    def idle_bytes(self, sandbox: Sandbox) -> int:
        """The sandbox's memory now (0 when unknown)."""
        assert isinstance(sandbox, ServerSandbox)
        return sandbox.cgroup.memory.current_bytes() if sandbox.cgroup is not None else 0

    def pausable(self, sandbox: Sandbox, idle_s: float) -> bool:
        """Whether to pause the idle ``sandbox`` now: no runner but Docker without a freezer."""
        return False

    def pause(self, sandbox: Sandbox) -> None:
        raise NotImplementedError

    def shrinkable(self, sandbox: Sandbox, idle_s: float) -> bool:
        """A node sandbox idle ``pool.node_worker_idle_seconds`` (the keeper asks only of
        those that hold a function's code, as the board says: another worker's call may have
        given it one)."""
        after = self.config.pool.node_worker_idle_seconds
        return after > 0 and idle_s >= after and self.launches[sandbox.runtime].server.keeps_worker

    def shrink(self, sandbox: Sandbox) -> bool:
        """Thawed for a moment if frozen: its server ends the Worker it keeps for the next
        call, then it is frozen again. (Code of the function's that Worker held may run in that
        moment, as while it preloaded; it ends with the Worker.)"""
        assert isinstance(sandbox, ServerSandbox)
        freezer = self.freezer(sandbox)
        frozen = sandbox.frozen
        try:
            self.attach(sandbox)
            assert sandbox.client is not None
            if freezer is not None:
                self.idle.wake(sandbox, freezer)
            if not sandbox.client.shrink(SHRINK_WAIT_S):
                return False
            if frozen and freezer is not None:
                freezer.freeze()
                sandbox.frozen = True
            return True
        except (SandboxError, OSError) as exc:
            logger.debug(f"{self.marker} cannot shrink idle sandbox {sandbox.name}: {exc}")
            return False
        finally:
            self.detach(sandbox)

    # -- the pools ----------------------------------------------------------------------------

    def make_pools(
        self,
        config: Config,
        worker_index: int,
        board: SandboxBoard | None,
        unavailable: Mapping[str, str] | None = None,
    ) -> None:
        """One pool per runtime that can start, keeping this worker's share of its ``warm``
        count generic and idle, growing on demand up to ``capacity.max_concurrent`` (what the
        host may run at once); their idle sandboxes are on the host's ``board`` (a board of
        its own for a worker alone)."""
        self.unavailable = dict(unavailable or {})
        self.board = board or SandboxBoard()
        self.pools = {
            name: WarmPool(
                name,
                warm_share(rt.warm, config.workers, worker_index),
                self,
                self.board,
                worker_index,
                idle_expiry_s=config.pool.idle_expiry_seconds,
                marker=self.marker,
                limit=config.capacity.max_concurrent,
                max_making=self.made_at_once,
                idle_bound=(config.pool.max_idle, config.pool.max_idle_mb * MiB)
                if config.pool.max_idle != AUTO else None,  # unresolved: a runner on its own
            )
            for name, rt in config.runtimes.items()
            if name not in self.unavailable
        }

    def settled(self, sandbox: Sandbox) -> None:
        """The freezer's: a sandbox whose server got its next call ready (and preloaded) is
        frozen now, if it is to be."""
        assert isinstance(sandbox, ServerSandbox)
        if sandbox.client is not None:
            log_preload(self.marker, sandbox, sandbox.client.preloaded)
        pool = self.pools.get(sandbox.runtime)
        if pool is not None:
            pool.settled(sandbox)

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
        if sandbox.healthy:
            self.idle.settle(sandbox)  # back once its server is ready, if it is settling
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
