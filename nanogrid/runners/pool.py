"""One worker's pool of sandboxes for one runtime, whose idle ones are the host's.

Every idle sandbox of the host is on one board (lending.py), whichever worker made it: a
call takes, in order, an idle sandbox that already ran its function@version (on any worker),
else one of this worker's that did and is getting its server's next call ready (node; waited
for briefly, by one call each), else a generic one (any worker's), else it orders a new one
from its own pool and takes whichever comes first: its new sandbox, or one that becomes idle
meanwhile (the new one then goes to the board for the next call, or is not made if not begun
yet). A worker makes and destroys only its own sandboxes (they die with it); it lends them,
and borrows others', for one call at a time. A call connects to its sandbox's server for its
run and disconnects after (a server serves one connection at a time), so the next taker may
be any worker.

The pool makes a sandbox for a call that found none idle: at most ``max_making`` at once, a
few at a time coming out one after another to serve a burst early, where many at once would
all come out late (a Docker engine shares 2 cores among them); it follows the load up to
``limit`` sandboxes of its own (idle, taken and being made). Everything else it does in the
background (poolkeeper.py): keeping ``size`` (its share of the runtime's ``warm``) of its
sandboxes generic and idle, expiry, the host's idle bound, destroying what is doomed.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from loguru import logger

from nanogrid.common.errors import SandboxError

from .base import Sandbox, SandboxMaker
from .lending import IDLE, TAKEN, Entry, SandboxBoard, Ticket
from .poolkeeper import PoolKeeper

_WAIT_S = 0.01
"""While a call waits for its new sandbox, it looks at the board this often (another worker
may give one back)."""
_SETTLING_WAIT_S = 0.25
"""How long a call waits for this worker's sandbox that ran its function last and is getting
its server's next call ready (node: its next Worker, the function's imports preloaded), before
it starts the function anew in a generic sandbox instead."""
_LENT_BACK_S = 10.0
"""How long a closing pool waits for its sandboxes other workers' calls have."""


