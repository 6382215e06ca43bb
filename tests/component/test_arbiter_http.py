"""The supervisor's HTTP contract, served by the real arbiter with fake workers."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_agent import DEGRADED_REDIS_ERRORS, REDIS_DOWN, RUN_S, FakeAgent
from helpers import wait_until
from prometheus_client.parser import text_string_to_metric_families

import nanogrid
from nanogrid.common.config import from_dict
from nanogrid.supervisor.arbiter import Arbiter

WORKER_FIELDS = {
    "id", "pid", "alive", "restarts", "tasksDone", "running", "currentRequestIds",
    "currentRequestId",
}


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[FakeAgent]:
    with FakeAgent(tmp_path) as running:
        yield running


def status_when(agent: FakeAgent, holds: Callable[[dict], bool]) -> dict:
    """The first /status snapshot (within 5 s) of which ``holds`` is true: that one, not a
    later one, where workers may have moved on."""
    def snapshot() -> dict | None:
        status = agent.status()
        return status if holds(status) else None

    return wait_until(snapshot, timeout=5)


def both(status: dict, holds: Callable[[dict], Any]) -> bool:
    """Whether ``holds`` of both workers of ``status`` (none is listed before they spawn)."""
    return len(status["workers"]) == 2 and all(holds(w) for w in status["workers"])


def test_status_health_and_metrics_follow_the_contract(agent: FakeAgent) -> None:
    agent.behave("busy")  # each worker runs one task, then idles
    agent.start()
    running = status_when(agent, lambda s: both(s, lambda w: w["currentRequestId"]))
    assert {w["currentRequestId"] for w in running["workers"]} == {
        f"req-{w['id']}-{w['pid']}" for w in running["workers"]}
    for worker in running["workers"]:
        assert worker["running"] == 1
        assert worker["currentRequestIds"] == [worker["currentRequestId"]]
    capacity = running["capacity"]
    assert set(capacity) >= {"memoryMb", "memoryInUseMb", "running", "maxConcurrent"}
    assert capacity["memoryMb"] > 0 and capacity["maxConcurrent"] > 0
    assert running["pools"] == {"python": pools(busy=2)}
    assert running["sandboxes"]["busy"] == 2 and running["warmUp"]["state"] == "warm"

    done = status_when(agent, lambda s: both(s, lambda w: w["tasksDone"] == 1))
    assert [w["id"] for w in done["workers"]] == [0, 1]
    for worker in done["workers"]:
        assert set(worker) >= WORKER_FIELDS
        assert worker["alive"] is True and worker["restarts"] == 0
        assert worker["currentRequestId"] is None and isinstance(worker["pid"], int)
        assert worker["running"] == 0 and worker["currentRequestIds"] == []
    assert done["pools"] == {"python": pools(warm=2, idleSpecialized=2)}
    assert {k: done["sandboxes"][k] for k in ("warm", "busy", "idleSpecialized")} == {
        "warm": 2, "busy": 0, "idleSpecialized": 2}
    assert done["sandboxes"]["maxIdle"] == done["capacity"]["maxConcurrent"]
    assert done["sandboxes"]["maxIdleMb"] >= 256
    assert done["configPath"] == str(agent.config_path.resolve())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+\+00:00", done["configLoadedAt"])
    assert done["uptimeSeconds"] >= RUN_S
    isolation = done["isolation"]["process"]  # as root (CI): every namespace holds
    assert set(isolation) == {"holds", "missing"} and isolation["missing"] == {}
    assert set(isolation["holds"]) == {"rlimits", "cgroup", "uid", "mount", "ipc", "network", "pid"}

    code, body = agent.get("/health")
    assert code == 200 and json.loads(body)["status"] == "UP"

    metrics = agent.get("/metrics")[1]
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    invocations = 'nanogrid_invocations_total{runtime="python",status="SUCCESS",error_type=""}'
    assert f"{invocations} 2" in metrics
    assert 'nanogrid_invocation_duration_seconds_count{runtime="python"} 2' in metrics
    assert 'nanogrid_invocation_duration_seconds_bucket{runtime="python",le="1"} 2' in metrics
    peak = "nanogrid_invocation_peak_memory_bytes_bucket"
    assert f'{peak}{{runtime="python",le="8388608"}} 2' in metrics
    assert f'{peak}{{runtime="python",le="4194304"}} 0' in metrics
    assert 'nanogrid_sandboxes{runtime="python",state="idle_specialized"} 2' in metrics
    assert 'nanogrid_sandboxes{runtime="python",state="idle_generic"} 0' in metrics
    assert 'nanogrid_sandboxes_lent{runtime="python"} 0' in metrics
    assert 'nanogrid_sandboxes_shrunk{runtime="python"} 0' in metrics
    assert "nanogrid_warming 0" in metrics
    assert 'nanogrid_invocation_starts_total{runtime="python",start="cold"} 2' in metrics
    assert 'nanogrid_tips_total{runtime="python",tip_code="OVER_PROVISIONED"} 2' in metrics
    # 256 MiB for 1 s each, of which 224 MiB would have been saved at 32 MiB
    assert value(families, "nanogrid_memory_allocated_byte_seconds_total") == 2 * 256 * 2**20
    assert value(families, "nanogrid_tip_savable_byte_seconds_total") == 2 * 224 * 2**20
    assert "nanogrid_worker_restarts_total 0" in metrics
    assert "nanogrid_workers_alive 2" in metrics
    memory_bytes = done["capacity"]["memoryMb"] * 2**20
    assert f"nanogrid_capacity_memory_bytes {memory_bytes}" in metrics
    assert "nanogrid_capacity_running 0" in metrics
    assert 'nanogrid_task_phase_seconds_bucket{phase="fetch",le="0.0005"} 2' in metrics
    assert 'nanogrid_task_phase_seconds_count{phase="queued"} 2' in metrics
    assert 'nanogrid_task_phase_seconds_sum{phase="total"} ' in metrics
    assert "nanogrid_degraded 0" in metrics and "nanogrid_outbox_results 0" in metrics
    pids = {str(w["id"]): w["pid"] for w in done["workers"]}
    worker_cpu = {s.labels["worker"] for s in families["nanogrid_worker_cpu_seconds"].samples}
    assert worker_cpu == set(pids)
    assert value(families, "process_resident_memory_bytes") > 10 * 2**20
    assert value(families, "process_start_time_seconds") > 1.7e9
    (build,) = families["nanogrid_build_info"].samples
    assert build.value == 1 and build.labels["version"]


def pools(**counts: int) -> dict[str, int]:
    """A runtime's /status ``pools`` entry: the counts given, the others 0."""
    return {"warm": 0, "busy": 0, "idleGeneric": 0, "idleSpecialized": 0, "lent": 0,
            "shrunk": 0, **counts}


