"""What the Docker engine itself decides about a sandbox: whether it knows the configured
runtime (``docker.runtime``), whether its default seccomp profile is there (the containers
are made without ``seccomp=unconfined``, so they get it), and whether it has each runtime's
image."""

from __future__ import annotations

from typing import Any

import docker
from docker.errors import ImageNotFound

from nanogrid.common.config import Config
from nanogrid.common.errors import ConfigError, SandboxError

from ..isolation import Isolation, metadata_exposure
from .cleanup import UNREACHABLE, describe

ENGINE_CHECK_TIMEOUT_S = 10
CONTAINER_ISOLATION = (
    "uid", "capabilities", "read-only-root", "tmpfs", "cgroup", "rlimits", "pid", "mount", "ipc",
)
"""What every sandbox container has by its spec (spec.py)."""


def engine_info() -> dict[str, Any] | None:
    """``docker info`` of the engine, or None when it does not answer."""
    try:
        client = docker.from_env(timeout=ENGINE_CHECK_TIMEOUT_S)
        try:
            info: dict[str, Any] = client.info()
        finally:
            client.close()
    except UNREACHABLE:
        return None
    return info


def check_engine(config: Config) -> None:
    """Refuse a ``docker.runtime`` the engine does not list; an engine that does not answer
    now is not a config error (the workers retry their boot until it is back)."""
    wanted = config.docker.runtime
    if wanted is None:
        return
    info = engine_info()
    if info is None:
        return
    known = sorted(info.get("Runtimes") or {})
    if wanted not in known:
        raise ConfigError(
            f"docker.runtime: the Docker engine has no runtime {wanted!r} "
            f"(it has: {', '.join(known)})"
        )


def container_isolation(config: Config) -> Isolation:
    """What the sandbox containers are isolated by, and what is missing."""
    holds = list(CONTAINER_ISOLATION)
    missing = {}
    if config.docker.network == "none":
        holds.append("network")
    else:
        missing["network"] = f"docker.network is {config.docker.network}"
        missing.update(metadata_exposure(
            "docker", config.docker.metadata_service,
            f"containers reach the host's network (docker.network is {config.docker.network})",
        ))
    info = engine_info()
    if info is None:
        missing["seccomp"] = "the Docker engine does not answer: cannot tell"
    elif any("name=seccomp" in option for option in info.get("SecurityOptions") or []):
        holds.append("seccomp")
    else:
        missing["seccomp"] = "the Docker engine has no seccomp support"
    return Isolation(tuple(holds), missing)


def image_missing(image: str) -> str:
    return f"image {image} is not on this host (docker pull it, or bin/nanogrid-build-images)"


def missing_images(api: docker.DockerClient, config: Config) -> dict[str, str]:
    """The runtimes whose image is not on this host -> why; SandboxError if the engine is away."""
    problems = {}
    for name, runtime in config.runtimes.items():
        try:
            api.images.get(runtime.image)
        except ImageNotFound:
            problems[name] = image_missing(runtime.image)
        except UNREACHABLE as exc:
            raise SandboxError(f"Docker engine unreachable: {describe(exc)}") from None
    return problems
