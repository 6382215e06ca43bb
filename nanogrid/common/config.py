"""The agent's YAML config, parsed and validated once into frozen dataclasses.

Every section is a dataclass whose fields carry their defaults and bounds; ``load`` walks
the YAML against them (schema.py), so an unknown key or a bad value is refused with one line
naming the key (``ConfigError("workers: must be an integer >= 1 or 'auto', got 0")``). The
``NANOGRID_*`` variables of nanogrid/common/environ.py override the file's values before that.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from . import environ, schema
from .errors import ConfigError

MiB = 2**20
PROFILES = ("production", "local")
"""``profile``: ``local`` (the embedded emulator, conf/local.yaml) gives ``queue.url`` a default."""
LOCAL_QUEUE_URL = "http://127.0.0.1:5000/123456789012/nanogrid-task-queue"


def _bounded(default: Any, lo: float | None = None, hi: float | None = None, **kw: Any) -> Any:
    return field(default=default, metadata={"min": lo, "max": hi, **kw})


AUTO = 0
"""A ``capacity`` or ``pool`` value still to be computed from the host
(nanogrid/common/capacity.py)."""


@dataclass(frozen=True)
class QueueConfig:
    url: str | None = None
    """The task queue: required in a config file (``load``), unless ``profile: local``."""
    wait_time_seconds: int = _bounded(20, 0, 20)
    max_attempts: int = _bounded(3, 1)
    dead_letter_url: str | None = None
    visibility_timeout_seconds: int = _bounded(30, 1, 43200)
    """Visibility a received message gets; heartbeats renew it while the run lasts."""


@dataclass(frozen=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    result_ttl_seconds: int = _bounded(3600, 1)


@dataclass(frozen=True)
class HttpConfig:
    host: str = "0.0.0.0"
    port: int = _bounded(8080, 0, 65535)


@dataclass(frozen=True)
class RuntimeConfig:
    image: str = "python:3.11-slim"
    command: tuple[str, ...] = ("python3", "main.py")
    warm: int = _bounded(4, 0, 256)
    preload: bool = True
    """Warm sandboxes hold the modules their function imported (import-warm)."""


DEFAULT_RUNTIMES = types.MappingProxyType(
    {
        "python": RuntimeConfig(),
        "node": RuntimeConfig(image="node:20-slim", command=("node", "main.js"), warm=2),
    }
)
"""The default ``runtimes``; a runtime of one of these names starts from its defaults here."""


@dataclass(frozen=True)
class LimitsConfig:
    default_memory_mb: int = _bounded(256, 16)
    min_memory_mb: int = _bounded(32, 16)
    max_memory_mb: int = _bounded(3008, 16)
    default_timeout_ms: int = _bounded(30000, 1)
    min_timeout_ms: int = _bounded(100, 1)
    max_timeout_ms: int = _bounded(900000, 1)
    max_zip_bytes: int = _bounded(50 * MiB, 1)
    max_unpacked_bytes: int = _bounded(250 * MiB, 1)
    max_files: int = _bounded(5000, 1)
    max_output_bytes: int = _bounded(1 * MiB, 1)
    max_pids: int = _bounded(64, 2)
    """Processes (and threads) one invocation may have: the fork-bomb limit."""
    max_open_files: int = _bounded(1024, 16, 1_048_576)
    """File descriptors a function's process may hold (RLIMIT_NOFILE, both runners)."""
    max_file_bytes: int = _bounded(64 * MiB, 1)
    """The largest file a function may write (RLIMIT_FSIZE, both runners)."""


@dataclass(frozen=True)
class PathsConfig:
    code_cache_dir: str = "/var/cache/nanogrid/code"
    work_dir: str = "/var/lib/nanogrid/work"
    outbox_dir: str = "/var/lib/nanogrid/outbox"
    min_free_mb: int = _bounded(256, 0)


@dataclass(frozen=True)
class AutotunerConfig:
    headroom_percent: int = _bounded(25, 0, 400)
    floor_mb: int = _bounded(32, 1)
    step_mb: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 1536, 2048, 3008)
    history_size: int = _bounded(20, 1, 1000)
    history_ttl_seconds: int = _bounded(7 * 86400, 60)
    near_limit_percent: int = _bounded(90, 1, 100)
    """A peak at or above this share of the limit recommends the next step up."""
    language: str = _bounded("en", choices=("en", "ko"))
    """The language of ``optimizationTip`` (``tipCode`` is language-free)."""


@dataclass(frozen=True)
class CloudWatchConfig:
    enabled: bool = True
    namespace: str = "NanoGrid"
    flush_seconds: float = _bounded(5.0, 0.05, 300)


