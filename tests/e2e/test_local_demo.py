"""The README's first command, ``bin/nanogrid-local demo``, run as an operator runs it.

It starts its own redis-server, moto_server and bin/nanogrid-supervisor; the test gives it
free ports so a running agent or a system redis on the default ports cannot interfere.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from helpers import free_port

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "bin" / "nanogrid-local"
BRING_UP_S = 45
WAIT_S = 15
DEADLINE_S = 100
"""Whole run, below pytest's 120 s: bring-up + 3 results at most, plus the stop."""


def distinct_free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def stop_session(process: subprocess.Popen[str]) -> None:
    """SIGTERM the launcher's session (it stops what it started), SIGKILL if it lingers."""
    for signum, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait)


def test_local_demo_invokes_the_examples_and_stops_cleanly(tmp_path: Path) -> None:
    redis_port, aws_port, http_port = distinct_free_ports(3)
    command = [
        sys.executable,
        str(LOCAL),
        "demo",
        "--redis-port",
        str(redis_port),
        "--aws-port",
        str(aws_port),
        "--http-port",
        str(http_port),
        "--timeout",
        str(BRING_UP_S),
        "--wait",
        str(WAIT_S),
    ]
    process = subprocess.Popen(
        command,
        cwd=tmp_path,  # anywhere: the launcher finds conf/ and bin/ beside itself
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        stop_session(process)
        output = process.communicate()[0]
        raise AssertionError(f"demo still running after {DEADLINE_S}s:\n{output}") from None
    finally:
        stop_session(process)

    assert process.returncode == 0, output
    assert output.count('"status": "SUCCESS"') == 3, output
    assert "Hello from NanoGrid!" in output
    assert "Hello, NanoGrid!" in output  # echo-input got its inputData
    assert "demo OK: 3/3 SUCCESS" in output
    # It calls once the agent is warm (its /status warmUp), so no call is a cold start.
    assert "every runtime's generic sandboxes ready" in output, output
    assert '"coldStart": true' not in output, output
    assert "Traceback" not in output
    # Everything it started is gone: its ports are free again.
    for port in (redis_port, aws_port, http_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
