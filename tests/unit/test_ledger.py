"""The host's capacity ledger: one budget shared by all workers, across processes."""

from __future__ import annotations

import os
import signal
import time

from nanogrid.worker.ledger import Ledger


def test_admission_stops_at_the_memory_budget_and_resumes_on_release() -> None:
    ledger = Ledger(memory_mb=1024, max_concurrent=100)
    assert [ledger.admit(0, 256) for _ in range(5)] == [True, True, True, True, False]
    assert ledger.usage().memory_in_use_mb == 1024 and ledger.usage().running == 4
    ledger.release(0, 256)
    assert ledger.admit(1, 256) and not ledger.admit(1, 1)


def test_admission_stops_at_max_concurrent() -> None:
    ledger = Ledger(memory_mb=10_000, max_concurrent=3)
    assert [ledger.admit(i % 2, 32) for i in range(4)] == [True, True, True, False]
    assert ledger.room(0) == (0, 10_000 - 96)
    assert ledger.hold_for_receive(0, 32, 32, 10) == 0


def test_a_waiting_large_task_is_not_starved_by_small_ones_of_other_workers() -> None:
    ledger = Ledger(memory_mb=1024, max_concurrent=100)
    for _ in range(3):
        assert ledger.admit(0, 256)  # worker 0 runs three small ones
    assert not ledger.admit(1, 1024)  # worker 1's large task does not fit
    ledger.hold(1, 1, 1024)
    assert not ledger.admit(0, 256)  # worker 0 keeps the room for it, though 256 MB are free
    assert ledger.room(0) == (96, 0)
    for _ in range(3):
        ledger.release(0, 256)
    assert ledger.admit(1, 1024)  # and it gets in once the small ones are done
    ledger.hold(1, 0, 0)
    assert ledger.usage().held_mb == 0


def test_two_workers_waiting_on_each_others_hold_do_not_wait_forever() -> None:
    """Worker 1's large task waits (holding the whole budget) while worker 0 holds room for a
    small one it received meanwhile: each alone would wait for the other's hold. The older
    hold goes first, whichever it is."""
    for large_first in (True, False):
        ledger = Ledger(memory_mb=1024, max_concurrent=100)
        assert ledger.admit(2, 960)  # a run of worker 2 keeps both waiting at first
        holds = [(1, 1024), (0, 128)] if large_first else [(0, 128), (1, 1024)]
        for slot, memory_mb in holds:
            assert not ledger.admit(slot, memory_mb)
            ledger.hold(slot, 1, memory_mb)
        ledger.release(2, 960)
        (older, older_mb), (younger, younger_mb) = holds
        assert not ledger.admit(younger, younger_mb)  # it waits behind the older hold
        assert ledger.admit(older, older_mb)
        ledger.hold(older, 0, 0)
        assert not ledger.admit(younger, younger_mb)  # 1024 MB: the large one runs alone
        ledger.release(older, older_mb)
        assert ledger.admit(younger, younger_mb)


def test_room_held_for_a_receive_is_not_taken_by_another_worker() -> None:
    ledger = Ledger(memory_mb=1024, max_concurrent=100)
    assert ledger.hold_for_receive(0, 256, 32, 10) == 4  # worker 0 long-polls for 4
    assert ledger.hold_for_receive(1, 256, 32, 10) == 0  # so worker 1 asks for none
    assert ledger.usage().held_mb == 1024
    ledger.hold(0, 0, 0)  # worker 0's receive came back empty
    assert ledger.hold_for_receive(1, 256, 32, 10) == 4
    assert ledger.hold_for_receive(0, 512, 32, 10) == 0
    ledger.hold(1, 0, 0)
    assert ledger.hold_for_receive(0, 512, 32, 10) == 2
    assert ledger.hold_for_receive(1, 2048, 32, 10) == 0  # worker 0 holds it all


def test_workers_in_other_processes_share_the_budget() -> None:
    ledger = Ledger(memory_mb=512, max_concurrent=10)
    assert ledger.admit(0, 256)
    pid = os.fork()
    if pid == 0:
        child = Ledger(512, 10, ledger.fd)
        os._exit(0 if child.admit(1, 256) and not child.admit(1, 1) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not ledger.admit(0, 1)
    assert ledger.usage().memory_in_use_mb == 512  # the child's 256 MB in the shared page


def test_a_worker_killed_while_holding_the_lock_does_not_wedge_the_others() -> None:
    ledger = Ledger(memory_mb=512, max_concurrent=10)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        child = Ledger(512, 10, ledger.fd)
        child.admit(1, 256)
        with child._locked():  # dies holding the lock
            os.write(write_fd, b"x")
            time.sleep(60)
        os._exit(0)
    os.read(read_fd, 1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    started = time.monotonic()
    assert ledger.admit(0, 256) and not ledger.admit(0, 256)  # its 256 MB still counted
    ledger.reset(1)  # what the arbiter does when it reaps the dead worker
    assert ledger.admit(0, 256)
    assert time.monotonic() - started < 1
    os.close(read_fd)
    os.close(write_fd)