@dataclass(frozen=True)
class LogConfig:
    level: str = _bounded(
        "INFO", choices=("TRACE", "DEBUG", "INFO", "WARNING", "ERROR"), upper=True
    )
    file: str | None = None
    json: bool = False
    rotation: str = "50 MB"
    retention: int = _bounded(5, 1)


@dataclass(frozen=True)
class ConcurrencyConfig:
    default_cap: int | None = _bounded(None, 0)
    """Runs of one function at once across all hosts, for a function with no entry in the
    ``nanogrid:concurrency`` hash; None: uncapped."""


@dataclass(frozen=True)
class PoolConfig:
    idle_expiry_seconds: float = _bounded(600.0, 1)
    """A sandbox that served a function and sat idle this long is replaced by a fresh one."""
    max_idle: int = _bounded(AUTO, 1, 100_000, auto=AUTO)
    """Idle sandboxes on this host, every runtime and worker together (auto: the host's
    ``capacity.max_concurrent``); past it the least recently used specialized ones go."""
    max_idle_mb: int = _bounded(AUTO, 1, auto=AUTO)
    """Their memory, in MB (auto: half the reserve ``capacity.memory_mb`` leaves)."""
    node_worker_idle_seconds: float = _bounded(60.0, 0)
    """An idle node sandbox that ran a function keeps the Worker thread it started for its
    next call this long, then ends it (~8 MiB less; that call starts one, ~30 ms); 0: always
    keeps it."""
    warm_timeout_seconds: float = _bounded(30.0, 0, 600)
    """At start and reload, READY and /health UP wait at most this long for each runtime's
    ``warm`` generic sandboxes."""


@dataclass(frozen=True)
class ProcessRunnerConfig:
    path: str = "/usr/local/bin:/usr/bin:/bin"
    """PATH of the functions, also where the runtime command is resolved."""
    sandbox_uid_base: int = _bounded(61000, 1000, 2**31 - 100000)
    """Worker w's sandboxes run as uids base + w*1000 .. + 999 (one each) when root."""
    network: str = _bounded("none", choices=("none", "host"))
    """none: each sandbox has its own network namespace (loopback only); host: the host's."""
    metadata_service: str | None = _bounded(None, choices=("blocked", "allowed"))
    """With network host: the operator's word that the instance metadata service is blocked
    for the sandbox uids, or allowed on purpose (unset: the agent refuses to start)."""
    tmpfs_mb: int = _bounded(64, 1)
    """Size of each sandbox's private /tmp (a tmpfs in its own mount namespace)."""


@dataclass(frozen=True)
class DockerRunnerConfig:
    network: str = "none"
    metadata_service: str | None = _bounded(None, choices=("blocked", "allowed"))
    """With a network other than none: as ``process.metadata_service``."""
    user: str = "65534:65534"
    """``uid[:gid]`` numbers (the image may not know names); root is refused."""
    cpus: float = _bounded(1.0, 0.01, 256)
    tmpfs_mb: int = _bounded(64, 1)
    pause_grace_seconds: float = _bounded(2.0, 0, 3600)
    socket_dir: str = "/var/lib/nanogrid/sandboxes"
    runtime: str | None = None
    """The engine's OCI runtime for the containers (e.g. runsc); None: the engine's default."""


@dataclass(frozen=True)
class CapacityConfig:
    memory_mb: int = _bounded(AUTO, 1, auto=AUTO)
    """Sum of ``memoryMb`` of the invocations running at once on this host."""
    max_concurrent: int = _bounded(AUTO, 1, 4096, auto=AUTO)
    """Invocations running at once on this host."""
    source: str = field(default="as configured", metadata={"internal": True})
    """How ``auto`` values were computed (set when they are, at start and on reload)."""


@dataclass(frozen=True)
class AwsConfig:
    region: str | None = None
    """None: boto3's chain, then the region in queue.url's host (see
    nanogrid/common/awsregion.py)."""


@dataclass(frozen=True)
class TracingConfig:
    otlp_endpoint: str | None = None
    """OTLP/HTTP collector (e.g. http://127.0.0.1:4318) spans go to; None: trace ids are
    propagated (result, logs, the function's TRACEPARENT), no spans are made."""