def value(families: dict, name: str) -> float:
    """The one sample of an unlabelled (or single-series) family, as the parser reads it."""
    family = name.removesuffix("_total")
    (sample,) = [s for s in families[family].samples if s.name == name]
    return sample.value


def test_the_exposition_parses_with_prometheus_client(agent: FakeAgent) -> None:
    """Every line of /metrics is valid text exposition (prometheus_client's own parser), each
    histogram's buckets rise to its count, and the duration buckets resolve 1-5 ms."""
    agent.behave("busy")
    agent.start()
    wait_until(lambda: [w["tasksDone"] for w in agent.status()["workers"]] == [1, 1], timeout=5)
    families = list(text_string_to_metric_families(agent.get("/metrics")[1]))
    assert len(families) >= 25
    for family in families:
        assert family.name.startswith(("nanogrid_", "process_")), family.name
        assert family.documentation, family.name
        if family.type != "histogram":
            continue
        series: dict = {}
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            series.setdefault(labels, []).append(sample)
        for samples in series.values():
            buckets = [s.value for s in samples if s.name.endswith("_bucket")]
            count = next(s.value for s in samples if s.name.endswith("_count"))
            assert buckets == sorted(buckets) and buckets[-1] == count
    duration = next(f for f in families if f.name == "nanogrid_invocation_duration_seconds")
    bounds = {s.labels["le"] for s in duration.samples if s.name.endswith("_bucket")}
    assert {"0.001", "0.002", "0.003", "0.004", "0.005"} <= bounds


def test_metrics_content_type_and_unknown_paths(agent: FakeAgent) -> None:
    agent.start()
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.port}/metrics", timeout=5) as reply:
        assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    code, body = agent.get("/nope")
    assert code == 404 and "/status" in json.loads(body)["error"]


def test_health_is_degraded_naming_redis_while_workers_cannot_write_results(
    agent: FakeAgent,
) -> None:
    agent.behave("degraded")
    agent.start()
    code, body = wait_until(  # both workers have said so
        lambda: (reply := agent.get("/health")) and reply[1].count("redis:") == 2 and reply,
        timeout=5,
    )
    health = json.loads(body)
    assert code == 200 and health["status"] == "DEGRADED"
    assert [r.split(":")[0] for r in health["reasons"]] == ["worker 0", "worker 1"]
    assert all(f"redis: results cannot be written ({REDIS_DOWN})" in r for r in health["reasons"])
    workers = agent.status()["workers"]
    assert all(w["degraded"] and w["faults"]["dead_letter_copy"]["count"] == 1 for w in workers)
    assert "no queue" in workers[0]["faults"]["dead_letter_copy"]["last"]
    _, metrics = agent.get("/metrics")
    assert 'nanogrid_worker_faults_total{kind="dead_letter_copy"} 2' in metrics
    assert "nanogrid_degraded 1" in metrics and "nanogrid_workers_degraded 2" in metrics
    # running totals from the beats: each worker's 5 Redis errors counted once, not per beat
    metrics = wait_until(
        lambda: (m := agent.get("/metrics")[1])
        and f'nanogrid_dependency_errors_total{{dependency="redis"}} {2 * DEGRADED_REDIS_ERRORS}'
        in m and m, timeout=5)
    time.sleep(0.3)  # more beats, the same totals
    metrics = agent.get("/metrics")[1]
    assert f'dependency_errors_total{{dependency="redis"}} {2 * DEGRADED_REDIS_ERRORS}' in metrics
    assert 'nanogrid_dependency_errors_total{dependency="sqs"} 0' in metrics
    assert "nanogrid_dead_lettered_total 2" in metrics
    assert "nanogrid_messages_resent_total 6" in metrics  # each worker's 3 re-sends


