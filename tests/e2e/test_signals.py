"""bin/nanogrid-supervisor as a real process in its own session, sent real signals.

The agent runs the process runner on the real peers (moto_server for SQS and S3,
redis-server); tasks go in through SQS and results come back through Redis, as the
controller sends and receives them. Every test is bounded in time, and the whole session
is SIGKILLed at teardown; `leftovers()` finds any process (worker or sandbox) that
outlived the supervisor, by the test's unique directory in its command line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import RedisServer, free_port, http_json, wait_until
from supervised import BIN, DRAIN_TIMEOUT_S, ROOT

HELLO = ROOT / "examples" / "hello-python"
SLOW_S = 2.0
SLOW = f"import time\ntime.sleep({SLOW_S})\nprint('slow done')\n"

pytestmark = pytest.mark.usefixtures("pids_limited_tests")  # own cgroups for our sandboxes


def test_killed_worker_is_replaced_and_serving_again_within_2s(
    agents: Any, record_property: Any
) -> None:
    agent = agents(workers=1).start()
    hello = agent.deploy(HELLO)
    assert agent.run(hello)["status"] == "SUCCESS"
    (victim,) = agent.alive().values()

    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    request_id = agent.send(agent.task(hello))  # waits in the queue for the replacement
    (replacement,) = agent.wait_for_workers(1, without={victim}, timeout=5).values()
    booted_s = time.monotonic() - killed_at
    result = agent.result(request_id, timeout=10)
    served_s = time.monotonic() - killed_at

    assert result["status"] == "SUCCESS" and result["stdout"] == "Hello from NanoGrid!\n"
    assert result["workerId"].endswith(f":{replacement}")
    assert agent.status()["workers"][0]["restarts"] == 1
    agent.wait_for_log(rf"worker 0 \(pid {victim}\) was killed by SIGKILL; replacing it in 0s")
    record_property("replacement_booted_s", round(booted_s, 3))
    record_property("replacement_first_result_s", round(served_s, 3))
    print(
        f"killed worker: replacement booted in {booted_s:.3f}s, "
        f"its first result {served_s:.3f}s after the kill"
    )
    assert booted_s < 2.0, f"replacement booted {booted_s:.2f}s after the kill"
    # The killed worker's long poll may still be open in the emulator and swallow the task
    # (as real SQS would); it then comes back once its visibility timeout ends, untried
    # (attempt 1), after waiting in SQS that long.
    visibility_s = agent.settings["queue"]["visibility_timeout_seconds"]
    swallowed = result["timings"]["queuedMs"] >= visibility_s * 1000
    assert result["attempt"] == 1
    assert served_s < 2.0 + visibility_s * swallowed, f"first result {served_s:.2f}s after the kill"


def test_sigkill_mid_run_the_task_still_completes(agents: Any) -> None:
    agent = agents().start()
    request_id = agent.send(agent.task(agent.deploy(SLOW)))
    running = wait_until(
        lambda: next(
            (w for w in agent.status()["workers"] if w["currentRequestId"] == request_id), None
        ),
        timeout=15,
        what="the slow task to start",
    )
    os.kill(running["pid"], signal.SIGKILL)

    result = agent.result(request_id, timeout=30)  # back after the visibility timeout
    assert result["status"] == "SUCCESS" and result["stdout"] == "slow done\n"
    assert result["attempt"] == 2
    assert not result["workerId"].endswith(f":{running['pid']}")
    agent.wait_for_workers(2, without={running["pid"]})


def test_sighup_to_a_different_worker_count(agents: Any) -> None:
    agent = agents().start()
    hello = agent.deploy(HELLO)
    old = set(agent.alive().values())
    agent.write_config(workers=3, runtimes={"python": {"warm": 3}})
    agent.signal(signal.SIGHUP)
    new = agent.wait_for_workers(3, without=old)
    assert sorted(new) == [0, 1, 2]
    assert agent.run(hello)["status"] == "SUCCESS"
    wait_until(lambda: agent.status()["warmUp"]["state"] == "warm", timeout=30,
               what="the new workers' generic sandboxes")
    wait_until(lambda: agent.status()["pools"]["python"]["idleGeneric"] >= 3, timeout=5,
               what="3 idle generic sandboxes")
    agent.wait_for_log(r"reloaded .*: 3 workers, runner process")
    assert "SIGKILL" not in agent.log.read_text()  # the old workers drained


def test_sighup_with_a_broken_file_keeps_serving_on_the_old_config(agents: Any) -> None:
    agent = agents().start()
    hello = agent.deploy(HELLO)
    before = agent.alive()
    queue = f"queue: {{url: '{agent.queue_url}'}}\n"  # a file without one is refused for that
    agent.config_path.write_text(f"workers: 3\nrunner: podman\n{queue}")
    agent.signal(signal.SIGHUP)
    agent.wait_for_log(
        r"reload refused, still running on the config loaded at .*: "
        r"runner: must be one of docker, process, got 'podman'"
    )
    assert agent.run(hello)["status"] == "SUCCESS"
    assert agent.alive() == before


def test_sigterm_finishes_in_flight_run_and_leaves_no_process(agents: Any) -> None:
    agent = agents().start()
    request_id = agent.send(agent.task(agent.deploy(SLOW)))
    wait_until(
        lambda: any(w["currentRequestId"] == request_id for w in agent.status()["workers"]),
        timeout=15,
        what="the slow task to start",
    )
    assert agent.leftovers()  # workers and their warm sandboxes
    started = time.monotonic()
    agent.signal(signal.SIGTERM)
    assert agent.process is not None and agent.process.wait(timeout=DRAIN_TIMEOUT_S) == 0
    assert time.monotonic() - started < DRAIN_TIMEOUT_S
    assert agent.result(request_id, timeout=1)["status"] == "SUCCESS"  # finished, not cut
    assert agent.leftovers() == []
    assert list(Path(agent.settings["paths"]["work_dir"]).glob("p*/*")) == []  # sandboxes removed
    log = agent.log.read_text()
    assert "received SIGTERM" in log and "SIGKILL" not in log and log.rstrip().endswith("stopped")


def test_worker_booting_while_redis_is_down_waits_degraded_then_serves(
    agents: Any, tmp_path: Path
) -> None:
    # A host (re)started during a Redis outage or failover: its workers boot and wait, taking
    # no work, and serve as soon as Redis is back (no exit, no boot backoff to sit out).
    store = RedisServer(tmp_path, port=free_port())
    agent = agents(workers=1, redis={"url": store.url}).start()
    code, health = wait_until(lambda: _degraded(http_json(agent.port, "/health")), timeout=10,
                              what="/health saying DEGRADED")
    assert code == 200
    reason, *warming = wait_until(
        lambda: (r := http_json(agent.port, "/health")[1].get("reasons", []))
        and r[0].startswith("worker 0:") and r, timeout=10, what="the worker's reason")
    assert reason.startswith("worker 0: redis: results cannot be written (") and str(
        store.port) in reason, reason
    assert all(w.startswith("warming: generic sandboxes ready python 0/") for w in warming)
    request_id = agent.send(agent.task(agent.deploy(HELLO)))
    time.sleep(2)  # two probes: the task is still not taken
    assert agent.status()["workers"][0]["tasksDone"] == 0
    store.start()
    try:
        stored = wait_until(lambda: store.client().get(f"result:{request_id}"), timeout=15,
                            what="the task run once Redis is up")
        assert json.loads(stored)["stdout"] == "Hello from NanoGrid!\n"
        assert http_json(agent.port, "/health")[1]["status"] == "UP"
        assert agent.status()["restartsTotal"] == 0
        log = agent.log.read_text()
        assert "could not boot" not in log and "Traceback" not in log
        assert "[DEGRADED] over: redis works again" in log
    finally:
        store.stop()


def test_worker_that_cannot_boot_is_retried_with_backoff(agents: Any) -> None:
    agent = agents(workers=1)
    gone = agent.aws.new_queue("gone")
    agent.aws.sqs().delete_queue(QueueUrl=gone)
    agent.write_config(queue={**agent.settings["queue"], "url": gone})
    agent.start(wait_for_workers=False)
    agent.wait_for_log(r"could not boot .*EXIT_BOOT_ERROR\)\); retry 2 in 2s", timeout=15)
    log = agent.log.read_text()
    assert len(re.findall(r"worker 0 started", log)) == 2  # 1 s apart, not a hot loop
    assert re.search(r"worker 0 cannot boot: .*NonExistentQueue", log), log
    assert "Traceback" not in log
    assert http_json(agent.port, "/health")[0] == 503


def test_bad_config_at_start_is_one_line_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("workers: 2\nqueue:\n  wait_time_seconds: 30\n")
    done = subprocess.run(
        [sys.executable, str(BIN), "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        start_new_session=True,
    )
    assert done.returncode == 2
    assert done.stderr == (
        "nanogrid-supervisor: config error: queue.wait_time_seconds: "
        "must be between 0 and 20, got 30\n"
    )


def _degraded(reply: tuple[int, dict[str, Any]]) -> tuple[int, dict[str, Any]] | None:
    return reply if reply[1]["status"] == "DEGRADED" else None
