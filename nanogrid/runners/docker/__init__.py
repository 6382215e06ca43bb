"""The Docker runner: warm, hardened containers, each with a sandbox server inside
(runner.py); their specs, cgroups, leftovers and engine checks beside it."""

from .runner import DockerRunner

__all__ = ["DockerRunner"]
