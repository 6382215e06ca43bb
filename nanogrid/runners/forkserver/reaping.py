"""Ending what a run leaves behind: its process group, or, as PID 1 of the sandbox's
namespace, every other process in it."""

import contextlib
import os
import signal
import time


def kill_group(pgid: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pgid, signal.SIGKILL)


def reap_orphans(run_pid: int) -> bool:
    """Reap exited children other than the run's own; True once the run's child has exited."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        if info is None:
            return False
        if info.si_pid == run_pid:
            return True  # left for wait4, which reads its rusage
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.si_pid, 0)


def kill_namespace() -> None:
    """As PID 1: SIGKILL every other process of the namespace and reap them all.

    Orphans come to PID 1, so with no child left there is no one else, and the kill is not
    sent: ``kill(-1)`` walks every process of the host to find the namespace's own.
    """
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        return
    while True:
        with contextlib.suppress(OSError):
            os.kill(-1, signal.SIGKILL)  # from PID 1: everyone in the namespace but itself
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return
        time.sleep(0.001)  # killed, not yet gone
