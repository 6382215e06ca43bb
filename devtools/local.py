"""``nanogrid-local``: the embedded default — redis-server, moto_server and the agent on loopback.

``up`` starts redis-server and moto_server on the ports conf/local.yaml names, creates the
queue, the dead-letter queue and the bucket there, and runs ``bin/nanogrid-supervisor`` on
that config in the foreground (its log on the terminal) until Ctrl-C or SIGTERM. ``demo``
does the same bring-up with the agent in the background (its log in a file), invokes the
examples the way the controller would, prints their results and stops everything.

Ports: a redis-server or moto server already answering on its port is reused (and left
running at exit), so a system redis or an emulator of one's own works; anything else on a
port, or anything on the agent's HTTP port, is refused with one line. ``--redis-port``,
``--aws-port`` and ``--http-port`` (or NANOGRID_LOCAL_{REDIS,AWS,HTTP}_PORT) move them: the
agent then runs on a copy of the config with those ports and with its cache, sandbox and
outbox directories next to the logs, so it does not share them with a default instance.
Two agents in one cgroup still share sandbox cgroup names (w0, w1, ...): run one at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import yaml

from common import config as config_module
from common.errors import ConfigError
from worker.result import Result

from .embedded import (
    AWS_REGION,
    DIRECT,
    MotoServer,
    PeerProcess,
    RedisServer,
    aws_environ,
    free_port,
    moto_answers,
    redis_answers,
    tail,
)

PROG = "nanogrid-local"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "conf" / "local.yaml"
SUPERVISOR_BIN = REPO / "bin" / "nanogrid-supervisor"
INVOKE_BIN = REPO / "bin" / "nanogrid-invoke"
EXAMPLES = REPO / "examples"
BUCKET = "nanogrid-functions"
"""The bucket nanogrid-invoke deploys to by default."""
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

BRING_UP_TIMEOUT_S = 60.0
"""Peers started, queues made and the agent's /health UP within this, or the run fails."""
INVOKE_WAIT_S = 30.0
"""How long the demo waits for each result."""
WARM_UP_TIMEOUT_S = 10.0
"""How long the demo waits for the warm pools before its first call (not a failure)."""
WARM_UP_MARGIN_S = 0.3
STOP_MARGIN_S = 15.0
"""Beyond the agent's drain timeout, before its SIGKILL (the arbiter's own kill wait is 5 s)."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class LocalError(Exception):
    """An expected failure; the message is the one line the operator sees."""


class Interrupted(Exception):  # noqa: N818 - it is a stop request, not an error
    """SIGINT, SIGTERM or SIGHUP arrived: stop everything."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def say(message: str) -> None:
    print(f"{PROG}: {message}", flush=True)


def shown(path: Path) -> str:
    """A path of this checkout relative to the working directory when that is the checkout
    (as the README's commands are typed), else absolute."""
    path = path.resolve()
    if Path.cwd().resolve() == REPO and path.is_relative_to(REPO):
        return str(path.relative_to(REPO))
    return str(path)


# -- the plan: which config, which ports ---------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What to start where: the config the agent runs on and the ports it names."""

    config_path: Path
    config: config_module.Config
    derived: bool
    """True when config_path is a copy of the given config with other ports."""
    redis_port: int
    aws_port: int
    http_host: str
    http_port: int

    @property
    def aws_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.aws_port}"

    @property
    def http_url(self) -> str:
        """Where a client on this host reaches the agent's HTTP server."""
        host = self.http_host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return (
            f"http://[{host}]:{self.http_port}"
            if ":" in host
            else f"http://{host}:{self.http_port}"
        )

    @property
    def queue_names(self) -> list[str]:
        urls = [self.config.queue.url, self.config.queue.dead_letter_url]
        return [url.rstrip("/").rsplit("/", 1)[-1] for url in urls if url]


def _loopback_port(key: str, url: str, default: int | None) -> int:
    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK:
        raise LocalError(
            f"{key} points at {parts.hostname!r}; the embedded default needs 127.0.0.1 "
            f"(use conf/local.yaml or a copy of it)"
        )
    port = parts.port or default
    if port is None:
        raise LocalError(f"{key} names no port (e.g. http://127.0.0.1:5000/123456789012/name)")
    return port


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    host = hostport.rsplit(":", 1)[0] if not hostport.endswith("]") else hostport
    netloc = f"{userinfo}@" if userinfo else ""
    return urlunsplit(parts._replace(netloc=f"{netloc}{host}:{port}"))


