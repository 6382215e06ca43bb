"""Idle sandboxes are frozen: no code of a function runs in its sandbox between its runs.

Import-warm puts a function's own code where it outlives a run: its modules in the python
fork server, its files in the node Worker that waits for the next call. What that code
leaves behind (a thread, a hook the server calls, a process it spawned, an unref'd interval)
would run with no run in flight: no timeout, no CPU limit. So a sandbox whose function has
code of its own besides its main script (``holds_code``) is frozen with the cgroup freezer
(v1 ``freezer.state``, v2 ``cgroup.freeze``) once its run is over, and thawed when its next
run starts: whatever is in it stops where it is and goes on only while a run of its function
lasts, within that run's limits. A main script alone is never preloaded, and what the
standard library's modules do at import is not the function's: such a sandbox holds nothing
of its function between runs and is left as it is. The freezer's files are on the host (a
process sandbox's own cgroup, a container's as Docker made it): a write takes microseconds,
where ``docker pause`` goes through the engine in tens of milliseconds.

A python sandbox is frozen as soon as its run's reply is in, or, after a first run whose
imports its server preloads (off the call's path, once the agent read the run's peak), once
the server gives its account of them: it takes no call before, so its sandbox settles
(stays off the board) until then, frozen or not. A node sandbox starts the next call's
Worker after the run, off the call's path, so it is frozen once its server says that Worker
is ready (frame 'W': booted, its files preloaded, within their 2 s budget). The runner's
watcher thread waits for either from the call's release, ``SETTLE_WAIT_S`` at most (a
preload bounds its own vetting; ``PRELOAD_WAIT_S``): a node sandbox is frozen then anyway
(the next call waits for the rest), a fork server that has not answered is given up.

Which freezer: a cgroup2 tree's wherever one is mounted, v1's freezer hierarchy only without
one (``freezer_of``). A process frozen by v1 does not die of SIGKILL until it is thawed, so
there the agent kills and thaws what it removes, ``thaw_guard`` does it for a worker that
died (the sandboxes' death signal cannot), and ``anchor`` keeps v1's freezing cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from nanogrid.common.errors import SandboxError

from .base import Sandbox
from .forkclient import PRELOAD_WAIT_S
from .memory import CGROUP_ROOT
from .sandboxclient import SandboxClient

SETTLE_WAIT_S = 3.0
"""How long a node sandbox may take after its run to say its next Worker is ready."""
ANCHOR = "frozen-anchor"


class Freezer:
    """The freezer of one cgroup directory."""

    def __init__(self, directory: Path, v2: bool) -> None:
        self.directory = directory
        self.v2 = v2
        name, self._frozen, self._thawed = (
            ("cgroup.freeze", b"1", b"0") if v2 else ("freezer.state", b"FROZEN", b"THAWED")
        )
        self._path = str(directory / name)
        self._fd = -1

    def freeze(self) -> None:
        """Stop every process in the cgroup (it takes effect as each one is next scheduled)."""
        self._write(self._frozen)

    def thaw(self) -> None:
        self._write(self._thawed)

    def exists(self) -> bool:
        return os.path.exists(self._path)

    def pids(self) -> list[int]:
        try:
            return [int(pid) for pid in (self.directory / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _write(self, value: bytes) -> None:
        if self._fd < 0:  # kept open: written twice a run
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CLOEXEC)
        os.pwrite(self._fd, value, 0)


def freezer_of(paths: dict[str, str]) -> tuple[Path, bool] | None:
    """Where the freezer of a process's cgroup is, and whether it is v2's (``paths``: as
    /proc/PID/cgroup lists them, controller -> path, "" for v2). In a cgroup2 tree where one
    is mounted (a v2 host's, or a hybrid host's unified one): a frozen v2 process still dies
    of SIGKILL, so a sandbox still dies with its worker (its death signal) and systemd can
    still end a unit's leftovers; else in v1's freezer hierarchy."""
    for root in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
        if "" in paths and (root / "cgroup.controllers").exists():
            return root / paths[""].lstrip("/"), True
    if "freezer" in paths and (CGROUP_ROOT / "freezer" / "cgroup.procs").exists():
        return CGROUP_ROOT / "freezer" / paths["freezer"].lstrip("/"), False
    return None


CODE_SUFFIXES = frozenset({".py", ".pyc", ".pyw", ".so", ".js", ".cjs", ".mjs", ".node"})


def holds_code(code_dir: Path, main: str) -> bool:
    """Whether a function has code of its own besides its main script ``main``, which its
    sandbox may hold between runs once preloaded: a directory (a package, node_modules), or
    a file python or node loads code from."""
    try:
        entries = list(os.scandir(code_dir))
    except OSError:
        return True
    return any(
        entry.name != main and (entry.is_dir() or Path(entry.name).suffix in CODE_SUFFIXES)
        for entry in entries
    )


THAW_GUARD = """import os, signal, sys
os.read(0, 1)  # returns once the worker that started it is gone: the pipe's only writer
try:
    names = os.listdir(sys.argv[1])
