"""What a runner's sandboxes are isolated by on this host, and what is missing (``/status``
``isolation``, and the warning line at start)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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
