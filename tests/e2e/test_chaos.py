"""Faults through the real supervisor: poison bodies, a refused dead-letter copy, peers that
fail (counted in /metrics, a Redis out of memory shown by /health), and a chaos soak (a
worker SIGKILLed each time another sixth of the tasks is done, redis-server restarted
half-way) that must still end every task with exactly its function's own result.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
from faultproxy import Forwarder
from helpers import RedisServer, free_port, http_json, wait_until
from poison import POISON
from prometheus_client.parser import text_string_to_metric_families
from supervised import Agent

from nanogrid.devtools.overlap import finished_at

pytestmark = pytest.mark.usefixtures("pids_limited_tests")  # own cgroups for our sandboxes


def metrics(agent: Agent) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def dead_letters(agent: Agent, url: str, count: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def more() -> bool:
        reply = agent.aws.sqs().receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageAttributeNames=["All"]
        )
        found.extend(reply.get("Messages", []))
        return len(found) >= count

    wait_until(more, timeout=20, what=f"{count} dead-letter copies")
    return found


def with_queue(agent: Agent, **changes: Any) -> None:
    agent.write_config(queue={**agent.settings["queue"], **changes})


def test_poison_bodies_never_restart_a_supervised_worker(agents: Any) -> None:
    agent = agents()
    dlq = agent.aws.new_queue("e2e-dlq")
    # No redelivery within the test (the e2e queues' 2 s would let a loaded host's late
    # delete bring a handled message back): each poison body must end on its first receive.
    with_queue(agent, dead_letter_url=dlq, visibility_timeout_seconds=30)
    agent.start()
    for body, _ in POISON.values():
        agent.aws.sqs().send_message(QueueUrl=agent.queue_url, MessageBody=body)
    letters = dead_letters(agent, dlq, len(POISON))
    assert sorted(m["Body"] for m in letters) == sorted(body for body, _ in POISON.values())
    # Each ended on its first receive: within one visibility timeout.
    assert {m["MessageAttributes"]["receiveCount"]["StringValue"] for m in letters} == {"1"}
    for _, request_id in POISON.values():
        if request_id is not None:
            assert agent.result(request_id, timeout=5)["status"] == "FAILED"
    status = agent.status()
    assert [w["restarts"] for w in status["workers"]] == [0, 0]
    assert status["restartsTotal"] == 0
    assert agent.run(agent.deploy("print('still here')\n"))["stdout"] == "still here\n"
    assert "Traceback" not in agent.log.read_text()


def test_a_refused_dead_letter_copy_is_counted_in_metrics_and_status(agents: Any) -> None:
    agent = agents(workers=1)
    gone = agent.aws.new_queue("gone")
    agent.aws.sqs().delete_queue(QueueUrl=gone)
    with_queue(agent, dead_letter_url=gone)
    agent.start()
    agent.aws.sqs().send_message(QueueUrl=agent.queue_url, MessageBody='{"requestId": "r-x"}')
    assert agent.result("r-x", timeout=10)["errorType"] == "INVALID_MESSAGE"
    wait_until(lambda: 'nanogrid_worker_faults_total{kind="dead_letter_copy"} 1' in metrics(agent),
               timeout=5, what="the refused copy counted")
    (worker,) = agent.status()["workers"]
    assert "r-x" not in worker["faults"]["dead_letter_copy"]["last"]  # names the message id
    assert worker["faults"]["dead_letter_copy"]["count"] == 1
    assert "cannot be used" in agent.log.read_text()  # said at boot


def dependency_errors(agent: Agent) -> dict[str, float]:
    """nanogrid_dependency_errors_total by dependency, as prometheus_client parses /metrics."""
    return {
        sample.labels["dependency"]: sample.value
        for family in text_string_to_metric_families(metrics(agent))
        for sample in family.samples
        if sample.name == "nanogrid_dependency_errors_total"
    }


def test_sqs_s3_and_cloudwatch_failing_for_real_are_counted_in_metrics(
    agents: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3 and CloudWatch endpoints where nothing listens fail the code fetch and the metrics
    flush; then SQS's endpoint (a forwarder to moto_server) goes away too. Each failure
    reaches nanogrid_dependency_errors_total under its own dependency, and only there."""
    agent = agents(workers=1, cloudwatch={"enabled": True, "flush_seconds": 0.2})
    with_queue(agent, max_attempts=1)
    key = agent.deploy("print('never runs')\n")  # the test's own clients exist before this
    sqs = Forwarder(int(agent.aws.endpoint.rsplit(":", 1)[1]))
    nowhere = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", f"http://127.0.0.1:{sqs.port}")  # the agent's
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", nowhere)
    monkeypatch.setenv("AWS_ENDPOINT_URL_CLOUDWATCH", nowhere)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # S3 and CloudWatch fail at once, not after
    # boto3's backoff (SQS's clients set their own tries)
    try:
        agent.start()
        assert dependency_errors(agent) == {"sqs": 0, "s3": 0, "redis": 0, "cloudwatch": 0}
        result = agent.call(agent.task(key), timeout=30)
        assert result["errorType"] == "CODE_NOT_FOUND"
        assert "S3 unreachable" in result["errorMessage"]
        counted = wait_until(
            lambda: (e := dependency_errors(agent))["s3"] and e["cloudwatch"] and e,
            timeout=10, what="the S3 and CloudWatch errors in /metrics")
        assert counted["sqs"] == counted["redis"] == 0
        sqs.close()  # SQS's endpoint is gone: every receive fails
        counted = wait_until(lambda: (e := dependency_errors(agent))["sqs"] and e,
                             timeout=15, what="the SQS errors in /metrics")
        assert counted["redis"] == 0
    finally:
        sqs.close()
    log = agent.log.read_text()
    assert "[CLOUDWATCH] put_metric_data failed" in log


