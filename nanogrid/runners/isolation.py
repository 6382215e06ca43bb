"""What a runner's sandboxes are isolated by on this host, and what is missing (``/status``
``isolation``, and the warning line at start)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nanogrid.common.errors import ConfigError

METADATA_SERVICE = "169.254.169.254"
"""The instance metadata service (IMDS): it hands the instance role's credentials to any
process that reaches it from the host's network."""


@dataclass(frozen=True)
class Isolation:
    """The isolations that hold for a runner's sandboxes, and each missing one with why."""

    holds: tuple[str, ...] = ()
    missing: Mapping[str, str] = field(default_factory=dict)

    def as_status(self) -> dict[str, Any]:
        """The ``/status`` form: ``{"holds": [...], "missing": {name: why}}``."""
        return {"holds": list(self.holds), "missing": dict(self.missing)}

    def warning(self, runner: str) -> str | None:
        """One line naming each missing isolation, or None when nothing is missing."""
        if not self.missing:
            return None
        named = ", ".join(f"{name} ({why})" for name, why in self.missing.items())
        return f"[ISOLATION] the {runner} runner's sandboxes run without: {named}"


def check_metadata_service(runner: str, network: str, setting: str | None) -> None:
    """Refuse (ConfigError, one line) a sandbox network that reaches the host's (``network``
    not ``none``) unless the config says the metadata service is blocked or allowed."""
    if network != "none" and setting is None:
        raise ConfigError(
            f"{runner}.metadata_service: must be blocked or allowed when {runner}.network is "
            f"{network}: functions could reach the instance metadata service "
            f"({METADATA_SERVICE}) and the instance role's credentials (docs/security.md)"
        )


def metadata_exposure(runner: str, setting: str | None, why: str) -> dict[str, str]:
    """``{"metadata service": why}`` for /status ``missing``, for sandboxes that share the
    host's network (``why``), unless the config says the service is blocked."""
    if setting == "blocked":
        return {}
    if setting == "allowed":
        why = f"{runner}.metadata_service is allowed"
    return {"metadata service": f"functions can reach {METADATA_SERVICE}: {why}"}
