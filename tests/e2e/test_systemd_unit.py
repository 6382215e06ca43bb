"""The shipped unit (systemd/nanogrid-supervisor.service) under a real systemd.

One container (nanogrid/systemd:bookworm, systemd as PID 1) for the module: the agent is
installed as docs/systemd.md says, offline, and runs the process runner against the
session's moto_server and redis-server. Its queue URL is an AWS-shaped one
(`https://sqs.ap-northeast-2.amazonaws.com/...`; AWS_ENDPOINT_URL sends the calls to moto)
and its environment names no region: the region comes from the URL. The tests run in file
order: start, serve, reload, survive a SIGKILL, stop, refuse a config error.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import MotoServer, RedisServer, TaskClient, free_port, http_json, wait_until
from systemd_host import CONFIG, IMAGE, UNIT, HostError, SystemdHost
from wheelbuild import WHEELHOUSE, BuildError, build_wheel

from nanogrid.devtools.invoke import zip_function

HELLO = "print('Hello from systemd')\n"
WATCHDOG_S = 3
DROP_IN = f"[Service]\nWatchdogSec={WATCHDOG_S}\n"
"""The unit's 30 s watchdog is too slow to watch in a test; the pings come every WatchdogSec/2."""


class UnitUnderTest(TaskClient):
    """The agent's unit in the container, with the controller's side of the tests."""

    def __init__(self, host: SystemdHost, aws: MotoServer, redis_url: str) -> None:
        queue_url = aws.new_queue("systemd", visibility_timeout=2)
        super().__init__(aws, redis_url, queue_url, aws.new_bucket("systemd"))
        self.host = host
        self.port = free_port()
        name = queue_url.rsplit("/", 1)[1]
        self.settings: dict[str, Any] = {
            "workers": 2,
            "runner": "process",
            "drain_timeout_seconds": 10,
            "queue": {
                # The region is in the host name only; moto finds the queue by its name.
                "url": f"https://sqs.ap-northeast-2.amazonaws.com/123456789012/{name}",
                "wait_time_seconds": 1,
                "visibility_timeout_seconds": 2,
            },
            "redis": {"url": redis_url},
            "http": {"host": "127.0.0.1", "port": self.port},
            "runtimes": {"python": {"warm": 1}},
            "cloudwatch": {"enabled": True, "flush_seconds": 1},
            "log": {"level": "INFO", "file": "/var/log/nanogrid/agent.log"},
        }
        self.write_config()

    def write_config(self, **changes: Any) -> None:
        self.settings.update(changes)
        self.host.write(CONFIG, yaml.safe_dump(self.settings))

    def health(self) -> tuple[int, dict[str, Any]]:
        return http_json(self.port, "/health")

    def alive(self) -> dict[int, int]:
        _, status = http_json(self.port, "/status")
        return {w["id"]: w["pid"] for w in status["workers"] if w["alive"]}

    def wait_for(self, what: str, check: Any, timeout: float = 20) -> Any:
        return wait_until(check, timeout=timeout, interval=0.05, what=what)

    def timed(self, *args: str, check: bool = True) -> tuple[float, int]:
        """(seconds, exit code) of `systemctl ARGS`; with check, the journal's end on failure."""
        began = time.monotonic()
        done = self.host.systemctl(*args, check=False)
        took = time.monotonic() - began
        if check and done.returncode != 0:
            journal = "\n".join(self.host.journal().splitlines()[-15:])
            pytest.fail(f"systemctl {' '.join(args)} failed; the unit's journal:\n{journal}")
        return took, done.returncode

    def ensure_started(self) -> None:
        if self.host.show("ActiveState")["ActiveState"] != "active":
            self.host.systemctl("start", UNIT)


@pytest.fixture(scope="module")
def unit(docker_engine: Any, aws: MotoServer, redis_server: RedisServer) -> Iterator[UnitUnderTest]:
    if not docker_engine.images.list(name=IMAGE):
        pytest.fail(f"Docker image {IMAGE} missing: run dev/setup", pytrace=False)
    host = SystemdHost()
    error: Exception | None = None
    try:
        booted_s = host.boot()
        began = time.monotonic()
        with tempfile.TemporaryDirectory() as wheels:
            host.install(build_wheel(Path(wheels)))
        installed_s = time.monotonic() - began
        host.write(f"/etc/systemd/system/{UNIT}.service.d/watchdog.conf", DROP_IN, "0644")
        env = {k: v for k, v in aws.environ().items() if "REGION" not in k}
        host.write("/etc/nanogrid/environment", "".join(f"{k}={v}\n" for k, v in env.items()))
        host.systemctl("daemon-reload")
        redis_server.start()
        under_test = UnitUnderTest(host, aws, redis_server.url)
    except (HostError, BuildError) as exc:
        error = exc
    if error is not None:
        host.close()
        hint = f" (is {WHEELHOUSE} complete? run dev/setup)" if "pip" in str(error) else ""
        pytest.fail(f"cannot set up the systemd host: {error}{hint}", pytrace=False)
    print(f"systemd host: booted in {booted_s:.1f}s, agent installed in {installed_s:.1f}s")
    try:
        yield under_test
    finally:
        under_test.redis.close()
        host.close()


