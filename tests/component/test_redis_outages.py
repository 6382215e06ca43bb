"""Redis refusing writes and losing claims, on the real peers: out of memory under
``noeviction`` is an outage (nothing given up, nothing lost), and a claim deleted under a
live run is taken again before a copy can run beside it."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from harness import Agent, fork_worker, runs_per_request, stop
from helpers import RedisServer, wait_until

OOM_S = 10.0


def finished_at(result: dict[str, Any]) -> float:
    return datetime.fromisoformat(result["finishedAt"].replace("Z", "+00:00")).timestamp()


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