def make_plan(
    config_path: Path,
    run_dir: Path,
    redis_port: int | None = None,
    aws_port: int | None = None,
    http_port: int | None = None,
) -> Plan:
    """Validate the config and apply port overrides (writing a copy when there are any)."""
    try:
        cfg = config_module.load(config_path)
    except ConfigError as exc:
        raise LocalError(f"config error: {exc}") from None
    base_redis = _loopback_port("redis.url", cfg.redis.url, 6379)
    base_aws = _loopback_port("queue.url", cfg.queue.url, None)
    if cfg.queue.dead_letter_url is not None:
        dlq_port = _loopback_port("queue.dead_letter_url", cfg.queue.dead_letter_url, None)
        if dlq_port != base_aws:
            raise LocalError("queue.dead_letter_url: must name the same port as queue.url")
    if http_port is None and cfg.http.port == 0:
        http_port = free_port()  # the launcher must know where to ask for /health
    want = (redis_port or base_redis, aws_port or base_aws, http_port or cfg.http.port)
    if want == (base_redis, base_aws, cfg.http.port):
        return Plan(Path(cfg.path or config_path), cfg, False, *want[:2], cfg.http.host, want[2])
    raw = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    raw.setdefault("redis", {})["url"] = _with_port(cfg.redis.url, want[0])
    queue = raw.setdefault("queue", {})
    queue["url"] = _with_port(cfg.queue.url, want[1])
    if cfg.queue.dead_letter_url is not None:
        queue["dead_letter_url"] = _with_port(cfg.queue.dead_letter_url, want[1])
    raw.setdefault("http", {})["port"] = want[2]
    # Another instance beside the default one: its own cache, sandbox dirs and outbox too
    # (a worker wipes its work_dir/w<k> at start; outboxes would cross-deliver).
    run_dir.chmod(0o755)  # sandbox users must traverse to work_dir
    state = run_dir / "state"
    raw["paths"] = {
        **(raw.get("paths") or {}),
        "code_cache_dir": str(state / "cache"),
        "work_dir": str(state / "work"),
        "outbox_dir": str(state / "outbox"),
    }
    derived = run_dir / Path(config_path).name
    derived.write_text(
        f"# {PROG}: {Path(config_path).resolve()} with the ports of this run\n"
        + yaml.safe_dump(raw, sort_keys=False),
        encoding="utf-8",
    )
    try:
        cfg = config_module.load(derived)
    except ConfigError as exc:
        raise LocalError(f"config error in the copy with new ports: {exc}") from None
    return Plan(derived, cfg, True, *want[:2], cfg.http.host, want[2])


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
                f"{what} could not start: {_one_line(str(exc))} (log: {peer.log_path})"
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
                f"cannot create the queues and the bucket in moto_server: {_one_line(str(exc))}"
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
        return f"{head} during start-up" + (f": {_one_line(last)}" if last else "") + where

    def wait_for_warm_pools(self, timeout: float) -> None:
        """Wait (at most `timeout`) for every worker and every warm sandbox, so the demo shows
        the warm path. /status reports pools only after a task, so this counts the process
        runner's fork servers below the agent instead; other runners just get a short pause."""
        import psutil

        cfg = self.plan.config
        target = sum(runtime.warm for runtime in cfg.runtimes.values())
        deadline = time.monotonic() + timeout

        def warm() -> int:
            assert self.supervisor.pid is not None
            children = psutil.Process(self.supervisor.pid).children(recursive=True)
            return sum(1 for child in children if "forkserver" in " ".join(child.cmdline()))

        while time.monotonic() < deadline:
            try:
                workers = self.supervisor.health().get("workersAlive", 0)
                sandboxes = warm() if cfg.runner == "process" else target
            except (OSError, ValueError, psutil.Error):
                workers = sandboxes = 0
            if workers >= cfg.workers and sandboxes >= target:
                time.sleep(WARM_UP_MARGIN_S)  # the newest may still be saying it is ready
                say(f"agent: {workers} workers, {target} warm sandboxes")
                return
            time.sleep(0.1)
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


