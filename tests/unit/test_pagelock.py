"""The shared pages' lock: a wait the kernel refuses as a deadlock between two workers'
threads (record locks belong to processes) is tried again, not raised."""

from __future__ import annotations

import fcntl
import os
import threading
import time

from nanogrid.common.pagelock import PageLock


def test_a_wait_refused_as_a_deadlock_between_threads_is_tried_again() -> None:
    ledger, board = os.memfd_create("ledger"), os.memfd_create("board")
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # another worker: holds the board, then wants the ledger
        fcntl.lockf(board, fcntl.LOCK_EX)
        os.write(ready_w, b".")
        time.sleep(0.3)  # the test's second thread now waits for the board
        try:
            with PageLock(ledger).held():  # the kernel sees a cycle: EDEADLK here
                pass
        except OSError:
            os._exit(1)
        fcntl.lockf(board, fcntl.LOCK_UN)
        os._exit(0)
    os.read(ready_r, 1)
    got_board = threading.Event()

    def wait_for_board() -> None:
        with PageLock(board).held():
            got_board.set()

    with PageLock(ledger).held():  # one thread holds the ledger while another waits
        waiter = threading.Thread(target=wait_for_board)
        waiter.start()
        time.sleep(0.6)  # the other worker's wait for the ledger is refused meanwhile
    waiter.join(5)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and got_board.is_set()