@dataclass(frozen=True)
class Config:
    profile: str = _bounded("production", choices=PROFILES)
    workers: int = _bounded(2, 1, 256, auto=True)
    runner: str = "docker"
    """A name in ``runners.RUNNERS``; checked there (runners.check_config), the one registry."""
    drain_timeout_seconds: float = _bounded(30.0, 0, 3600)
    heartbeat_timeout_seconds: float = _bounded(30.0, 1, 3600)
    queue: QueueConfig = QueueConfig()
    redis: RedisConfig = RedisConfig()
    http: HttpConfig = HttpConfig()
    runtimes: Mapping[str, RuntimeConfig] = field(
        default_factory=lambda: DEFAULT_RUNTIMES, metadata={"defaults": DEFAULT_RUNTIMES})
    limits: LimitsConfig = LimitsConfig()
    paths: PathsConfig = PathsConfig()
    autotuner: AutotunerConfig = AutotunerConfig()
    cloudwatch: CloudWatchConfig = CloudWatchConfig()
    log: LogConfig = LogConfig()
    pool: PoolConfig = PoolConfig()
    process: ProcessRunnerConfig = ProcessRunnerConfig()
    docker: DockerRunnerConfig = DockerRunnerConfig()
    aws: AwsConfig = AwsConfig()
    capacity: CapacityConfig = CapacityConfig()
    concurrency: ConcurrencyConfig = ConcurrencyConfig()
    tracing: TracingConfig = TracingConfig()
    path: str | None = field(default=None, metadata={"internal": True})
    loaded_at: str | None = field(default=None, metadata={"internal": True})
    given: frozenset[str] = field(default=frozenset(), metadata={"internal": True})
    """The keys the file (or the environment) set, dotted: a default may adapt to the host
    where an explicit value may not (``limits.max_memory_mb``, nanogrid/common/capacity.py)."""


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file, the environment's ``NANOGRID_*`` overrides applied;
    raise ConfigError with one line on any problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(
            f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}"
        ) from None
    data, sources = environ.apply({} if data is None else data, os.environ)
    try:
        config = from_dict(data)
    except ConfigError as exc:
        key = str(exc).split(":", 1)[0]
        raise (ConfigError(f"{sources[key]}: {exc}") if key in sources else exc) from None
    url = environ.with_redis_password(config.redis.url, os.environ)
    config = dataclasses.replace(config, redis=dataclasses.replace(config.redis, url=url))
    if config.queue.url is None:
        raise ConfigError(
            "queue.url: required: the task queue's URL (https://sqs.REGION.amazonaws.com/"
            f"ACCOUNT/QUEUE), in the file or ${environ.QUEUE_URL}; only profile: local has one"
        )
    return dataclasses.replace(
        config, path=str(Path(path).resolve()), loaded_at=datetime.now(UTC).isoformat()
    )


def from_dict(data: Any) -> Config:
    """Validate a parsed mapping into a Config (used by ``load`` and by tests, which may
    leave ``queue.url`` out)."""
    config = schema.build(Config, data, "")
    if config.profile == "local" and config.queue.url is None:
        config = dataclasses.replace(
            config, queue=dataclasses.replace(config.queue, url=LOCAL_QUEUE_URL)
        )
    _check_cross_fields(config)
    return dataclasses.replace(config, given=frozenset(schema.given_keys(data)))


def _check_cross_fields(config: Config) -> None:
    lim = config.limits
    if not lim.min_memory_mb <= lim.default_memory_mb <= lim.max_memory_mb:
        raise ConfigError(
            "limits.default_memory_mb: must lie between min_memory_mb and max_memory_mb"
        )
    if not lim.min_timeout_ms <= lim.default_timeout_ms <= lim.max_timeout_ms:
        raise ConfigError(
            "limits.default_timeout_ms: must lie between min_timeout_ms and max_timeout_ms"
        )
    if list(config.autotuner.step_mb) != sorted(set(config.autotuner.step_mb)):
        raise ConfigError("autotuner.step_mb: must be strictly increasing")
    for name, runtime in config.runtimes.items():
        if any(not part for part in runtime.command):
            raise ConfigError(f"runtimes.{name}.command: entries must be non-empty strings")
    docker_user_ids(config.docker.user)
    if not re.fullmatch(r"(redis|rediss|unix)://.+", config.redis.url):
        raise ConfigError(
            "redis.url: must start with redis://, rediss:// or unix://, "
            f"got {environ.redacted(config.redis.url)!r}"
        )
    endpoint = config.tracing.otlp_endpoint
    if endpoint is not None and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", endpoint):
        raise ConfigError(
            f"tracing.otlp_endpoint: must be an http[s]://host:port URL, got {endpoint!r}"
        )
    for key, url in (
        ("queue.url", config.queue.url),
        ("queue.dead_letter_url", config.queue.dead_letter_url),
    ):
        if url is not None and not re.fullmatch(r"https?://[^/\s]+/.+", url):
            raise ConfigError(
                f"{key}: must be an SQS queue URL (http[s]://host/account/name), got {url!r}"
            )


def docker_user_ids(user: str) -> tuple[int, int]:
    """``docker.user`` as (uid, gid); ConfigError unless numbers, and for root."""
    uid, _, gid = user.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise ConfigError(f"docker.user: must be uid:gid numbers, got {user!r}")
    if int(uid) == 0:
        raise ConfigError("docker.user: functions must not run as root (uid 0)")
    return int(uid), int(gid or uid)
