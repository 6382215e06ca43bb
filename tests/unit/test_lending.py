"""SandboxBoard: the host's records of sandboxes, shared by forked workers."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest

from nanogrid.common.config import from_dict
from nanogrid.runners import lending
from nanogrid.runners.lending import DOOMED, IDLE, TAKEN, SandboxBoard, Ticket, alive
from nanogrid.supervisor.snapshot import sandbox_status


@pytest.fixture
def board() -> Iterator[SandboxBoard]:
    board = SandboxBoard()
    yield board
    board.close()


def put_idle(board: SandboxBoard, owner: int, key: str | None, memory: int = 0) -> None:
    assert board.put(owner, "python", key, {"name": f"{owner}-{key}"}, memory) is not None


def test_take_prefers_the_functions_own_then_generic_then_none(board: SandboxBoard) -> None:
    put_idle(board, 0, None)
    put_idle(board, 1, "f@1")
    found = board.take("python", "f@1", prefer=0)
    assert found is not None and found[1] == "f@1" and found[0].owner == 1
    found = board.take("python", "g@1", prefer=0)
    assert found is not None and found[1] is None  # the generic one
    assert board.take("python", "g@1", prefer=0) is None  # both taken now
    assert board.take("node", "f@1", prefer=0) is None


def test_take_prefers_the_callers_own_among_equals(board: SandboxBoard) -> None:
    put_idle(board, 1, None)
    put_idle(board, 0, None)
    put_idle(board, 1, None)
    found = board.take("python", "f@1", prefer=0)
    assert found is not None and found[0].owner == 0


def test_a_sandbox_is_never_taken_twice(board: SandboxBoard) -> None:
    put_idle(board, 0, "f@1")
    found = board.take("python", "f@1", prefer=0)
    assert found is not None and board.take("python", "f@1", prefer=0) is None
    ticket, key = found
    assert board.give_back(ticket, key, healthy=True)
    assert board.take("python", "f@1", prefer=0) is not None


def test_a_stale_give_back_is_ignored(board: SandboxBoard) -> None:
    put_idle(board, 3, "f@1")
    found = board.take("python", "f@1", prefer=0)
    assert found is not None
    assert board.clear(3) == 1  # its owner died
    put_idle(board, 4, "g@1")  # the record is reused
    assert not board.give_back(found[0], "f@1", healthy=True)
    assert [(e.owner, e.code_key, e.state) for e in board.entries()] == [(4, "g@1", IDLE)]


def test_an_unhealthy_give_back_dooms_it_for_its_owner(board: SandboxBoard) -> None:
    put_idle(board, 2, None)
    found = board.take("python", "f@1", prefer=0)
    assert found is not None
    board.give_back(found[0], "f@1", healthy=False)
    (entry,) = board.entries()
    assert entry.state == DOOMED and not board.clear_doomed(1, entry.index, entry.generation)
    assert not board.clear_doomed(2, entry.index, entry.generation + 1)  # another record's
    assert board.clear_doomed(2, entry.index, entry.generation) and board.entries() == []


def test_doom_beyond_takes_the_oldest_specialized_and_keeps_generic(board: SandboxBoard) -> None:
    put_idle(board, 0, None, memory=10)
    put_idle(board, 0, "a@1", memory=10)
    put_idle(board, 1, "b@1", memory=10)
    put_idle(board, 1, "c@1", memory=10)
    assert board.doom_beyond(3, 10**9) == 1
    doomed = [e.code_key for e in board.entries() if e.state == DOOMED]
    assert doomed == ["a@1"]
    assert board.doom_beyond(3, 15) == 2  # memory: all specialized go, the generic stays
    assert [e.code_key for e in board.entries() if e.state == IDLE] == [None]
    assert board.doom_beyond(0, 0) == 0  # generic ones are the runtimes' warm count


def test_a_taken_sandbox_is_not_doomed_by_the_bound(board: SandboxBoard) -> None:
    put_idle(board, 0, "a@1")
    put_idle(board, 0, "b@1")
    assert board.take("python", "a@1", prefer=0) is not None
    assert board.doom_beyond(0, 0) == 1
    assert {(e.code_key, e.state) for e in board.entries()} == {("a@1", TAKEN), ("b@1", DOOMED)}


def test_forked_workers_share_the_board(board: SandboxBoard) -> None:
    pid = os.fork()
    if pid == 0:
        child = board.reopened()
        child.put(5, "python", "f@1", {"socket": "/x"})
        os._exit(0)
    os.waitpid(pid, 0)
    (entry,) = board.entries()
    assert entry.owner == 5 and entry.owner_pid == pid and entry.code_key == "f@1"


def test_a_dead_owners_sandbox_is_not_taken(board: SandboxBoard) -> None:
    pid = os.fork()
    if pid == 0:
        board.reopened().put(5, "python", "f@1", {"socket": "/x"})
        os._exit(0)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    try:
        assert not alive(pid)
        assert board.take("python", "f@1", prefer=0) is None
        assert board.entries() == []
    finally:
        os.waitpid(pid, 0)
    assert alive(os.getpid())


def test_the_taker_is_noted(board: SandboxBoard) -> None:
    put_idle(board, 0, None)
    found = board.take("python", "f@1", prefer=0)
    assert found is not None
    (entry,) = board.entries()
    assert entry.taker_pid == os.getpid() and not entry.taker_gone
    assert board.holds(found[0])
    board.clear(0)
    assert not board.holds(found[0])


def test_an_upkeep_hold_keeps_the_idle_time_and_a_calls_give_back_clears_shrunk(
        board: SandboxBoard) -> None:
    put_idle(board, 0, "f@1", memory=20 << 20)
    before = board.entries()[0]
    ticket = board.hold(before)
    assert ticket is not None and board.hold(before) is None  # held: no one else has it
    assert board.take("python", "f@1", prefer=0) is None
    assert board.give_back(ticket, "f@1", healthy=True, memory_bytes=12 << 20, shrunk=True,
                           idle_since_ns=before.idle_since_ns)
    after = board.entries()[0]
    assert (after.state, after.shrunk, after.memory_bytes, after.idle_since_ns) == (
        IDLE, True, 12 << 20, before.idle_since_ns)
    pools, host = sandbox_status(board.entries(), from_dict({"profile": "local"}))
    assert pools["python"]["shrunk"] == 1 and host["shrunk"] == 1 and host["idleMb"] == 12
    found = board.take("python", "f@1", prefer=0)
    assert found is not None and board.give_back(found[0], "f@1", healthy=True)
    assert not board.entries()[0].shrunk  # its call's run armed it again


def test_a_sandbox_taken_by_a_process_that_died_shows_its_taker_gone(
        board: SandboxBoard) -> None:
    put_idle(board, 0, "f@1")
    pid = os.fork()
    if pid == 0:  # another worker's call takes it, then its worker dies
        os._exit(0 if board.reopened().take("python", "f@1", prefer=1) else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    (entry,) = board.entries()
    assert entry.state == TAKEN and entry.taker_pid == pid and entry.taker_gone


def test_a_take_picks_what_a_whole_scan_ranks_first(board: SandboxBoard) -> None:
    """Random puts, takes, give-backs, upkeep holds and withdrawals over more sandboxes than
    the recent entries hold: every take returns the record a scan of all ranks first (its
    code, then the caller's own, then the most recently idle)."""
    rng = random.Random(23)
    keys = [None, "f@1", "g@1", "h@1"]
    taken: list[Ticket] = []
    for _ in range(3000):
        roll = rng.random()
        if roll < 0.25:
            board.put(rng.randrange(3), rng.choice(["python", "node"]), rng.choice(keys), {})
        elif roll < 0.55 and taken:
            ticket = taken.pop(rng.randrange(len(taken)))
            board.give_back(ticket, rng.choice(keys), healthy=rng.random() < 0.9)
        elif roll < 0.6:
            idle = [e for e in board.entries() if e.state == IDLE]
            if idle:
                entry = rng.choice(idle)
                if rng.random() < 0.5:
                    board.withdraw(entry)
                else:
                    ticket = board.hold(entry)
                    assert ticket is not None
                    board.give_back(ticket, entry.code_key, healthy=True,
                                    idle_since_ns=entry.idle_since_ns)
        else:
            runtime, key, prefer = rng.choice(["python", "node"]), rng.choice(keys[1:]), 0
            generic = rng.random() < 0.7
            ranked = sorted(
                ((e.code_key == key, e.owner == prefer, e.idle_since_ns), e.index)
                for e in board.entries()
                if e.state == IDLE and e.runtime == runtime
                and (e.code_key == key or (generic and e.code_key is None))
            )
            found = board.take(runtime, key, prefer, generic=generic)
            if not ranked:
                assert found is None
            else:
                assert found is not None and found[0].index == ranked[-1][1]
                taken.append(found[0])
    assert len(board.entries()) > lending.RECENT  # the scans were needed, not only the recent
