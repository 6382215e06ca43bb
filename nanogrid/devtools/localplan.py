"""Which config and ports ``nanogrid-local`` runs on: conf/local.yaml, or a copy with other
loopback ports and directories of its own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml

from nanogrid.common import config as config_module
from nanogrid.common.errors import ConfigError

from .embedded import (
    free_port,
)
from .localbase import LOOPBACK, PROG, LocalError

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


