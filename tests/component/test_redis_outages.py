"""Redis refusing writes and losing claims, on the real peers: out of memory under
``noeviction`` is an outage (nothing given up, nothing lost), so are the other replies of a
server that takes no writes for now (a script running too long, a dataset loading, too few
replicas, a failed save), and a claim deleted under a live run is taken again before a copy
can run beside it."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from harness import HELLO, Agent, fork_worker, runs_per_request, stop
from helpers import RedisServer, wait_until

from nanogrid.devtools.overlap import finished_at

OOM_S = 10.0


def test_a_redis_out_of_memory_loses_no_task_and_no_result(
    aws: Any, redis_server: RedisServer, redis_url: str, tmp_path: Path
) -> None:
    """Tasks arrive before, all through and after a 10 s OOM (every write refused with -OOM,
    as ``maxmemory`` under ``noeviction`` does): each runs once, at its first attempt, and
    each result reaches Redis; the workers are DEGRADED meanwhile and give up nothing."""
    agent = Agent(aws, redis_url, tmp_path, queue={"max_attempts": 2}).start()
    second = fork_worker(agent.config, 1)
    admin = redis_server.client()
    sent: list[tuple[float, str]] = []
    try:
        key = agent.deploy({"main.py": "import time\ntime.sleep(0.2)\nprint('ran')\n"})
        wait_until(lambda: agent.log.read_text().count(" ready (pid ") == 2, timeout=20,
                   what="two workers")
        oom: dict[str, float] = {}

        def oom_window() -> None:
            time.sleep(2)
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 1)  # every write is over it now
            oom["start"] = time.time()
            time.sleep(OOM_S)
            admin.config_set("maxmemory", 0)
            oom["end"] = time.time()

        window = threading.Thread(target=oom_window)
        window.start()
        while window.is_alive() or time.time() < oom.get("end", time.time()) + 2:
            sent.append((time.time(), agent.send(agent.task(key))))
            time.sleep(0.1)
        window.join()
        for _, request_id in sent:
            wait_until(lambda r=request_id: admin.exists(f"result:{r}"), timeout=60,
                       what=f"the result of {request_id}")
        outbox = Path(agent.config.paths.outbox_dir)
        wait_until(lambda: not outbox.exists() or not list(outbox.iterdir()), timeout=10,
                   what="an empty outbox")
    finally:
        admin.config_set("maxmemory", 0)
        assert stop(second) == 0
        assert agent.stop() == 0
    results = {r: json.loads(admin.get(f"result:{r}")) for _, r in sent}
    assert {(x["status"], x["attempt"], x["stdout"]) for x in results.values()} == {
        ("SUCCESS", 1, "ran\n")}
    log = agent.log.read_text()
    assert set(runs_per_request(log).values()) == {1}  # none ran twice
    assert "gave up" not in log and agent.dead_letters() == []
    assert "[DEGRADED] redis: results cannot be written (OOM command not allowed" in log
    assert "[DEGRADED] over: redis works again" in log
    during = [r for at, r in sent if oom["start"] + 0.5 <= at < oom["end"]]
    assert len(during) >= 50
    assert all(finished_at(results[r]) >= oom["end"] - 0.1 for r in during)  # run after it
    handed_back = log.count("not tried; message")
    print(f"{len(sent)} tasks, {len(during)} sent during the {OOM_S:.0f}s OOM; all SUCCESS at "
          f"attempt 1, {handed_back} hand-backs, outbox empty")


def test_a_claim_deleted_under_a_live_run_is_taken_again_and_a_copy_does_not_run(
    aws: Any, redis_url: str, tmp_path: Path
) -> None:
    """A failover that dropped the last writes, a restart without persistence or eviction
    can lose a running task's claim. Its renewal takes it again, so a duplicate delivery that
    arrives after that finds it held and does not run beside it."""
    agent = Agent(aws, redis_url, tmp_path).start()  # visibility (= lease) 2 s, renewed every 0.67
    second = fork_worker(agent.config, 1)
    try:
        wait_until(lambda: agent.log.read_text().count(" ready (pid ") == 2, timeout=20,
                   what="two workers")
        task = agent.task(agent.deploy({"main.py": "import time\ntime.sleep(3)\nprint('once')\n"}))
        agent.send(task)
        claim = f"claim:{task['requestId']}"
        wait_until(lambda: agent.redis.exists(claim), timeout=10, what="the claim")
        agent.redis.delete(claim)
        wait_until(lambda: agent.redis.exists(claim), timeout=2, what="the claim taken again")
        agent.send(task)  # the duplicate delivery
        result = agent.result(task["requestId"], timeout=30)
        time.sleep(2.5)  # the copy's hand-back delay: it may come back once more
    finally:
        assert stop(second) == 0
        assert agent.stop() == 0
    assert (result["status"], result["stdout"], result["attempt"]) == ("SUCCESS", "once\n", 1)
    log = agent.log.read_text()
    assert runs_per_request(log)[task["requestId"]] == 1
    assert "was gone while it ran" in log


# -- the other replies of a server that takes no writes for now -------------------------------


class OwnRedis(RedisServer):
    """A redis-server of the test's own, which it makes refuse writes: DEBUG RELOAD and
    CONFIG SET dir allowed."""

    def command(self) -> list[str]:
        return [*super().command(), "--enable-debug-command", "yes",
                "--enable-protected-configs", "yes"]


def refusal(server: RedisServer) -> str:
    """The error code a write gets from ``server`` now ("" when it is taken)."""
    try:
        server.client().set("probe", 1)
    except redis.RedisError as exc:
        return str(getattr(exc, "status_code", "") or str(exc).split()[0])
    return ""


@contextlib.contextmanager
def busy(server: RedisServer, tmp: Path) -> Iterator[None]:
    """A script spins past ``busy-reply-threshold``: every other command gets -BUSY until
    SCRIPT KILL."""
    server.client().config_set("busy-reply-threshold", 50)
    spinning = threading.Thread(
        target=lambda: pytest.raises(redis.ResponseError, server.client(socket_timeout=60).eval,
                                     "while true do end", 0))
    spinning.start()
    wait_until(lambda: refusal(server) == "BUSY", timeout=5, what="-BUSY")
    try:
        yield
    finally:
        server.client().script_kill()
        spinning.join()


@contextlib.contextmanager
def no_replicas(server: RedisServer, tmp: Path) -> Iterator[None]:
    """``min-replicas-to-write 1`` with no replica: writes get -NOREPLICAS."""
    server.client().config_set("min-replicas-to-write", 1)
    try:
        yield
    finally:
        server.client().config_set("min-replicas-to-write", 0)


@contextlib.contextmanager
def failed_save(server: RedisServer, tmp: Path) -> Iterator[None]:
    """A BGSAVE into a read-only disk fails; under ``stop-writes-on-bgsave-error`` (the
    default, with a save point set) writes get -MISCONF until a save works."""
    disk = tmp / "rdb"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    client = server.client()
    try:
        client.config_set("dir", str(disk))
        client.config_set("save", "3600 1")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        client.bgsave()
        wait_until(lambda: client.info("persistence")["rdb_last_bgsave_status"] == "err",
                   timeout=5, what="the failed save")
        yield
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        client.bgsave()
        wait_until(lambda: client.info("persistence")["rdb_last_bgsave_status"] == "ok",
                   timeout=5, what="a save that works")
    finally:
        client.config_set("save", "")
        subprocess.run(["umount", "-l", str(disk)], check=True)


@contextlib.contextmanager
def loading(server: RedisServer, tmp: Path) -> Iterator[None]:
    """DEBUG RELOAD of 20,000 keys at 200 µs each: while the dataset loads (~4 s), every
    command gets -LOADING. The window is the load's, not the test's."""
    client = server.client()
    client.execute_command("DEBUG", "POPULATE", 20_000)
    client.config_set("key-load-delay", 200)
    client.config_set("loading-process-events-interval-bytes", 1024)  # answer while loading
    reload = threading.Thread(
        target=server.client(socket_timeout=60).execute_command, args=("DEBUG", "RELOAD"))
    reload.start()
    wait_until(lambda: refusal(server) == "LOADING", timeout=5, what="-LOADING")
    try:
        yield
    finally:
        reload.join()


OUTAGES: dict[str, Callable[[RedisServer, Path], contextlib.AbstractContextManager[None]]] = {
    "BUSY": busy, "LOADING": loading, "NOREPLICAS": no_replicas, "MISCONF": failed_save}


@pytest.mark.parametrize("code", sorted(OUTAGES))
def test_redis_refusing_writes_for_now_is_an_outage_and_the_tasks_run_after_it(
    aws: Any, tmp_path: Path, code: str
) -> None:
    """Each refusal is made for real, checked on a write of the test's own, and held while
    tasks arrive: the worker is DEGRADED naming it, hands the tasks back untried, and runs
    each once (attempt 1) after the refusal ends."""
    server = OwnRedis(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    server.start()
    agent = Agent(aws, server.url, tmp_path / "agent").start()
    try:
        key = agent.deploy({"main.py": HELLO})
        degraded = f"[DEGRADED] redis: results cannot be written ({code} "
        with OUTAGES[code](server, tmp_path):
            assert refusal(server) == code  # the refusal holds before any task is sent
            sent = [agent.send(agent.task(key)) for _ in range(3)]
            wait_until(lambda: degraded in agent.log.read_text(), timeout=3,
                       what=f"the worker DEGRADED for {code}")
            if code != "LOADING":  # a load ends on its own
                time.sleep(1.5)  # a probe or two more: still no task taken
            log = agent.log.read_text()
            assert "[PROCESS] running" not in log
        ended = time.time()
        results = [agent.result(r, timeout=20) for r in sent]
    finally:
        assert agent.stop() == 0
        server.stop()
    assert [(r["status"], r["attempt"]) for r in results] == [("SUCCESS", 1)] * 3
    assert all(finished_at(r) >= ended - 0.1 for r in results)  # run after it
    log = agent.log.read_text()
    assert set(runs_per_request(log).values()) == {1} and "gave up" not in log
    assert "[DEGRADED] over: redis works again" in log