def test_unit_file_verifies(unit: UnitUnderTest) -> None:
    done = unit.host.sh(f"systemd-analyze verify /etc/systemd/system/{UNIT}.service", check=False)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_the_unit_runs_the_installed_entry_point(unit: UnitUnderTest) -> None:
    """The venv's console script by its absolute path (the container holds no checkout)."""
    shown = unit.host.show("ExecStart")["ExecStart"]
    assert "path=/opt/nanogrid/bin/nanogrid-supervisor ;" in shown
    reload_check = "ExecReload=/opt/nanogrid/bin/nanogrid-supervisor --check -c " + CONFIG
    assert reload_check in unit.host.systemctl("cat", UNIT).stdout.splitlines()
    assert unit.host.sh("test -x /opt/nanogrid/bin/nanogrid-supervisor", check=False
                        ).returncode == 0


def test_start_returns_once_the_workers_are_up(unit: UnitUnderTest, record_property: Any) -> None:
    took, _ = unit.timed("start", UNIT)
    code, health = unit.health()  # at once: READY=1 must mean serving
    shown = unit.host.show("ActiveState", "StatusText", "NRestarts")
    record_property("systemctl_start_s", round(took, 2))
    print(f"systemctl start returned in {took:.2f}s")
    assert (code, health["status"]) == (200, "UP"), health
    assert len(unit.alive()) == 2
    assert shown == {"ActiveState": "active", "StatusText": "2/2 workers alive", "NRestarts": "0"}


def test_region_comes_from_the_queue_url(unit: UnitUnderTest) -> None:
    environment = unit.host.sh("cat /etc/nanogrid/environment").stdout
    assert "AWS_ENDPOINT_URL=" in environment and "REGION" not in environment
    check = unit.host.sh(
        f"set -a && . /etc/nanogrid/environment && /opt/nanogrid/bin/nanogrid-supervisor "
        f"--check -c {CONFIG}"
    )
    assert "AWS region ap-northeast-2 from queue.url" in check.stdout
    assert "runner process, AWS region ap-northeast-2, config" in unit.host.journal()


def test_a_task_runs(unit: UnitUnderTest) -> None:
    unit.ensure_started()
    key = unit.upload(_zip(HELLO))
    result = unit.call(unit.task(key), timeout=30)
    assert result["status"] == "SUCCESS", result
    assert result["stdout"] == "Hello from systemd\n"
    assert int(result["workerId"].rsplit(":", 1)[1]) in unit.alive().values()
    assert result["peakMemoryBytes"] > 0
    # Delegate=yes holds in the container (cgroup v1): sandboxes get cgroups, not rlimits.
    assert "no cgroups for sandboxes" not in unit.host.journal()
    # RestrictNamespaces=net mnt pid ipc lets the sandboxes have theirs; the container gives
    # the agent no CAP_NET_ADMIN, so their network namespace has no interface up at all.
    isolation = http_json(unit.port, "/status")[1]["isolation"]["process"]
    assert {"mount", "ipc", "network", "pid", "uid", "cgroup"} <= set(isolation["holds"])
    assert set(isolation["missing"]) == {"loopback"}


def test_watchdog_pings_keep_it_alive(unit: UnitUnderTest) -> None:
    unit.ensure_started()
    before = unit.host.show("MainPID", "NRestarts", "WatchdogTimestampMonotonic", "WatchdogUSec")
    assert before["WatchdogUSec"] == f"{WATCHDOG_S}s"
    time.sleep(WATCHDOG_S + 1)  # longer than WatchdogSec: no pings, and systemd would kill it
    after = unit.host.show("MainPID", "NRestarts", "WatchdogTimestampMonotonic", "ActiveState")
    assert int(after["WatchdogTimestampMonotonic"]) > int(before["WatchdogTimestampMonotonic"])
    assert (after["MainPID"], after["NRestarts"]) == (before["MainPID"], before["NRestarts"])
    assert after["ActiveState"] == "active"


