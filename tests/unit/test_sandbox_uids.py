"""One worker's sandbox uids: never two live sandboxes on one uid, the oldest freed first,
a clear error once the whole range is live."""

from __future__ import annotations

import os
import subprocess

import pytest
from helpers import UID_RANGE_PER_TEST_PROCESS, sandbox_uid_base

from nanogrid.common.errors import SandboxError
from nanogrid.runners.process.uids import UIDS_PER_WORKER, SandboxUids, uid_range


def test_each_worker_has_a_range_of_its_own() -> None:
    assert uid_range(61000, 0) == range(61000, 62000)
    assert uid_range(61000, 2) == range(63000, 64000)
    assert len(uid_range(61000, 5)) == UIDS_PER_WORKER


def test_a_uid_is_handed_out_again_only_after_it_came_back_and_oldest_first() -> None:
    uids = SandboxUids(range(100, 103), worker=4)
    first, second, third = uids.take(), uids.take(), uids.take()
    assert [first, second, third] == [100, 101, 102]
    uids.give_back(second, ended=True)
    uids.give_back(first, ended=True)
    assert uids.take() == second and uids.take() == first


def test_a_worker_with_every_uid_live_gets_a_sandbox_error() -> None:
    uids = SandboxUids(range(100, 102), worker=3)
    live = {uids.take(), uids.take()}
    assert live == {100, 101}
    with pytest.raises(SandboxError) as caught:
        uids.take()
    assert str(caught.value) == "all 2 sandbox uids of worker 3 (100-101) belong to live sandboxes"
    uids.give_back(101, ended=True)
    assert uids.take() == 101


def test_a_uid_something_still_runs_as_is_handed_out_last() -> None:
    """A worker's range is its slot's: the sandboxes of the slot's earlier worker (or of a
    runner closed just before) may still run for a moment. Their uid is not the next one."""
    assert os.geteuid() == 0, "runs a process as another uid: needs root (CI)"
    # The last uids of this test process's range: a 20th worker's, which no test starts.
    first = sandbox_uid_base() + UID_RANGE_PER_TEST_PROCESS - 3
    leftover = subprocess.Popen(["sleep", "60"], user=first)
    try:
        uids = SandboxUids(range(first, first + 3), worker=0)
        assert uids.defer_busy() == 1
        assert [uids.take(), uids.take(), uids.take()] == [first + 1, first + 2, first]
        assert leftover.poll() is None  # not this worker's to kill
    finally:
        leftover.kill()
        leftover.wait()