except OSError:
    names = []
for name in names:
    directory = os.path.join(sys.argv[1], name)
    try:
        with open(os.path.join(directory, "cgroup.procs")) as procs:
            for pid in procs.read().split():
                os.kill(int(pid), signal.SIGKILL)
        with open(os.path.join(directory, "freezer.state"), "w") as state:
            state.write("THAWED")
    except OSError:
        pass
"""


def thaw_guard(base: Path) -> subprocess.Popen:
    """cgroup v1: a process that outlives the worker calling this only to end the sandboxes
    it left frozen below ``base``. A v1-frozen process does not die of SIGKILL, nor of the
    death signal that ends a sandbox with its worker, until it is thawed; the guard, in a
    session of its own, kills and thaws them once the worker is gone (its stdin's end)."""
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", THAW_GUARD, str(base)],
        stdin=subprocess.PIPE,
        start_new_session=True,
    )


def anchor(parent: Path) -> None:
    """cgroup v1: keep an empty cgroup frozen in ``parent`` (made once, left in place).

    The v1 freezer turns a kernel-wide static key on when a cgroup starts freezing and off
    when the last one thaws, patching kernel text each time. With no other cgroup of the host
    frozen, a sandbox frozen after each run and thawed before the next switched it twice a
    run: ~130 us a write, 318 us of the agent's CPU per run, against 3-6 us and 40 us with
    the key held on by an empty frozen cgroup, as a host's paused containers hold it
    (bench/bench_freezer.py)."""
    directory = parent / ANCHOR
    with contextlib.suppress(OSError):  # without it freezing only costs more
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "freezer.state").write_text("FROZEN")


@dataclass(frozen=True)
class _Settling:
    sandbox: Sandbox
    freezer: Freezer
    client: SandboxClient
    fd: int
    """The client's socket, taken while it is open."""
    freeze: bool
    """Its function holds code of its own: frozen once settled."""
    deadline: float = 0.0