def test_health_is_degraded_naming_redis_while_it_is_out_of_memory_then_up(
    agents: Any, redis_server: RedisServer
) -> None:
    """Under ``maxmemory`` with ``noeviction`` Redis refuses every write: /health says
    DEGRADED, naming redis and the reply, while it lasts, UP once it ends; the task sent
    during it runs after it, at attempt 1."""
    agent = agents(workers=1).start()
    admin = redis_server.client()
    wait_until(lambda: http_json(agent.port, "/health")[1]["status"] == "UP", timeout=30,
               what="/health UP (the pools warm)")
    key = agent.deploy("print('after')\n")
    try:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        request_id = agent.send(agent.task(key))
        code, health = wait_until(
            lambda: (r := http_json(agent.port, "/health"))[1]["status"] == "DEGRADED" and r,
            timeout=10, what="/health DEGRADED")
        assert code == 200 and health["workersAlive"] == 1
        assert [r.split(" (")[0] for r in health["reasons"]] == [
            "worker 0: redis: results cannot be written"]
        assert "OOM command not allowed" in health["reasons"][0]
        time.sleep(2)  # a probe or two: still DEGRADED, the task still not run
        assert http_json(agent.port, "/health")[1]["status"] == "DEGRADED"
        assert agent.status()["workers"][0]["tasksDone"] == 0
    finally:
        admin.config_set("maxmemory", 0)
    ended = time.time()
    wait_until(lambda: http_json(agent.port, "/health")[1]["status"] == "UP", timeout=10,
               what="/health UP after the OOM")
    result = agent.result(request_id, timeout=15)
    assert (result["status"], result["attempt"], result["stdout"]) == ("SUCCESS", 1, "after\n")
    assert finished_at(result) >= ended - 0.1  # run after it


class PersistentRedis(RedisServer):
    """redis-server that keeps its data across a restart (AOF, fsync on every write)."""

    def command(self) -> list[str]:
        return [*super().command(), "--appendonly", "yes", "--appendfsync", "always"]


FUNCTIONS = {
    "hello": ("print('hello')\n", ("SUCCESS", None, "hello\n")),
    "sleep": ("import time\ntime.sleep(0.05)\nprint('slept')\n", ("SUCCESS", None, "slept\n")),
    "fail": ("import sys\nsys.exit(3)\n", ("FAILED", "FUNCTION_ERROR", "")),
}
TASKS = 300
KILLS = 5  # one each time another sixth of the tasks has its result


