"""The real arbiter with fake workers, run as its own process by the arbiter tests.

    python fake_agent.py CONFIG DIR

``FakeAgent`` starts it in its own session and talks to it over signals, HTTP and files.
Behaviours: ``steady`` (beats until SIGTERM), ``busy`` (runs one task of RUN_S first, even
through SIGTERM), ``crash`` (exits 1 after booting), ``bootfail`` (exits EXIT_BOOT_ERROR),
``raise`` (raises), ``hang`` (stops beating, ignores SIGTERM), ``stubborn`` (ignores SIGTERM),
``degraded`` (reports a failed dead-letter copy, then beats saying Redis cannot take results),
``cold`` (makes no sandboxes: the pools never warm up). Every other fake worker puts its share
of generic sandbox records on the host's board as it boots (the real board; no sandboxes).
Each fake worker reads its behaviour from DIR/behaviour when it starts (the test may change
the file between spawns) and appends what it does to DIR/events, one line per event:
``<event> <index> <pid> <monotonic seconds>``. The sandbox cleanup is faked the same way.
The arbiter's timings are shortened so a test sees a murder or a backoff in about a second.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nanogrid import runners  # noqa: E402
from nanogrid.common.config import Config  # noqa: E402
from nanogrid.common.exitcodes import EXIT_BOOT_ERROR  # noqa: E402
from nanogrid.runners.lending import SandboxBoard  # noqa: E402
from nanogrid.runners.pool import warm_share  # noqa: E402
from nanogrid.supervisor import arbiter, workerstate  # noqa: E402
from nanogrid.supervisor.configcheck import load_checked  # noqa: E402
from nanogrid.worker.hostshare import HostShare  # noqa: E402
from nanogrid.worker.result import Result, Timings  # noqa: E402
from nanogrid.worker.status import StatusReporter  # noqa: E402

BEAT_S = 0.05
RUN_S = 1.0
"""How long a fake task of the ``busy`` behaviour runs."""
REDIS_DOWN = "READONLY You can't write against a read only replica."
DEGRADED_REDIS_ERRORS = 5
"""Redis errors a ``degraded`` worker counts up to, one per beat."""


def record(directory: Path, event: str, index: int) -> None:
    with (directory / "events").open("a") as events:
        events.write(f"{event} {index} {os.getpid()} {time.monotonic():.3f}\n")


def fake_worker(directory: Path):  # noqa: ANN201 - returns the worker main
    def main(config: Config, index: int, status_fd: int, host: HostShare) -> int:
        behaviour_file = directory / "behaviour"
        behaviour = behaviour_file.read_text().strip() if behaviour_file.exists() else "steady"
        record(directory, "spawn", index)
        status = StatusReporter(status_fd)
        stopping: list[int] = []

        def on_term(signum: int, frame: object) -> None:
            record(directory, "term", index)
            stopping.append(signum)

        ignores_term = behaviour in ("stubborn", "hang")
        signal.signal(signal.SIGTERM, signal.SIG_IGN if ignores_term else on_term)
        if behaviour == "bootfail":
            return EXIT_BOOT_ERROR
        if behaviour == "raise":
            raise RuntimeError("the fake worker broke")
        board = host.board.reopened()
        status.booted()
        if behaviour != "cold":
            for name, runtime in config.runtimes.items():
                for _ in range(warm_share(runtime.warm, config.workers, index)):
                    board.put(index, name, None, {"fake": True})
        if behaviour == "crash":
            time.sleep(0.1)
            return 1
        if behaviour == "busy":
            run_task(status, board, index)
            record(directory, "finished", index)
        degraded, counts = [], None
        if behaviour == "degraded":
            status.fault("dead_letter_copy", "dead-letter copy of message m1 failed: no queue")
            degraded = [f"redis: results cannot be written ({REDIS_DOWN}); taking no new work"]
            counts = {"sqs": 0, "s3": 0, "redis": 0, "cloudwatch": 0, "deadLettered": 1,
                      "resent": 3}
        started = time.monotonic()
        while not stopping:
            if counts is not None:  # running totals: Redis fails once per beat
                counts["redis"] = min(counts["redis"] + 1, DEGRADED_REDIS_ERRORS)
            if behaviour != "hang" or time.monotonic() - started < 0.3:
                status.heartbeat(degraded, counts)
            time.sleep(BEAT_S)
        record(directory, "exit", index)
        return 0

    return main


def run_task(status: StatusReporter, board: SandboxBoard, index: int) -> None:
    """A task that finishes even when SIGTERM arrives while it runs, in one of the host's
    generic sandboxes (its own: ``prefer``)."""
    request_id = f"req-{index}-{os.getpid()}"
    taken = board.take("python", "fn@1", prefer=index)
    assert taken is not None, "no generic python sandbox on the board"
    status.task_started(request_id)  # its sandbox is busy by then: /status shows both
    deadline = time.monotonic() + RUN_S
    while time.monotonic() < deadline:
        status.heartbeat()
        time.sleep(BEAT_S)
    status.task_finished(Result(
        request_id=request_id, function_id="fn", runtime="python", status="SUCCESS",
        duration_millis=RUN_S * 1000, peak_memory_bytes=6 * 2**20, cold_start=True,
        memory_mb=256, recommended_memory_mb=32, tip_code="OVER_PROVISIONED",
        stdout="not sent to the arbiter",
        timings=Timings(queued_ms=1.5, fetch_ms=0.4, run_ms=RUN_S * 1000,
                        total_ms=RUN_S * 1000 + 3),
    ))
    board.give_back(taken[0], "fn@1", healthy=True)


class FakeAgent:
    """Controls one fake agent process: config, behaviour, signals, HTTP, events."""

    def __init__(self, directory: Path, behaviour: str = "steady", **settings: Any) -> None:
        self.dir = directory
        self.config_path = directory / "agent.yaml"
        self.log = directory / "arbiter.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.behave(behaviour)
        self.write_config(**settings)

    def write_config(self, **settings: Any) -> None:
        config: dict[str, Any] = {
            "workers": 2,
            "runner": "process",
            "drain_timeout_seconds": 3,
            "heartbeat_timeout_seconds": 1,
            "queue": {"url": "http://127.0.0.1:1/000000000000/q", "wait_time_seconds": 0},
            "http": {"host": "127.0.0.1", "port": 0},
            "log": {"level": "INFO", "file": str(self.log)},
            "aws": {"region": "ap-northeast-2"},  # a reload refuses a config naming none
            "runtimes": {"python": {"warm": 2}},
        }
        config.update(settings)
        self.config_path.write_text(yaml.safe_dump(config))

    def behave(self, behaviour: str) -> None:
        """What the workers spawned from now on do."""
        (self.dir / "behaviour").write_text(behaviour)

    def start(self, env: dict[str, str] | None = None) -> FakeAgent:
        with (self.dir / "stderr.log").open("ab") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, __file__, str(self.config_path), str(self.dir)],
                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                start_new_session=True, env={**os.environ, **(env or {})},
            )
        self.port = int(self.wait_for_log(r"\[HTTP\] listening on 127\.0\.0\.1:(\d+)").group(1))
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, "start() first"
        return self.process.pid

    def wait_for_log(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            exited = self.process is not None and self.process.poll() is not None
            text = self.log.read_text() if self.log.exists() else ""
            match = re.search(pattern, text)
            if match:
                return match
            if exited or time.monotonic() > deadline:
                why = "the agent exited" if exited else f"waited {timeout}s"
                raise TimeoutError(f"no log line like {pattern!r} ({why}); log:\n{text[-3000:]}")
            time.sleep(0.02)

    def events(self, kind: str | None = None) -> list[tuple[str, int, int, float]]:
        path = self.dir / "events"
        lines = path.read_text().splitlines() if path.exists() else []
        events = [(e, int(i), int(p), float(t)) for e, i, p, t in (ln.split() for ln in lines)]
        return [event for event in events if kind is None or event[0] == kind]

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def status(self) -> dict[str, Any]:
        code, body = self.get("/status")
        assert code == 200, body
        return json.loads(body)

    def running_pids(self) -> set[int]:
        """Pids of the workers alive (booted) according to /status."""
        return {w["pid"] for w in self.status()["workers"] if w["alive"]}

    def wait_for_workers(self, count: int, timeout: float = 10) -> set[int]:
        deadline = time.monotonic() + timeout
        while True:
            pids = self.running_pids()
            workers = self.status()["workers"]
            if len(pids) == count == len(workers):
                return pids
            if time.monotonic() > deadline:
                raise TimeoutError(f"wanted {count} workers alive, /status says {workers}")
            time.sleep(0.02)

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def __enter__(self) -> FakeAgent:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def main() -> int:
    config_path, directory = sys.argv[1], Path(sys.argv[2])
    workerstate.LONG_POLL_MARGIN_S = 0.0
    arbiter.MURDER_GRACE_S = 0.5

    def cleanup_stale(config: Config) -> int:
        record(directory, "cleanup", -1)
        return 0

    runners.cleanup_stale = cleanup_stale
    return arbiter.Arbiter(load_checked(config_path)[0], worker_main=fake_worker(directory)).run()


if __name__ == "__main__":
    sys.exit(main())