def test_reload_applies_a_new_worker_count(unit: UnitUnderTest, record_property: Any) -> None:
    unit.ensure_started()
    main_pid = unit.host.show("MainPID")["MainPID"]
    unit.write_config(workers=3)
    took, _ = unit.timed("reload", UNIT)
    unit.wait_for("3 workers alive", lambda: len(unit.alive()) == 3)
    unit.wait_for(
        "StatusText 3/3",
        lambda: unit.host.show("StatusText")["StatusText"] == "3/3 workers alive",
    )
    record_property("systemctl_reload_s", round(took, 2))
    print(f"systemctl reload returned in {took:.2f}s")
    assert unit.host.show("MainPID")["MainPID"] == main_pid


def test_reload_refuses_a_broken_file_and_keeps_serving(unit: UnitUnderTest) -> None:
    unit.ensure_started()
    main_pid = unit.host.show("MainPID")["MainPID"]
    workers = unit.alive()
    unit.host.write(CONFIG, "workers: 0\n")
    _, code = unit.timed("reload", UNIT, check=False)
    assert code != 0
    assert "workers: must be between 1 and 256, got 0" in unit.host.journal()
    assert unit.host.show("MainPID", "ActiveState") == {
        "MainPID": main_pid,
        "ActiveState": "active",
    }
    assert unit.alive() == workers and unit.health()[0] == 200
    key = unit.upload(_zip(HELLO))
    assert unit.call(unit.task(key), timeout=30)["status"] == "SUCCESS"
    unit.write_config()


def test_sigkilled_supervisor_is_restarted(unit: UnitUnderTest) -> None:
    unit.ensure_started()
    before = unit.host.show("MainPID", "NRestarts")
    old_workers = set(unit.alive().values())
    unit.host.sh(f"kill -9 {before['MainPID']}")

    def restarted() -> dict[str, str] | None:
        now = unit.host.show("MainPID", "NRestarts", "ActiveState")
        fresh = now["MainPID"] not in ("0", before["MainPID"])
        return now if fresh and now["ActiveState"] == "active" else None

    after = unit.wait_for("a new MainPID", restarted, timeout=30)
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    assert unit.health()[1]["status"] == "UP"
    assert not old_workers & set(unit.alive().values())
    pids = {int(line.split(":")[0]) for line in unit.host.agent_processes()}
    assert not old_workers & pids, "a worker of the killed supervisor outlived it"


def test_stop_drains_and_leaves_no_process(unit: UnitUnderTest, record_property: Any) -> None:
    unit.ensure_started()
    key = unit.upload(_zip("import time\ntime.sleep(1.5)\nprint('drained')\n"))
    request_id = unit.send(unit.task(key))
    unit.wait_for("the run to start", lambda: request_id in _running(unit), timeout=20)
    took, _ = unit.timed("stop", UNIT)
    record_property("systemctl_stop_s", round(took, 2))
    print(f"systemctl stop (one 1.5 s run in flight) returned in {took:.2f}s")
    assert unit.result(request_id, timeout=5)["stdout"] == "drained\n"
    shown = unit.host.show("ActiveState", "Result", "ExecMainStatus")
    assert shown == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    assert unit.host.agent_processes() == []


def test_config_error_at_start_does_not_restart(unit: UnitUnderTest) -> None:
    unit.host.systemctl("stop", UNIT)
    restarts = unit.host.show("NRestarts")["NRestarts"]
    unit.write_config(queue={**unit.settings["queue"], "url": "http://127.0.0.1:9/1/q"})
    _, code = unit.timed("start", UNIT, check=False)
    assert code != 0
    time.sleep(3)  # longer than RestartSec=2: a restart would have come
    shown = unit.host.show("ActiveState", "Result", "NRestarts", "ExecMainStatus")
    assert shown == {
        "ActiveState": "failed",
        "Result": "exit-code",
        "NRestarts": restarts,
        "ExecMainStatus": "2",  # EXIT_CONFIG
    }
    assert "config error: aws.region: no AWS region" in unit.host.journal()
    assert unit.host.agent_processes() == []


def _running(unit: UnitUnderTest) -> set[str]:
    _, status = http_json(unit.port, "/status")
    return {w["currentRequestId"] for w in status["workers"]}


def _zip(source: str) -> bytes:
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "main.py").write_text(source)
        return zip_function(Path(directory))
