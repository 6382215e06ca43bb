"""The embedded stack's processes: redis-server, moto_server and the agent on loopback,
brought up, checked and stopped together; signals while it runs."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import shutil
import signal
import socket
import sys
import time
import urllib.error
from pathlib import Path
from typing import Any

from ..supervisor.warmup import WARM, WARMING
from .embedded import (
    AWS_REGION,
    DIRECT,
    MotoServer,
    PeerProcess,
    RedisServer,
    aws_environ,
    moto_answers,
    redis_answers,
    tail,
)
from .localbase import (
    BUCKET,
    STOP_MARGIN_S,
    SUPERVISOR_BIN,
    Interrupted,
    LocalError,
    one_line,
    say,
    shown,
)
from .localplan import Plan

# -- the processes -------------------------------------------------------------------------


class SupervisorProcess(PeerProcess):
    """``bin/nanogrid-supervisor -c <config>``; ready once its /health says UP."""

    name = "nanogrid-supervisor"
    death_signal = signal.SIGTERM  # a killed launcher still lets the agent drain

    def __init__(self, workdir: Path, plan: Plan, log_to_terminal: bool) -> None:
        super().__init__(workdir)
        self.plan = plan
        if log_to_terminal:
            self.log_path = None
        self.stop_timeout = plan.config.drain_timeout_seconds + STOP_MARGIN_S

    def command(self) -> list[str]:
        return [sys.executable, str(SUPERVISOR_BIN), "-c", str(self.plan.config_path)]

    def health(self) -> dict[str, Any]:
        """The /health body (a 503 DOWN has one too)."""
        try:
            with DIRECT.open(f"{self.plan.http_url}/health", timeout=2) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
        return json.loads(body)

    def status(self) -> dict[str, Any]:
        """The /status body."""
        with DIRECT.open(f"{self.plan.http_url}/status", timeout=2) as response:
            return json.loads(response.read())

    def ready(self) -> bool:
        return self.health().get("status") == "UP"


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _bind_error(host: str, port: int) -> OSError | None:
    """Why the agent could not listen on (host, port), or None when it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            # As http.server binds: SO_REUSEADDR, so a port in TIME_WAIT counts as free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        return exc
    return None