def _one_line(text: str) -> str:
    return " ".join(text.split())


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


# -- up --------------------------------------------------------------------------------------


def run_up(stack: Stack, timeout: float) -> int:
    """Bring everything up, print how to use it, wait for Ctrl-C / SIGTERM or the agent's end."""
    stack.check()
    stack.bring_up(timeout)
    plan = stack.plan
    env = aws_environ(plan.aws_endpoint)
    exports = [f"  export {name}={value}" for name, value in env.items()]
    invoke = shown(INVOKE_BIN)
    config_arg = f" -c {plan.config_path}" if plan.derived else ""
    lines = [
        "",
        "NanoGrid embedded agent is up.",
        f"  redis     {plan.config.redis.url}",
        f"  AWS       {plan.aws_endpoint}  (moto_server: SQS {', '.join(plan.queue_names)}; "
        f"S3 {BUCKET})",
        f"  status    {plan.http_url}/status   health {plan.http_url}/health   "
        f"metrics {plan.http_url}/metrics",
        f"  config    {shown(plan.config_path)}",
        f"  logs      agent: this terminal; peers: {stack.run_dir}",
        "",
        "In another shell:",
        *exports,
        f"  {invoke}{config_arg} {shown(EXAMPLES / 'hello-python')}",
        "",
        "Ctrl-C (or SIGTERM) stops the agent, then the peers.",
        "",
    ]
    print("\n".join(lines), flush=True)
    assert stack.supervisor.process is not None
    code = stack.supervisor.process.wait()
    say(f"the agent exited on its own with code {code}")
    return code if code >= 0 else EXIT_FAILED


# -- demo ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoCall:
    example: str
    input_data: Any
    why: str


DEMO_CALLS = (
    DemoCall("hello-python", {}, "a fresh sandbox from the warm pool"),
    DemoCall("echo-input", {"name": "NanoGrid", "numbers": [1, 2, 3]}, "inputData on stdin"),
    DemoCall("hello-python", {}, "same code again: warm, and the auto-tuner's tip over 2 runs"),
)


def summary(result: Result, end_to_end_ms: float) -> str:
    """One line of what matters in a result."""
    parts = [
        result.status,
        f"durationMillis {result.duration_millis}",
        f"end to end {end_to_end_ms:.0f} ms",
        f"peakMemoryMB {result.peak_memory_mb}",
        f"coldStart {json.dumps(result.cold_start)}",
        str(result.optimization_tip or "no optimizationTip"),
    ]
    if result.timings is not None:
        parts.append(f"agent overhead {result.timings.total_ms - result.timings.run_ms:.1f} ms")
    if result.error_message:
        parts.append(f"error: {result.error_type}: {result.error_message}")
    return " | ".join(parts)


def run_demo_calls(plan: Plan, wait: float) -> tuple[int, int]:
    """Deploy and invoke the demo calls in order; returns (SUCCESS count, calls made)."""
    import boto3
    import redis
    from botocore.exceptions import BotoCoreError, ClientError

    from .invoke import deploy, invoke, zip_function

    s3 = boto3.client("s3", region_name=AWS_REGION)
    sqs = boto3.client("sqs", region_name=AWS_REGION)
    client = redis.Redis.from_url(plan.config.redis.url, socket_timeout=5, socket_connect_timeout=5)
    keys: dict[str, str] = {}
    ok = 0
    try:
        for number, call in enumerate(DEMO_CALLS, 1):
            try:
                if call.example not in keys:
                    code = zip_function(EXAMPLES / call.example)
                    keys[call.example] = deploy(s3, BUCKET, call.example, code)
                task = {
                    "requestId": f"demo-{uuid.uuid4()}",
                    "functionId": call.example,
                    "runtime": "python",
                    "s3Bucket": BUCKET,
                    "s3Key": keys[call.example],
                    "inputData": call.input_data,
                }
                print(
                    f"\n== {number}/{len(DEMO_CALLS)} {call.example} ({call.why}): "
                    f"s3://{BUCKET}/{task['s3Key']}, inputData {json.dumps(call.input_data)}",
                    flush=True,
                )
                started = time.monotonic()
                result = invoke(sqs, client, plan.config.queue.url, task, wait)
                end_to_end_ms = (time.monotonic() - started) * 1000
            except (BotoCoreError, ClientError, redis.RedisError) as exc:
                raise LocalError(f"{call.example}: {_one_line(str(exc))}") from None
            if result is None:
                raise LocalError(
                    f"{call.example}: no result for {task['requestId']} within {wait:.0f}s"
                )
            print(json.dumps(result, indent=2, ensure_ascii=False))
            typed = Result.from_dict(result)
            print(f"-> {summary(typed, end_to_end_ms)}", flush=True)
            ok += typed.ok
    finally:
        client.close()
    return ok, len(DEMO_CALLS)