def _stored(client: Any, tasks: list[dict[str, Any]]) -> int:
    """How many of the tasks have their result stored; 0 while redis-server is down."""
    try:
        pipe = client.pipeline(transaction=False)
        for t in tasks:
            pipe.exists(f"result:{t['requestId']}")
        return sum(pipe.execute())
    except redis.RedisError:
        return 0


def test_chaos_soak_every_task_ends_with_its_own_result(
    agents: Any, tmp_path: Path, record_property: Any
) -> None:
    store = PersistentRedis(tmp_path)
    store.start()
    agent = agents(workers=3, redis={"url": store.url}, runtimes={"python": {"warm": 3}})
    # The soak kills far more often than any host dies: more tries than the default 3.
    with_queue(agent, max_attempts=10)
    agent.start()
    keys = {name: agent.deploy(code) for name, (code, _) in FUNCTIONS.items()}
    tasks = [agent.task(keys[name], functionId=name) for name in list(FUNCTIONS) * (TASKS // 3)]
    random.Random(7).shuffle(tasks)
    kills: list[int] = []
    stop = threading.Event()

    def chaos() -> None:
        # Paced by the work done, not by the clock: a faster agent meets as many kills.
        watcher = store.client()
        while len(kills) < KILLS and not stop.wait(0.05):
            if _stored(watcher, tasks) >= (len(kills) + 1) * TASKS // (KILLS + 1):
                alive = [pid for pid in agent.alive().values() if pid not in kills]
                if alive:
                    victim = random.choice(alive)
                    os.kill(victim, signal.SIGKILL)
                    kills.append(victim)

    # The kills start with the sends: 300 tasks take moto seconds to take in, and with host
    # capacity the agent runs them about as fast as they arrive.
    started = time.monotonic()
    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    for start in range(0, len(tasks), 10):
        agent.aws.sqs().send_message_batch(QueueUrl=agent.queue_url, Entries=[
            {"Id": str(i), "MessageBody": json.dumps(t)}
            for i, t in enumerate(tasks[start:start + 10])
        ])
    client = store.client()
    restarted = False

    def all_stored() -> bool:
        nonlocal restarted
        stored = _stored(client, tasks)
        if not restarted and stored >= TASKS // 2:
            # From this thread: a peer started by a thread dies with it (PR_SET_PDEATHSIG).
            store.stop()  # SIGTERM: redis-server writes its AOF out and exits
            store.start()
            restarted = True
        return stored == TASKS

    try:
        wait_until(all_stored, timeout=50, interval=0.1, what="a result for every task")
    finally:
        stop.set()
        thread.join()
    elapsed = time.monotonic() - started
    wait_until(lambda: _depth(agent) == 0, timeout=30, what="an empty task queue")
    emptied = time.monotonic() - started
    for t in tasks:
        result = json.loads(client.get(f"result:{t['requestId']}"))
        status, error_type, stdout = FUNCTIONS[t["functionId"]][1]
        assert (result["status"], result["errorType"], result["stdout"]) == (
            status, error_type, stdout), result
    restarts = agent.status()["restartsTotal"]
    log = agent.log.read_text()
    reruns = sum(n - 1 for n in _runs(log).values() if n > 1)
    record_property("chaos_seconds", round(elapsed, 1))
    print(f"chaos: {TASKS} tasks in {elapsed:.1f}s (queue empty at {emptied:.1f}s), "
          f"{len(kills)} workers SIGKILLed "
          f"({restarts} restarts), redis restarted once; {reruns} runs repeated after a kill")
    assert len(kills) == KILLS and restarted
    assert restarts == KILLS  # no worker lost but the ones killed (none by the Redis restart)
    store.stop()


def _depth(agent: Agent) -> int:
    attrs = agent.aws.sqs().get_queue_attributes(
        QueueUrl=agent.queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return sum(int(v) for v in attrs.values())


def _runs(log: str) -> dict[str, int]:
    runs: dict[str, int] = {}
    for request_id in re.findall(r"\| (\S+) \| \[PROCESS\] running ", log):
        runs[request_id] = runs.get(request_id, 0) + 1
    return runs