def test_health_says_warming_until_the_generic_sandboxes_are_made_or_the_bound_passed(
    tmp_path: Path,
) -> None:
    with FakeAgent(tmp_path, "cold", pool={"warm_timeout_seconds": 2}) as agent:
        agent.start()
        agent.wait_for_workers(2)
        code, body = agent.get("/health")
        health = json.loads(body)
        assert code == 200 and health["status"] == "DEGRADED", health
        (reason,) = health["reasons"]
        assert reason.startswith("warming: generic sandboxes ready python 0/2 (at most ")
        warm_up = agent.status()["warmUp"]
        assert warm_up["state"] == "warming" and warm_up["genericReady"] == {"python": "0/2"}
        assert "nanogrid_warming 1" in agent.get("/metrics")[1]
        health = wait_until(lambda: (h := json.loads(agent.get("/health")[1]))["status"] == "UP"
                            and h, timeout=5)
        warm_up = agent.status()["warmUp"]
        assert warm_up["state"] == "timedOut" and 2 <= warm_up["tookSeconds"] < 4
        agent.wait_for_log(r"serving before the pools are warm: python 0/2 generic sandboxes "
                           r"after pool.warm_timeout_seconds \(2s\)")


def test_the_first_status_lists_every_configured_worker_before_any_runs() -> None:
    """The HTTP server starts before the workers fork: its first snapshot has their slots."""
    arbiter = Arbiter(from_dict({"workers": 2, "runner": "process"}), worker_main=lambda *a: 0)
    arbiter.publish_status()
    workers = arbiter.status_snapshot()["workers"]
    assert [(w["id"], w["alive"], w["state"]) for w in workers] == [
        (0, False, "waiting"), (1, False, "waiting")]


def test_health_is_down_while_no_worker_could_boot(agent: FakeAgent) -> None:
    agent.behave("bootfail")
    agent.start()
    wait_until(lambda: agent.events("spawn"), timeout=5)
    code, body = agent.get("/health")
    assert code == 503 and json.loads(body)["status"] == "DOWN"
    workers = agent.status()["workers"]
    assert [w["alive"] for w in workers] == [False, False]


def test_port_in_use_is_one_line_and_exit_1(agent: FakeAgent) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent.write_config(http={"host": "127.0.0.1", "port": port})
        with pytest.raises(TimeoutError):
            agent.start()
        assert agent.wait(timeout=5) == 1
    agent.wait_for_log(rf"http: cannot listen on 127\.0\.0\.1:{port}: Address already in use")
    assert agent.events("spawn") == []


def test_a_missing_isolation_is_one_warning_line_and_in_status(tmp_path: Path) -> None:
    with FakeAgent(tmp_path, process={"network": "host", "metadata_service": "allowed"}) as agent:
        agent.start()
        agent.wait_for_workers(2)
        isolation = agent.status()["isolation"]["process"]
    metadata = "functions can reach 169.254.169.254: process.metadata_service is allowed"
    assert isolation["missing"] == {"network": "process.network is host",
                                    "metadata service": metadata}
    assert "network" not in isolation["holds"] and "pid" in isolation["holds"]
    lines = [line for line in agent.log.read_text().splitlines() if "[ISOLATION]" in line]
    assert len(lines) == 1 and "WARNING" in lines[0]
    assert lines[0].endswith("the process runner's sandboxes run without: "
                             f"network (process.network is host), metadata service ({metadata})")


def test_head_is_answered_like_get_without_a_body(agent: FakeAgent) -> None:
    agent.start()
    agent.wait_for_workers(2)
    for path in ("/health", "/status", "/metrics", "/nowhere"):
        request = urllib.request.Request(f"http://127.0.0.1:{agent.port}{path}", method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                code, length, body = reply.status, reply.headers["Content-Length"], reply.read()
        except urllib.error.HTTPError as exc:
            code, length, body = exc.code, exc.headers["Content-Length"], exc.read()
        got = agent.get(path)
        assert (code, body) == (got[0], b"")
        assert int(length) > 0
    version = nanogrid.__version__  # the one place it is set (pyproject.toml reads it)
    assert agent.status()["version"] == version
    agent.wait_for_log(rf"supervisor \d+ starting: nanogrid {re.escape(version)}, 2 workers")