def run_demo(stack: Stack, timeout: float, wait: float) -> int:
    """Bring up, invoke the examples, print their results; 0 only if every one succeeded."""
    began = time.monotonic()
    stack.check()
    say(f"logs: {stack.run_dir}")
    stack.bring_up(timeout)
    stack.wait_for_warm_pools(WARM_UP_TIMEOUT_S)
    up_s = time.monotonic() - began
    say(
        f"up in {up_s:.1f}s; invoking the examples as the controller would "
        f"(SQS task -> agent -> result on Redis result:{{requestId}})"
    )
    try:
        ok, total = run_demo_calls(stack.plan, wait)
    except LocalError as exc:
        raise LocalError(f"{exc} (agent log: {stack.supervisor.log_path})") from None
    print(flush=True)
    verdict = "OK" if ok == total else "FAILED"
    say(
        f"demo {verdict}: {ok}/{total} SUCCESS; {time.monotonic() - began:.1f}s in all "
        f"(bring-up {up_s:.1f}s); agent log: {stack.supervisor.log_path}"
    )
    return EXIT_OK if ok == total else EXIT_FAILED


# -- command line ----------------------------------------------------------------------------


def _env_port(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    if not value.isdigit() or not 0 < int(value) < 65536:
        _usage_error(f"{name}={value!r} is not a port number")
    return int(value)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return int(text)


def _usage_error(message: str) -> NoReturn:
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="the agent's config (default: conf/local.yaml of this checkout)",
    )
    common.add_argument(
        "--redis-port",
        type=_port,
        default=_env_port("NANOGRID_LOCAL_REDIS_PORT"),
        help="redis-server's port (default: the config's redis.url)",
    )
    common.add_argument(
        "--aws-port",
        type=_port,
        default=_env_port("NANOGRID_LOCAL_AWS_PORT"),
        help="moto_server's port (default: the config's queue.url)",
    )
    common.add_argument(
        "--http-port",
        type=_port,
        default=_env_port("NANOGRID_LOCAL_HTTP_PORT"),
        help="the agent's /health and /status port (default: http.port)",
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=BRING_UP_TIMEOUT_S,
        help="seconds for everything to come up (default %(default)g)",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="{up,demo}")
    commands.add_parser(
        "up", parents=[common], help="run the embedded agent in the foreground until Ctrl-C"
    )
    demo = commands.add_parser(
        "demo", parents=[common], help="bring it up, invoke the examples, show results, stop"
    )
    demo.add_argument(
        "--wait",
        type=float,
        default=INVOKE_WAIT_S,
        help="seconds to wait for each result (default %(default)g)",
    )
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with contextlib.suppress(AttributeError, ValueError):  # never a traceback for an emoji
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    gate = SignalGate()
    gate.install()
    stack: Stack | None = None
    run_dir = Path(tempfile.mkdtemp(prefix="nanogrid-local-"))
    try:
        plan = make_plan(args.config, run_dir, args.redis_port, args.aws_port, args.http_port)
        stack = Stack(plan, run_dir, log_to_terminal=args.command == "up")
        gate.agent = stack.supervisor
        if args.command == "up":
            return run_up(stack, args.timeout)
        return run_demo(stack, args.timeout, args.wait)
    except LocalError as exc:
        gate.disarm()
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except Interrupted as exc:
        gate.disarm()
        say(f"{exc}: stopping")
        return EXIT_OK if args.command == "up" else EXIT_INTERRUPTED
    finally:
        gate.disarm()
        if stack is not None:
            stack.stop()
        with contextlib.suppress(OSError):  # only when nothing was written there
            run_dir.rmdir()
