"""What the supervisor shows over HTTP, served from a thread: /health, /status, /metrics.

The handlers only read: ``/status`` and ``/health`` a snapshot the arbiter's loop publishes
each turn, ``/metrics`` the registry (which has its own lock). Nothing here asks a worker:
the workers report to the arbiter through their status pipes.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from loguru import logger

from .prometheus import CONTENT_TYPE
from .warmup import health_reason


def health_of(status: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(HTTP code, body) of /health: UP while running with at least one worker alive,
    DEGRADED (still 200) while a live worker takes no new work because a dependency fails,
    or while the pools warm up after a start or a reload (warmup.py)."""
    alive = sum(1 for worker in status["workers"] if worker["alive"])
    up = alive > 0 and not status["stopping"]
    reasons = [
        f"worker {worker['id']}: {reason}"
        for worker in status["workers"]
        if worker["alive"]
        for reason in worker.get("degraded", ())
    ]
    if (warming := health_reason(status.get("warmUp", {}))) is not None:
        reasons.append(warming)
    body = {
        "status": ("DEGRADED" if reasons else "UP") if up else "DOWN",
        "workersAlive": alive,
        "workersConfigured": status["workersConfigured"],
        "stopping": status["stopping"],
        "uptimeSeconds": status["uptimeSeconds"],
    }
    if up and reasons:
        body["reasons"] = reasons
    return (200 if up else 503), body


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    status: Callable[[], dict[str, Any]]
    metrics: Callable[[], str]


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "nanogrid-supervisor"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._json(*health_of(self.server.status()))
        elif path == "/status":
            self._json(200, self.server.status())
        elif path == "/metrics":
            self._send(200, CONTENT_TYPE, self.server.metrics().encode())
        else:
            self._json(404, {"error": f"no such path {path}; try /health, /status or /metrics"})

    do_HEAD = do_GET  # noqa: N815 - answered like GET, without the body (_send)

    def _json(self, code: int, body: dict[str, Any]) -> None:
        self._send(code, "application/json", json.dumps(body).encode() + b"\n")

    def _send(self, code: int, content_type: str, data: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        logger.debug(f"[HTTP] {self.address_string()} {format % args}")


class HealthServer:
    """Listens on (host, port) and serves until ``close``; port 0 picks a free one."""

    def __init__(self, host: str, port: int, status: Callable[[], dict[str, Any]],
                 metrics: Callable[[], str]) -> None:
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), _Handler)
        self._server.status = status
        self._server.metrics = metrics
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.5}, name="http",
            daemon=True,
        )
        self._thread.start()
        logger.info(f"[HTTP] listening on {self.address}")

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def moved(self, host: str, port: int) -> HealthServer:
        """A server on (host, port) in place of this one, which closes; this one, still
        serving, if the new address cannot be listened on."""
        try:
            server = HealthServer(host, port, self._server.status, self._server.metrics)
        except OSError as exc:
            logger.error(f"http: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                         f"still serving on {self.address}")
            return self
        self.close()
        return server

    def fileno(self) -> int:
        return self._server.fileno()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