class WarmPool:
    def __init__(
        self,
        runtime: str,
        size: int,
        maker: SandboxMaker,
        board: SandboxBoard,
        slot: int,
        *,
        idle_expiry_s: float,
        marker: str = "[POOL]",
        limit: int | None = None,
        max_making: int | None = None,
        idle_bound: tuple[int, int] | None = None,
    ) -> None:
        self.runtime = runtime
        self.size = size
        self.limit = max(size, limit or 0, 1)
        self.board = board
        self.slot = slot
        self.maker = maker
        self.marker = marker
        self._mine: dict[tuple[int, int], Sandbox] = {}
        """This worker's sandboxes on the board (idle, or taken by a call), by record and its
        generation: a record freed by one thread may hold another's new sandbox before the
        first forgets the old one."""
        self.making = 0
        """Sandboxes being made (for calls, and ahead of them), under ``lock``."""
        self._settle_waits: dict[str, int] = {}
        """Calls waiting for a settling sandbox, by the code key they wait for."""
        self._views: dict[tuple[int, int], Sandbox] = {}
        """Other workers' sandboxes as this worker's calls run in them, by record."""
        self.lock = threading.Condition()
        self.closed = False
        # Long-lived threads: a process sandbox dies with the thread that started it
        # (PR_SET_PDEATHSIG follows the parent thread), so none may be made on a passing one.
        making = max_making or self.limit
        self._makers = ThreadPoolExecutor(making, thread_name_prefix=f"pool-{runtime}-make")
        """Makes the sandboxes calls wait for."""
        self._keeper = PoolKeeper(
            self, idle_expiry_s=idle_expiry_s, idle_bound=idle_bound,
            max_fills=max(1, making // 2),
        )

    # -- a call's side ------------------------------------------------------------------------

    def acquire(self, code_key: str) -> Sandbox:
        """A sandbox for ``code_key``, attached for one call."""
        sandbox = self._settled(code_key) or self._take(code_key)
        if sandbox is not None:
            return sandbox
        with self.lock:
            evict = self._count() >= self.limit
            self.making += 1
            self._keeper.missed()
            order = _Order()
        if evict:
            self._evict_one()
        self._makers.submit(self._make, order)
        while True:
            with self.lock:
                if order.sandbox is None and order.error is None:
                    self.lock.wait(_WAIT_S)
                if order.sandbox is not None:
                    order.sandbox.cold_start = True
                    self.maker.attach(order.sandbox)
                    return order.sandbox
                if order.error is not None:
                    raise order.error
            sandbox = self._take(code_key)
            if sandbox is not None:  # idle meanwhile: the order goes to the board
                with self.lock:
                    order.abandoned = True
                    made = order.sandbox
                if made is not None:  # made just now: it is this call's after all
                    self.release(sandbox)
                    made.cold_start = True
                    self.maker.attach(made)
                    return made
                # A generic one was made since this call missed (a filler's): the call waited
                # for it to be made, a cold start; one of its function's given back is warm.
                sandbox.cold_start = sandbox.code_key is None
                return sandbox

    def release(self, sandbox: Sandbox) -> None:
        """The call is over: the sandbox goes back to the board (doomed when unhealthy), or,
        while its server gets its next call ready, once the freezer says it is (``settled``)."""
        if sandbox.settling and sandbox.healthy:
            return
        self.settled(sandbox)

    def settled(self, sandbox: Sandbox) -> None:
        """Give ``sandbox`` back to the board (once: a release and a settle may both come)."""
        with self.lock:
            ticket, sandbox.ticket = sandbox.ticket, None
        if ticket is None:
            return
        self.maker.detach(sandbox)
        self.give_back(sandbox, ticket, healthy=sandbox.healthy and not self.closed)

    def _settled(self, code_key: str) -> Sandbox | None:
        """This worker's sandbox that ran ``code_key`` last, once it settles: when one is
        settling that no other call waits for, waited for up to ``_SETTLING_WAIT_S`` (its
        server preloads the function there; a generic sandbox would start it anew). None
        when there is none, or it did not settle in time."""
        with self.lock:
            settling = sum(
                s.settling and s.healthy and s.code_key == code_key
                for s in [*self._mine.values(), *self._views.values()]
            )
            if settling <= self._settle_waits.get(code_key, 0):
                return None
            self._settle_waits[code_key] = self._settle_waits.get(code_key, 0) + 1
        deadline = time.monotonic() + _SETTLING_WAIT_S
        try:
            while (sandbox := self._take(code_key, generic=False)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                with self.lock:  # a give-back wakes it; the poll covers one just before
                    self.lock.wait(min(_WAIT_S, remaining))
            return sandbox
        finally:
            with self.lock:
                self._settle_waits[code_key] -= 1
                if not self._settle_waits[code_key]:
                    del self._settle_waits[code_key]

    def _take(self, code_key: str, *, generic: bool = True) -> Sandbox | None:
        """An idle sandbox of the host for ``code_key`` (or a generic one), attached; None
        when none is idle."""
        while (found := self.board.take(self.runtime, code_key, self.slot, generic=generic)
               ) is not None:
            ticket, held = found
            sandbox = self._sandbox_of(ticket)
            if sandbox is None:  # this worker's, but not known to it (a restart's leftover)
                self.board.give_back(ticket, held, healthy=False)
                continue
            sandbox.ticket = ticket
            sandbox.code_key = held
            sandbox.cold_start = False
            sandbox.frozen = ticket.frozen
            sandbox.limit_mb = ticket.limit_mb
            try:
                self.maker.attach(sandbox)
            except SandboxError as exc:  # gone (its owner died, or it broke while idle)
                logger.debug(f"{self.marker} idle sandbox {sandbox.name} is gone: {exc}")
                self.board.give_back(ticket, held, healthy=False)
                continue
            return sandbox
        return None

    def _sandbox_of(self, ticket: Ticket) -> Sandbox | None:
        key = (ticket.index, ticket.generation)
        if ticket.owner == self.slot:
            return self._mine.get(key)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self.maker.borrow(self.runtime, ticket.descriptor)
            view.borrowed = True
            if len(self._views) > 4 * self.limit:  # forget the oldest views
                for stale in list(self._views)[: len(self._views) // 2]:
                    del self._views[stale]
        return view

    def give_back(self, sandbox: Sandbox, ticket: Ticket, *, healthy: bool,
                  shrunk: bool = False, idle_since_ns: int | None = None) -> None:
        """``sandbox`` is idle again under ``ticket``, or doomed and destroyed. A call's give
        it back; the keeper's upkeep (``SandboxBoard.hold``) keeps its ``idle_since_ns`` and
        says whether it is ``shrunk``."""
        mine = not sandbox.borrowed
        if healthy:
            self.board.give_back(
                ticket, sandbox.code_key, healthy=True, frozen=sandbox.frozen,
                memory_bytes=self._idle_bytes(sandbox), limit_mb=sandbox.limit_mb,
                descriptor=self.maker.describe(sandbox) if mine else None,
                shrunk=shrunk, idle_since_ns=idle_since_ns,
            )
            with self.lock:
                self.lock.notify_all()
            return
        if mine:
            self.board.give_back(ticket, sandbox.code_key, healthy=False)
            self.destroy_doomed(ticket.index, ticket.generation)
        else:
            self.board.give_back(ticket, sandbox.code_key, healthy=False)
            self._views.pop((ticket.index, ticket.generation), None)
        self._keeper.wake()

    # -- making -------------------------------------------------------------------------------

    def _make(self, order: _Order) -> None:
        """Background: make the sandbox ``order`` asked for (a few at a time): its call's, or
        the board's when the call took another meanwhile (not made if not begun by then)."""
        sandbox: Sandbox | None = None
        error: BaseException | None = None
        if not self.closed and not order.abandoned:
            try:
                sandbox = self.maker.create(self.runtime)
            except BaseException as exc:  # delivered to the call that ordered it
                error = exc
        doomed: Sandbox | None = None
        with self.lock:
            self.making -= 1
            if sandbox is not None:
                if self.closed:
                    doomed = sandbox
                elif self.put(sandbox, taken=not order.abandoned) is None:
                    doomed, error = sandbox, SandboxError("the host's sandbox board is full")
                elif not order.abandoned:
                    order.sandbox = sandbox
            if order.sandbox is None and not order.abandoned:
                order.error = error or SandboxError(f"the {self.runtime} pool is closing")
            elif error is not None and not self.closed:
                logger.warning(f"{self.marker} could not make a {self.runtime} sandbox: {error}")
            self.lock.notify_all()
        if doomed is not None:
            self.safe_destroy(doomed)
        self._keeper.wake()

    def put(self, sandbox: Sandbox, *, taken: bool) -> Ticket | None:
        """Under the lock: put a new sandbox of this worker on the board."""
        ticket = self.board.put(
            self.slot, self.runtime, sandbox.code_key, self.maker.describe(sandbox),
            self._idle_bytes(sandbox), sandbox.limit_mb, taken=taken,
        )
        if ticket is not None:
            sandbox.ticket = ticket if taken else None  # a call's: it holds its ticket
            self._mine[ticket.index, ticket.generation] = sandbox
        return ticket

    def _idle_bytes(self, sandbox: Sandbox) -> int:
        try:
            return self.maker.idle_bytes(sandbox)
        except OSError:
            return 0

    # -- the keeper's side (poolkeeper.py) ----------------------------------------------------

    def owned(self) -> list[Entry]:
        """The records of this pool's own sandboxes."""
        return [e for e in self.board.owned(self.slot) if e.runtime == self.runtime]

    def own(self, entry: Entry) -> Sandbox | None:
        """This worker's sandbox of record ``entry`` (None: not known here)."""
        return self._mine.get((entry.index, entry.generation))

    def room(self) -> int:
        """Under ``lock``: how many more sandboxes this pool may make."""
        return self.limit - self._count()

    def withdraw(self, entry: Entry) -> Sandbox | None:
        """Take this worker's idle sandbox off the board (to destroy or pause it); None when
        a call took it meanwhile, or it is not known here (a record of its predecessor)."""
        if not self.board.withdraw(entry):
            return None
        return self._mine.pop((entry.index, entry.generation), None)

    def destroy_doomed(self, index: int, generation: int) -> None:
        """Destroy this worker's doomed sandbox of record ``index`` (its record is freed)."""
        if self.board.clear_doomed(self.slot, index, generation):
            sandbox = self._mine.pop((index, generation), None)
            if sandbox is not None:
                self.safe_destroy(sandbox)

    def safe_destroy(self, sandbox: Sandbox) -> None:
        try:
            self.maker.destroy(sandbox)
        except Exception as exc:  # noqa: BLE001 - logged; a leftover is swept at the next start
            logger.warning(f"{self.marker} could not remove sandbox {sandbox.name}: {exc}")

    # -- the worker's side ------------------------------------------------------------------

    def shed_idle(self) -> int:
        """Destroy this worker's idle sandboxes that hold a function's code (the disk runs
        short: their unpacked code goes with them); generic ones stay. How many went."""
        shed = 0
        for entry in self.owned():
            if entry.state == IDLE and entry.code_key and (sandbox := self.withdraw(entry)):
                self.safe_destroy(sandbox)
                shed += 1
        return shed

    def stats(self) -> dict[str, int]:
        """This worker's own sandboxes: ``warm`` (idle) and ``busy`` (taken by a call)."""
        own = self.owned()
        return {"warm": sum(e.state == IDLE for e in own),
                "busy": sum(e.state == TAKEN for e in own)}

    def close(self) -> None:
        """Destroy every sandbox of this worker, once other workers' calls gave them back
        (for a while: past it, their calls lose them)."""
        with self.lock:
            self.closed = True
            self.lock.notify_all()
        # What is being made goes to its call or is removed, before the runner tears down
        # what sandboxes stand on; what is not begun yet is not made.
        self._keeper.close()
        self._makers.shutdown(wait=True)
        deadline = time.monotonic() + _LENT_BACK_S
        while True:  # idle ones off the board first: no other call may take them now
            own = self.owned()
            idle = [e for e in own if e.state == IDLE]
            for entry in idle:  # one another call took meanwhile shows as lent next time
                if (sandbox := self.withdraw(entry)) is not None:
                    self.safe_destroy(sandbox)
            lent = [e for e in own if e.state == TAKEN and self._lent(e)]
            if not (idle or lent) or time.monotonic() >= deadline:
                break
            if not idle:
                time.sleep(0.05)
        for entry in self.owned():
            self.board.doom(entry)
            self.destroy_doomed(entry.index, entry.generation)
        for sandbox in list(self._mine.values()):
            self.safe_destroy(sandbox)
        self._mine.clear()

    def _lent(self, entry: Entry) -> bool:
        """Whether this worker's taken sandbox is another worker's call's (its own calls
        hold the ticket on the sandbox itself)."""
        sandbox = self.own(entry)
        return sandbox is not None and sandbox.ticket is None and not entry.taker_gone

    def _evict_one(self) -> None:
        """At ``limit``: destroy this worker's least recently used idle sandbox."""
        idle = [e for e in self.owned() if e.state == IDLE]
        for entry in sorted(idle, key=lambda e: e.idle_since_ns):
            if (sandbox := self.withdraw(entry)) is not None:
                self.safe_destroy(sandbox)
                return

    def _count(self) -> int:
        return len(self._mine) + self.making


class _Order:
    """A sandbox one acquire asked to be made."""

    def __init__(self) -> None:
        self.sandbox: Sandbox | None = None
        self.error: BaseException | None = None
        self.abandoned = False
        """Its call took another sandbox meanwhile; the new one goes to the board."""


def warm_share(warm: int, workers: int, index: int) -> int:
    """This worker's slice of a runtime's warm pool size, split evenly across workers."""
    return warm // workers + (1 if index < warm % workers else 0)
