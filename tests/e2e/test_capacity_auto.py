"""``capacity.max_concurrent: auto`` from what the host can hold (memory, open files, tasks)
through the real supervisor, and a value the host's limits cannot hold refused at
``--check``, at start and on SIGHUP."""

from __future__ import annotations

import contextlib
import re
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from helpers import wait_until
from supervised import BIN

from nanogrid.common import capacity

pytestmark = pytest.mark.usefixtures("pids_limited_tests")


@contextlib.contextmanager
def open_files(limit: int) -> Iterator[None]:
    """``ulimit -n limit`` for what this process starts meanwhile (the supervisor inherits
    it, as it would from systemd's LimitNOFILE=)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def supervisor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BIN), *args], capture_output=True, text=True,
                          timeout=60, start_new_session=True)


def refusals(log: str, count: int) -> list[str] | None:
    """The agent's reload refusals, once there are ``count``."""
    found = re.findall(r"reload refused.*", log)
    return found if len(found) >= count else None


def test_auto_is_the_least_the_memory_the_open_files_and_the_tasks_hold(
    agents: Any, pids_limited_tests: int
) -> None:
    """16 GB at 32 MB a run holds 512; ulimit -n 640 holds (640 - 128) / 8 = 64 runs; with
    the open files no bound, the tests' pids.max 2048 holds (2048 - 64) / 4 = 496. Not a
    count per CPU: this host has 2."""
    settings = {"capacity": {"memory_mb": 16384, "max_concurrent": "auto"},
                "limits": {"min_memory_mb": 32}}
    with open_files(640):
        low = agents(workers=1, **settings).start()
    assert low.status()["capacity"]["maxConcurrent"] == 64
    assert low.run(low.deploy("print('ok')\n"))["status"] == "SUCCESS"
    with open_files(20_000):
        high = agents(workers=1, **settings).start()
    expected = (pids_limited_tests - capacity.PIDS_RESERVE) // capacity.PIDS_PER_RUN
    assert expected < 512
    assert high.status()["capacity"]["maxConcurrent"] == expected
    assert re.search(rf"least of 512 \(memory at 32 MB\), 2484 \(ulimit -n 20000\), {expected} "
                     rf"\(pids\.max is {pids_limited_tests} in /\S+\)", high.log.read_text())


def test_a_max_concurrent_the_host_cannot_hold_is_refused(
    agents: Any, pids_limited_tests: int
) -> None:
    """200 runs need 1728 open files in one worker: refused under ulimit -n 1024, in the same
    one line at --check, at start and on SIGHUP (which keeps the running config); 600 runs
    need 2464 tasks, more than the tests' pids.max 2048."""
    with open_files(1024):
        agent = agents(workers=1, capacity={"memory_mb": 8192, "max_concurrent": 100}).start()
        loaded_at = agent.status()["configLoadedAt"]
        cases = [
            (200, "capacity.max_concurrent: 200 runs need 1728 open files in one worker, but "
                  "ulimit -n is 1024: raise it (systemd: LimitNOFILE=) or lower "
                  "capacity.max_concurrent"),
            (600, "capacity.max_concurrent: 600 runs need 2464 tasks, but pids.max is "
                  f"{pids_limited_tests} in /"),
        ]
        for number, (wanted, line) in enumerate(cases, start=1):
            bad = dict(agent.settings, capacity={"memory_mb": 32768, "max_concurrent": wanted})
            bad_path = agent.base / "bad.yaml"
            bad_path.write_text(yaml.safe_dump(bad))
            check = supervisor("--check", "-c", str(bad_path))
            start = supervisor("-c", str(bad_path))
            assert check.returncode == 2 and check.stderr.count("\n") == 1
            assert line in check.stderr
            assert (start.returncode, start.stderr) == (2, check.stderr)
            agent.config_path.write_text(yaml.safe_dump(bad))
            agent.signal(signal.SIGHUP)
            said = wait_until(lambda n=number: refusals(agent.log.read_text(), n),
                              timeout=20, what="the reload to be refused")
            assert line in said[number - 1]
    assert agent.status()["configLoadedAt"] == loaded_at
    assert agent.status()["capacity"]["maxConcurrent"] == 100