class Stack:
    """redis-server, moto_server and the agent, started in order and stopped in reverse."""

    def __init__(self, plan: Plan, run_dir: Path, log_to_terminal: bool) -> None:
        self.plan = plan
        self.run_dir = run_dir
        self.redis = RedisServer(run_dir, plan.redis_port)
        self.moto = MotoServer(run_dir, plan.aws_port)
        self.supervisor = SupervisorProcess(run_dir, plan, log_to_terminal)
        self.started: list[PeerProcess] = []

    def check(self) -> None:
        """Refuse at once what cannot work, before anything is started."""
        if not SUPERVISOR_BIN.exists():
            raise LocalError(f"{SUPERVISOR_BIN} is missing")
        host, port = self.plan.http_host, self.plan.http_port
        error = _bind_error(host, port)
        if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
            raise LocalError(
                f"port {port} (http.port) is taken on {host}: is an agent already running? "
                f"stop it or pass --http-port"
            )
        if error is not None:
            raise LocalError(f"cannot listen on {host}:{port} (http): {error.strerror or error}")

    def bring_up(self, timeout: float) -> None:
        """Peers, the AWS resources and the agent, all within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        self._redis(deadline)
        self._moto(deadline)
        self._environment()
        self._aws_resources()
        self._agent(deadline, timeout)

    def _start(self, peer: PeerProcess, deadline: float, what: str) -> None:
        remaining = max(1.0, deadline - time.monotonic())
        self.started.append(peer)
        try:
            peer.start(timeout=remaining)
        except TimeoutError:
            raise LocalError(
                f"{what} did not answer within {remaining:.0f}s (log: {peer.log_path})"
            ) from None
        except RuntimeError as exc:
            raise LocalError(
                f"{what} could not start: {one_line(str(exc))} (log: {peer.log_path})"
            ) from None

    def _redis(self, deadline: float) -> None:
        port = self.plan.redis_port
        if _listening(port):
            if not _quietly(redis_answers, port):
                raise LocalError(
                    f"port {port} is taken by something that is not redis-server; "
                    f"free it or pass --redis-port"
                )
            say(
                f"redis-server: reusing the one already answering on 127.0.0.1:{port} "
                f"(left running at exit)"
            )
            return
        if shutil.which(self.redis.binary) is None and not Path(self.redis.binary).exists():
            raise LocalError("redis-server is not installed: run dev/setup --local")
        self._start(self.redis, deadline, "redis-server")
        say(f"redis-server: started on 127.0.0.1:{port} (pid {self.redis.pid})")

    def _moto(self, deadline: float) -> None:
        port = self.plan.aws_port
        if _listening(port):
            if not _quietly(moto_answers, self.plan.aws_endpoint):
                raise LocalError(
                    f"port {port} is taken by something that is not moto_server; "
                    f"free it or pass --aws-port"
                )
            say(
                f"moto_server: reusing the one already answering on 127.0.0.1:{port} "
                f"(left running at exit)"
            )
            return
        if importlib.util.find_spec("moto") is None:
            raise LocalError("moto (the AWS emulator) is not installed: run dev/setup --local")
        self._start(self.moto, deadline, "moto_server")
        say(f"moto_server: started on 127.0.0.1:{port} (pid {self.moto.pid}; SQS, S3, CloudWatch)")

    def _environment(self) -> None:
        """Point boto3 (here, in the agent and in its workers) at the emulator, and only there."""
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            os.environ.pop(name, None)
        os.environ.update(aws_environ(self.plan.aws_endpoint))
        if os.environ.get("http_proxy") or os.environ.get("HTTP_PROXY"):
            bypass = os.environ.get("no_proxy") or os.environ.get("NO_PROXY") or ""
            merged = ",".join(filter(None, [bypass, "127.0.0.1", "localhost"]))
            os.environ["no_proxy"] = os.environ["NO_PROXY"] = merged

    def _aws_resources(self) -> None:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            sqs = boto3.client("sqs", region_name=AWS_REGION)
            for name in self.plan.queue_names:
                sqs.create_queue(QueueName=name)
            s3 = boto3.client("s3", region_name=AWS_REGION)
            try:
                s3.create_bucket(
                    Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": AWS_REGION}
                )
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                    raise
        except (BotoCoreError, ClientError) as exc:
            raise LocalError(
                f"cannot create the queues and the bucket in moto_server: {one_line(str(exc))}"
            ) from None
        say(
            f"AWS: queues {', '.join(self.plan.queue_names)} and bucket {BUCKET} ready at "
            f"{self.plan.aws_endpoint}"
        )

    def _agent(self, deadline: float, timeout: float) -> None:
        say(
            f"agent: {shown(SUPERVISOR_BIN)} -c {shown(self.plan.config_path)} "
            f"({self.plan.config.workers} workers, runner {self.plan.config.runner})"
            + (f", log: {self.supervisor.log_path}" if self.supervisor.log_path else "")
        )
        remaining = max(1.0, deadline - time.monotonic())
        self.started.append(self.supervisor)
        try:
            self.supervisor.start(timeout=remaining)
        except TimeoutError:
            where = f" (log: {self.supervisor.log_path})" if self.supervisor.log_path else ""
            error = _last_error(self.supervisor.log_path)
            why = f"; last error: {error}" if error else ""
            raise LocalError(
                f"the agent did not report UP on {self.plan.http_url}/health "
                f"within {timeout:.0f}s of the start{why}{where}"
            ) from None
        except RuntimeError as exc:
            raise LocalError(self._agent_exit(exc)) from None
        say(f"agent: UP (pid {self.supervisor.pid}), {self.plan.http_url}/health")

    def _agent_exit(self, exc: RuntimeError) -> str:
        last = tail(self.supervisor.log_path, 1)
        head = str(exc).split(":", 1)[0]  # "nanogrid-supervisor exited with code N"
        where = f" (log: {self.supervisor.log_path})" if self.supervisor.log_path else ""
        return f"{head} during start-up" + (f": {one_line(last)}" if last else "") + where

    def wait_for_warm_pools(self, timeout: float) -> None:
        """Wait (at most ``timeout``) for every worker and the agent's warm-up (/status
        ``warmUp``: each runtime's generic sandboxes ready, or the agent's own bound passed),
        so the demo shows the warm path."""
        cfg = self.plan.config
        deadline = time.monotonic() + timeout
        state = WARMING
        while time.monotonic() < deadline:
            try:
                status = self.supervisor.status()
                workers = sum(1 for worker in status["workers"] if worker["alive"])
                state = status["warmUp"]["state"]
            except (OSError, ValueError, KeyError, TypeError):
                workers = 0
            if workers >= cfg.workers and state != WARMING:
                break
            time.sleep(0.1)
        if state == WARM:
            say(f"agent: {cfg.workers} workers, every runtime's generic sandboxes ready")
        else:
            say(f"agent: pools still warming after {timeout:g}s; first calls may be cold starts")

    def stop(self) -> None:
        """The agent first (SIGTERM, it drains), then the peers this run started."""
        if self.supervisor.alive:
            timeout = self.plan.config.drain_timeout_seconds
            say(f"stopping the agent (SIGTERM; it drains for at most {timeout:g}s)")
            self.supervisor.stop()
        names = []
        for peer in reversed(self.started):
            if peer is not self.supervisor and peer.alive:
                peer.stop()
                names.append(peer.name)
        if names:
            say(f"stopped {' and '.join(names)}")


def _quietly(check: Any, *args: Any) -> bool:
    try:
        return bool(check(*args))
    except (OSError, ValueError):
        return False


def _last_error(log_path: Path | None) -> str | None:
    """The message of the agent's last ERROR (or worse) log line, a worker's first: it says
    why (the arbiter's only that the worker could not boot)."""
    errors = []
    for line in tail(log_path, 200).splitlines():
        fields = line.split(" | ", 4)
        if len(fields) == 5 and fields[1].strip() in ("ERROR", "CRITICAL"):
            errors.append((fields[2].strip() != "arbiter", fields[4].strip()))
    return max(reversed(errors), key=lambda error: error[0])[1] if errors else None



# -- signals -------------------------------------------------------------------------------


class SignalGate:
    """The first SIGINT/SIGTERM/SIGHUP raises Interrupted; later ones, while stopping, are
    passed to the agent as SIGTERM (a second one makes it kill the workers still draining)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.armed = True
        self.agent: PeerProcess | None = None

    def install(self) -> None:
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)

    def disarm(self) -> None:
        self.armed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.armed:
            self.armed = False
            raise Interrupted(signum)
        pid = self.agent.pid if self.agent is not None and self.agent.alive else None
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


