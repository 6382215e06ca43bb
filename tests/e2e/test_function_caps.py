"""Per-function caps across hosts, end to end: two agents (two hosts) on one queue, a cap of
3 on F set with bin/nanogrid-limits, a burst of F and of another function G at once, and one
host SIGKILLed in a second burst."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from typing import Any

from helpers import wait_until
from supervised import ROOT, Agent

from nanogrid.devtools.overlap import most_at_once

CAP = 3
F_CODE = "import time\ntime.sleep(0.5)\nprint('f')\n"
G_CODE = "import time\ntime.sleep(0.1)\nprint('g')\n"


def limits(agent: Agent, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "nanogrid-limits"), "-c", str(agent.config_path),
         *args],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def finished(result: dict[str, Any]) -> float:
    return datetime.fromisoformat(result["finishedAt"].replace("Z", "+00:00")).timestamp()


def burst(agent: Agent, tasks: list[dict[str, Any]], timeout: float = 90) -> dict[str, float]:
    """Send every task at once (10 a call); requestId -> when it was sent (epoch)."""
    sent = {}
    sqs = agent.aws.sqs()
    for start in range(0, len(tasks), 10):
        chunk = tasks[start:start + 10]
        sqs.send_message_batch(QueueUrl=agent.queue_url, Entries=[
            {"Id": str(i), "MessageBody": json.dumps(t)} for i, t in enumerate(chunk)])
        sent.update((t["requestId"], time.time()) for t in chunk)
    return sent


def results(agent: Agent, ids: list[str], timeout: float = 90) -> list[dict[str, Any]]:
    return [agent.result(request_id, timeout=timeout) for request_id in ids]


def test_a_cap_holds_across_two_hosts_and_other_functions_flow(agents: Any) -> None:
    first = agents(workers=2).start()
    second = agents(beside=first, workers=2, process={"sandbox_uid_base": 63000}).start()
    assert limits(first, "set", "F", str(CAP)) == f"F: at most {CAP} at once on all hosts\n"
    assert limits(first, "get", "F") == f"F: {CAP}\n"
    f_key, g_key = first.deploy(F_CODE), first.deploy(G_CODE)

    for _ in range(2):  # the first burst makes G's sandboxes: the second is the baseline
        sent = burst(first, [first.task(g_key, functionId="G") for _ in range(30)])
        uncapped = [finished(r) - sent[r["requestId"]] for r in results(first, list(sent))]

    f_tasks = [first.task(f_key, functionId="F") for _ in range(30)]
    g_tasks = [first.task(g_key, functionId="G") for _ in range(30)]
    mixed = [t for pair in zip(f_tasks, g_tasks, strict=True) for t in pair]
    sent = burst(first, mixed)
    f_results = results(first, [t["requestId"] for t in f_tasks])
    g_results = results(first, [t["requestId"] for t in g_tasks])

    assert {(r["status"], r["attempt"], r["stdout"]) for r in f_results} == {("SUCCESS", 1, "f\n")}
    assert {(r["status"], r["attempt"]) for r in g_results} == {("SUCCESS", 1)}
    assert most_at_once(f_results) == CAP  # never more across both hosts, and the cap is used
    hosts = {r["workerId"].rsplit(":", 1)[0] for r in f_results}
    pids = {r["workerId"] for r in f_results}
    assert len(hosts) == 1 and len(pids) >= 3  # one machine, but both agents ran F
    g_p50 = statistics.median(finished(r) - sent[r["requestId"]] for r in g_results)
    alone_p50 = statistics.median(uncapped)
    deferrals = sum(a.status()["concurrency"]["functions"]["F"]["deferrals"]
                    for a in (first, second))
    print(f"G p50 {g_p50 * 1000:.0f} ms beside F's burst, {alone_p50 * 1000:.0f} ms alone; F "
          f"done in {max(map(finished, f_results)) - min(sent.values()):.1f}s with "
          f"{deferrals} deferrals ({deferrals / len(f_tasks):.1f} per F message)")
    # G is not held behind F's burst (11-15 s): twice its time alone, or a second more on a
    # loaded host, where F's deferrals cost the emulator's CPU too (CI: 1.09 s against 0.32).
    assert g_p50 <= max(2 * alone_p50, alone_p50 + 1.0)

    for agent in (first, second):
        log = agent.log.read_text()
        assert "gave up" not in log and "dead-letter" not in log
    status = first.status()["concurrency"]["functions"]["F"]
    assert status["cap"] == CAP and status["deferrals"] > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{first.port}/metrics", timeout=5) as reply:
        metrics = reply.read().decode()
    assert 'nanogrid_function_deferrals_total{function_id="F"}' in metrics
    assert limits(first, "ls").startswith(f"F\t{CAP}\t")


def test_a_killed_hosts_slots_come_back_and_the_cap_holds(agents: Any) -> None:
    first = agents(workers=2).start()
    second = agents(beside=first, workers=2, process={"sandbox_uid_base": 63000}).start()
    limits(first, "set", "F", str(CAP))
    f_key = first.deploy(F_CODE)
    tasks = [first.task(f_key, functionId="F") for _ in range(30)]
    burst(first, tasks)
    ids = [t["requestId"] for t in tasks]
    wait_until(lambda: sum(first.redis.exists(f"result:{r}") for r in ids) >= 6, timeout=30,
               what="the burst under way")
    second.close()  # SIGKILL: its supervisor, workers and sandboxes, mid-burst
    killed_at = time.time()
    done = results(first, ids, timeout=120)
    assert {r["status"] for r in done} == {"SUCCESS"}
    assert max(r["attempt"] for r in done) <= 2  # a run killed mid-way is tried once more
    assert most_at_once(done) <= CAP
    after = [r for r in done if finished(r) - r["durationMillis"] / 1000 > killed_at + 3]
    assert most_at_once(after) == CAP  # the dead host's slots came back within its lease
    assert "gave up" not in first.log.read_text()
