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
import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from nanogrid.common import environ
from nanogrid.common.version import version_line

from .demo import run_demo
from .embedded import (
    aws_environ,
)
from .localbase import (
    BRING_UP_TIMEOUT_S,
    BUCKET,
    DEFAULT_CONFIG,
    EXAMPLES,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    INVOKE_BIN,
    INVOKE_WAIT_S,
    PROG,
    Interrupted,
    LocalError,
    say,
    shown,
)
from .localplan import make_plan
from .stack import SignalGate, Stack

# -- up --------------------------------------------------------------------------------------


def run_up(stack: Stack, timeout: float) -> int:
    """Bring everything up, print how to use it, wait for Ctrl-C / SIGTERM or the agent's end."""
    stack.check()
    stack.bring_up(timeout)
    plan = stack.plan
    # nanogrid-invoke finds the config as every script does: -c, else $NANOGRID_CONFIG.
    env = {**aws_environ(plan.aws_endpoint), environ.CONFIG: str(plan.config_path.resolve())}
    exports = [f"  export {name}={value}" for name, value in env.items()]
    invoke = shown(INVOKE_BIN)
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
        f"  {invoke} {shown(EXAMPLES / 'hello-python')}",
        "",
        "Ctrl-C (or SIGTERM) stops the agent, then the peers.",
        "",
    ]
    print("\n".join(lines), flush=True)
    assert stack.supervisor.process is not None
    code = stack.supervisor.process.wait()
    say(f"the agent exited on its own with code {code}")
    return code if code >= 0 else EXIT_FAILED


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
    top.add_argument("--version", action="version", version=version_line(PROG))
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
