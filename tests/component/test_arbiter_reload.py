"""SIGHUP on the real arbiter (fake workers), and what it tells systemd along the way."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_agent import FakeAgent
from helpers import free_port, wait_until


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[FakeAgent]:
    with FakeAgent(tmp_path) as running:
        yield running


def test_sighup_to_a_different_worker_count(agent: FakeAgent) -> None:
    agent.start()
    old = agent.wait_for_workers(2)
    loaded_at = agent.status()["configLoadedAt"]
    agent.write_config(workers=3)
    agent.signal(signal.SIGHUP)
    new = wait_until(lambda: len(p := agent.running_pids() - old) == 3 and p, timeout=10)
    # /status is a snapshot of the arbiter's last turn: it may trail the processes a little.
    def caught_up() -> dict | None:
        status = agent.status()
        return status if {w["pid"] for w in status["workers"]} == new else None

    status = wait_until(caught_up, timeout=5)
    assert [w["id"] for w in status["workers"]] == [0, 1, 2]
    assert {w["pid"] for w in status["workers"]} == new
    assert all(w["restarts"] == 0 for w in status["workers"])
    assert status["workersConfigured"] == 3 and status["configLoadedAt"] > loaded_at
    agent.wait_for_log("2 old workers drain")
    assert len(agent.events("exit")) == 2  # the old ones drained: none was killed

    agent.write_config(workers=1)
    agent.signal(signal.SIGHUP)
    # One process left, of the new generation: old worker 0 drains before its slot refills.
    def one_new_worker() -> set[int] | None:
        pids = agent.running_pids()
        return pids if len(pids) == 1 and not pids & new else None

    (last,) = wait_until(one_new_worker, timeout=10)
    wait_until(lambda: [w["pid"] for w in agent.status()["workers"]] == [last], timeout=5)


def test_sighup_with_a_broken_file_keeps_the_old_config(agent: FakeAgent) -> None:
    agent.start()
    pids = agent.wait_for_workers(2)
    before = agent.status()
    agent.config_path.write_text("workers: 2\nqueue:\n  wait_time_seconds: 99\n")
    agent.signal(signal.SIGHUP)
    agent.wait_for_log(r"reload refused, still running on the config loaded at .*: "
                       r"queue\.wait_time_seconds: must be between 0 and 20, got 99")
    agent.config_path.write_text("workers: [\n")
    agent.signal(signal.SIGHUP)
    agent.wait_for_log(r"reload refused.*not valid YAML")
    # Valid YAML the workers could not boot on (the Docker runner's check) is refused too.
    agent.write_config(runner="docker", docker={"socket_dir": "/var/lib/" + "x" * 40})
    agent.signal(signal.SIGHUP)
    agent.wait_for_log(r"reload refused.*docker\.socket_dir: .* is too long")
    # So is a work_dir the sandbox users could never reach (agent.dir is pytest's, 0700).
    agent.write_config(paths={"work_dir": str(agent.dir / "work")})
    agent.signal(signal.SIGHUP)
    agent.wait_for_log(r"reload refused.*paths\.work_dir: sandbox users cannot reach")
    assert agent.running_pids() == pids
    assert agent.status()["configLoadedAt"] == before["configLoadedAt"]
    assert agent.get("/health")[0] == 200
    metrics = agent.get("/metrics")[1]
    assert 'nanogrid_config_reloads_total{result="refused"} 4' in metrics


def test_reload_applies_http_address_and_log_level(agent: FakeAgent) -> None:
    agent.start()
    agent.wait_for_workers(2)
    old_port, new_port = agent.port, free_port()
    agent.write_config(http={"host": "127.0.0.1", "port": new_port},
                       log={"level": "DEBUG", "file": str(agent.log)})
    agent.signal(signal.SIGHUP)
    agent.wait_for_log(rf"\[HTTP\] listening on 127\.0\.0\.1:{new_port}")
    agent.port = new_port
    assert agent.get("/health")[0] == 200
    agent.wait_for_log(r"DEBUG .* \[HTTP\] .*GET /health")
    wait_until(lambda: refused(old_port), timeout=3, what="the old port to close")


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_systemd_hears_ready_reloading_stopping_and_watchdog(agent: FakeAgent) -> None:
    address = f"@nanogrid-test-{uuid.uuid4().hex}"
    datagrams: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind("\0" + address[1:])
        notify.settimeout(0.2)
        done = threading.Event()

        def listen() -> None:  # read as systemd does, all along: the queue holds 10 datagrams
            while not done.is_set():
                with contextlib.suppress(TimeoutError):
                    datagrams.append(notify.recv(4096).decode())

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        try:
            agent.start(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})
            agent.wait_for_workers(2)
            # systemd holds a reload until the start is done: READY once the pools are warm.
            wait_until(lambda: any(d.startswith("READY=1") for d in datagrams), timeout=5)
            agent.signal(signal.SIGHUP)
            agent.wait_for_log("2 old workers drain")
            # READY again once the new workers booted and made their generic sandboxes
            wait_until(lambda: sum(d.startswith("READY=1") for d in datagrams) == 2, timeout=5)
            agent.signal(signal.SIGTERM)
            assert agent.wait(timeout=5) == 0
        finally:
            done.set()
            listener.join()
    states = [d.split("\n")[0].split("=")[0] for d in datagrams if "WATCHDOG" not in d]
    states = [s for s in states if s != "STATUS"]
    assert states == ["READY", "RELOADING", "READY", "STOPPING"], datagrams
    # `systemctl start` returns on the first READY: only once the workers have booted.
    assert next(d for d in datagrams if d.startswith("READY=1")).endswith("2/2 workers alive")
    reloading = next(d for d in datagrams if d.startswith("RELOADING=1"))
    assert reloading.split("\n")[1].startswith("MONOTONIC_USEC=")
    assert "WATCHDOG=1" in datagrams
    assert any(d.startswith("STATUS=2/2 workers alive") for d in datagrams)
    assert json.dumps(datagrams)  # all text


def test_a_log_sink_that_fails_at_the_swap_keeps_the_old_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A sink can pass the check and still fail when it is made (the file's directory went
    # away in between; here a "directory" that is a device): the reload is refused, and the
    # old config and its log file stay, instead of the loop dying on it.
    from loguru import logger

    from nanogrid.common import logsink
    from nanogrid.common.config import load
    from nanogrid.supervisor import arbiter as arbiter_module

    old_log = tmp_path / "old.log"
    path = tmp_path / "agent.yaml"
    path.write_text(f"queue: {{url: 'http://127.0.0.1:1/0/q'}}\nrunner: process\n"
                    f"log: {{file: {old_log}}}\n")
    old = load(path)
    logsink.install(old.log, "arbiter")
    broken = dataclasses.replace(old, log=dataclasses.replace(old.log, file="/dev/null/x.log"))
    monkeypatch.setattr(arbiter_module, "load_checked", lambda _: (broken, None))
    agent = arbiter_module.Arbiter(old, worker_main=lambda *a: 0)
    try:
        agent.reload()
        assert agent.config is old
        logger.info("after the refused reload")
        text = old_log.read_text()
        assert "reload refused, still running on the config loaded at" in text
        assert "log.file: cannot log to /dev/null/x.log" in text
        assert "after the refused reload" in text
        assert 'nanogrid_config_reloads_total{result="refused"} 1' in agent.metrics.render()
    finally:
        logger.remove()
