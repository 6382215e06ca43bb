"""Host capacity through the real supervisor: many invocations at once, a budget that holds
across workers, backpressure, a large task that is not starved, drain and SIGKILL with many
in flight, and a CPU-bound burst that does not starve the agent."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from datetime import datetime
from typing import Any

import pytest
from helpers import wait_until
from supervised import Agent

from nanogrid.devtools.overlap import most_at_once

pytestmark = pytest.mark.usefixtures("pids_limited_tests")

BUDGET = {"capacity": {"memory_mb": 1024, "max_concurrent": 16}, "limits": {"max_memory_mb": 1024}}


def sleeper(seconds: float) -> str:
    return f"import time\ntime.sleep({seconds})\nprint('slept')\n"


def send_all(agent: Agent, tasks: list[dict[str, Any]]) -> None:
    for start in range(0, len(tasks), 10):
        agent.aws.sqs().send_message_batch(QueueUrl=agent.queue_url, Entries=[
            {"Id": str(i), "MessageBody": json.dumps(t)}
            for i, t in enumerate(tasks[start:start + 10])
        ])


def queue_counts(agent: Agent) -> tuple[int, int]:
    """(visible, in flight) as SQS counts them."""
    attrs = agent.aws.sqs().get_queue_attributes(
        QueueUrl=agent.queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return (int(attrs["ApproximateNumberOfMessages"]),
            int(attrs["ApproximateNumberOfMessagesNotVisible"]))


def test_the_host_budget_holds_across_workers_and_is_used(agents: Any) -> None:
    agent = agents(**BUDGET).start()
    key = agent.deploy(sleeper(0.6))
    tasks = [agent.task(key, memoryMb=256) for _ in range(16)]
    seen: list[dict[str, Any]] = []
    samples: list[tuple[int, int]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(agent.status())
            visible, in_flight = queue_counts(agent)
            stored = sum(agent.redis.exists(f"result:{t['requestId']}") for t in tasks)
            deleted = len(tasks) - visible - in_flight
            samples.append((in_flight, max(0, stored - deleted)))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    send_all(agent, tasks)
    try:
        results = [agent.result(t["requestId"], timeout=60) for t in tasks]
    finally:
        done.set()
        watcher.join()
    assert {r["status"] for r in results} == {"SUCCESS"}
    assert most_at_once(results) == 4  # 1024 MB / 256 MB: never more, and it did run 4
    capacity = [s["capacity"] for s in seen]
    assert max(c["memoryInUseMb"] for c in capacity) == 1024
    assert all(c["running"] <= 4 and c["memoryInUseMb"] <= 1024 for c in capacity)
    assert all(c["memoryMb"] == 1024 and c["maxConcurrent"] == 16 for c in capacity)
    # The workers' own accounts (their status lines, up to 50 ms late) agree with the ledger.
    per_worker = [sum(w["running"] for w in s["workers"]) for s in seen]
    assert max(per_worker) == 4
    for worker in (w for s in seen for w in s["workers"]):
        assert len(worker["currentRequestIds"]) == worker["running"]
        assert worker["currentRequestId"] == next(iter(worker["currentRequestIds"]), None)
    # Backpressure: what the workers took from SQS and have not finished stays within what
    # fits (4) plus one receive per worker; done messages whose delete is still batching
    # are not work held back.
    assert max(in_flight - finished for in_flight, finished in samples) <= 4 + 2


def test_a_large_task_runs_while_small_ones_keep_arriving(agents: Any) -> None:
    agent = agents(**BUDGET).start()
    small, large = agent.deploy(sleeper(0.3)), agent.deploy(sleeper(0.1))
    stop = threading.Event()
    sent: list[str] = []

    def keep_sending() -> None:  # more small ones than the budget runs at once, all along
        while not stop.is_set():
            batch = [agent.task(small, memoryMb=128) for _ in range(10)]
            send_all(agent, batch)
            sent.extend(t["requestId"] for t in batch)
            time.sleep(0.2)

    sender = threading.Thread(target=keep_sending, daemon=True)
    sender.start()
    try:
        time.sleep(1.0)
        big = agent.task(large, memoryMb=1024)
        began = time.monotonic()
        agent.send(big)
        result = agent.result(big["requestId"], timeout=30)
        waited = time.monotonic() - began
    finally:
        stop.set()
        sender.join()
    assert result["status"] == "SUCCESS" and result["memoryMb"] == 1024
    assert waited < 10, f"the 1024 MB task waited {waited:.1f}s behind small ones"
    # It ran alone: no small one overlapped it.
    smalls = [json.loads(r) for r in agent.redis.mget([f"result:{i}" for i in sent]) if r]
    assert most_at_once([*smalls, result]) <= 8
    end = datetime.fromisoformat(result["finishedAt"].replace("Z", "+00:00")).timestamp()
    start = end - result["durationMillis"] / 1000
    for other in smalls:
        other_end = datetime.fromisoformat(other["finishedAt"].replace("Z", "+00:00")).timestamp()
        assert other_end <= start + 0.05 or other_end - other["durationMillis"] / 1000 >= end - 0.05


def test_sigterm_drains_every_run_in_flight_and_hands_back_the_rest(agents: Any) -> None:
    agent = agents(capacity={"memory_mb": 4096, "max_concurrent": 6})
    agent.write_config(queue={**agent.settings["queue"], "visibility_timeout_seconds": 30})
    agent.start()
    key = agent.deploy(sleeper(2.0))
    running = [agent.task(key, memoryMb=128) for _ in range(6)]
    send_all(agent, running)
    wait_until(lambda: agent.status()["capacity"]["running"] == 6, timeout=20,
               what="6 runs at once")
    later = [agent.task(key, memoryMb=128) for _ in range(4)]
    send_all(agent, later)
    time.sleep(0.3)
    agent.signal(signal.SIGTERM)
    assert agent.process is not None and agent.process.wait(timeout=20) == 0
    for t in running:
        assert agent.result(t["requestId"], timeout=1)["status"] == "SUCCESS"
    for t in later:
        assert not agent.redis.exists(f"result:{t['requestId']}")
    # Released at once (visibility 0), not after the 30 s visibility timeout.
    wait_until(lambda: queue_counts(agent) == (4, 0), timeout=5, what="4 messages visible again")


def test_a_sigkilled_worker_loses_none_of_its_runs(agents: Any) -> None:
    agent = agents(workers=1, capacity={"memory_mb": 4096, "max_concurrent": 8}).start()
    key = agent.deploy(sleeper(1.0))
    tasks = [agent.task(key, memoryMb=128) for _ in range(6)]
    send_all(agent, tasks)
    wait_until(lambda: agent.status()["capacity"]["running"] >= 4, timeout=20,
               what="several runs at once")
    os.kill(agent.alive()[0], signal.SIGKILL)
    results = [agent.result(t["requestId"], timeout=30) for t in tasks]
    assert {r["status"] for r in results} == {"SUCCESS"}
    assert max(r["attempt"] for r in results) >= 2  # some came back after the kill
    wait_until(lambda: queue_counts(agent) == (0, 0), timeout=10, what="an empty queue")
    assert agent.status()["capacity"]["running"] == 0  # the dead worker's runs count no more


def test_a_cpu_bound_burst_does_not_starve_the_agent(agents: Any) -> None:
    agent = agents(capacity={"memory_mb": 8192, "max_concurrent": 16},
                   heartbeat_timeout_seconds=5).start()
    key = agent.deploy("import time\nend = time.time() + 2\nwhile time.time() < end: pass\n")
    tasks = [agent.task(key, memoryMb=128) for _ in range(16)]
    send_all(agent, tasks)
    wait_until(lambda: agent.status()["capacity"]["running"] >= 8, timeout=20,
               what="the burst to run")
    beats = []
    while agent.status()["capacity"]["running"]:
        status = agent.status()
        beats += [w["lastHeartbeatSecondsAgo"] for w in status["workers"] if w["alive"]]
        time.sleep(0.2)
    results = [agent.result(t["requestId"], timeout=60) for t in tasks]
    assert {r["status"] for r in results} == {"SUCCESS"}
    assert agent.status()["restartsTotal"] == 0
    assert max(beats) < 2.5, "a worker's heartbeat stalled under the burst"