class IdleFreezer:
    """Freezes one runner's sandboxes between their runs (see the module docstring).

    Whether a sandbox is frozen is on the sandbox (``frozen``), and with it on the host's
    board when the sandbox goes back there: its next run thaws it, whichever worker's it is.
    A sandbox whose server says later that it is ready is ``settling`` until then: the
    runner keeps it off the board, and ``on_settled`` gives it back once it is ready (and
    frozen, if it is to be)."""

    def __init__(self, on_settled: Callable[[Sandbox], None] = lambda sandbox: None) -> None:
        self._on_settled = on_settled
        self._lock = threading.Lock()
        self._resting: dict[int, _Settling] = {}
        """Sandboxes (by id) whose run asked them to settle, until their call releases them
        (``settle``) or runs them again (``resume``)."""
        self._settling: dict[int, _Settling] = {}
        """Released sandboxes (by id) the watcher waits on."""
        self._holds: dict[int, tuple[str | None, bool]] = {}
        """Per sandbox: the code_key it was told of, and whether that function holds code."""
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._closed = False

    def rest(
        self, sandbox: Sandbox, freezer: Freezer, client: SandboxClient, main: str
    ) -> bool:
        """After a run of ``main``: freeze ``sandbox`` if its function holds code of its own
        (else leave it), now, or once its server says it is ready; a sandbox whose server
        takes no call before then (``busy_until_ready``) waits for it in any case. Such a
        sandbox is ``settling`` from now on, watched from its release (``settle``). False
        when it cannot be frozen (its cgroup is gone): it must not be kept."""
        held = self._holds.get(id(sandbox))
        if held is None or held[0] != sandbox.code_key:
            held = self._holds[id(sandbox)] = (
                sandbox.code_key, holds_code(sandbox.code_dir, main)
            )
        if not held[1] and not client.busy_until_ready:
            return True
        if client.ready_at_reply:
            try:
                freezer.freeze()
            except OSError as exc:
                logger.warning(f"cannot freeze sandbox {freezer.directory.name}: {exc}")
                return False
            sandbox.frozen = True
            return True
        with self._lock:
            sandbox.settling = True
            self._resting[id(sandbox)] = _Settling(
                sandbox, freezer, client, client.fileno(), freeze=held[1]
            )
        return True

    def settle(self, sandbox: Sandbox) -> None:
        """The call in ``sandbox`` is over: the watcher waits for its server's word (from now
        on, ``SETTLE_WAIT_S`` at most, a preload's ``PRELOAD_WAIT_S``), then calls
        ``on_settled``."""
        with self._lock:
            entry = self._resting.pop(id(sandbox), None)
            if entry is None:
                return
            wait_s = PRELOAD_WAIT_S if entry.client.busy_until_ready else SETTLE_WAIT_S
            self._settling[id(sandbox)] = dataclasses.replace(
                entry, deadline=time.monotonic() + wait_s
            )
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="freezer", daemon=True)
                self._thread.start()
        self._poke()

    def resume(self, sandbox: Sandbox) -> None:
        """``sandbox`` runs again before its release: no settling (its client takes what its
        server says on the way)."""
        if sandbox.settling:
            with self._lock:
                if self._resting.pop(id(sandbox), None) is not None:
                    sandbox.settling = False

    def wake(self, sandbox: Sandbox, freezer: Freezer) -> None:
        """As a run's request is sent: thaw ``sandbox`` if it was left frozen (its server
        wakes to the request, while this thread may wait for the interpreter lock, which a
        longer syscall hands to another thread)."""
        if sandbox.frozen:
            sandbox.frozen = False
            try:
                freezer.thaw()
            except OSError as exc:
                raise SandboxError(f"cannot thaw the sandbox: {exc}") from None

    def forget(self, sandbox: Sandbox) -> None:
        """Before ``sandbox`` is destroyed (its client closed): stop waiting on it."""
        with self._lock:
            self._resting.pop(id(sandbox), None)
            self._settling.pop(id(sandbox), None)
            self._holds.pop(id(sandbox), None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        self._poke()
        if thread is not None:
            thread.join(timeout=5)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _poke(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: it wakes up anyway
            os.write(self._wake_w, b"\0")

    def _watch(self) -> None:
        """The watcher: wait for a settling sandbox's word or deadline, then freeze it (if it
        is to be) and give it back."""
        while True:
            with self._lock:
                if self._closed:
                    return
                settling = dict(self._settling)
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            for entry in settling.values():
                poller.register(entry.fd, select.POLLIN)
            deadline = min((entry.deadline for entry in settling.values()), default=None)
            wait = None if deadline is None else max(0, (deadline - time.monotonic()) * 1000)
            ready = {fd for fd, _ in poller.poll(wait)}
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
            now = time.monotonic()
            settled: list[_Settling] = []
            with self._lock:
                for key, entry in settling.items():
                    if self._settling.get(key) is not entry:
                        continue  # it was destroyed
                    said = entry.fd in ready
                    if not said and now < entry.deadline:
                        continue
                    del self._settling[key]
                    settled.append(entry)
                    answered = entry.client.take_ready() if said else (
                        not entry.client.busy_until_ready
                    )
                    if not answered:  # broke, or never did: its next call would wait
                        entry.sandbox.healthy = False
                    elif entry.freeze:
                        with contextlib.suppress(OSError):  # gone: nothing left to freeze
                            entry.freezer.freeze()
                            entry.sandbox.frozen = True
            for entry in settled:  # back to the board, outside the lock
                entry.sandbox.settling = False
                self._on_settled(entry.sandbox)
