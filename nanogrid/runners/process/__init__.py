"""The process runner: local subprocess sandboxes for hosts without a Docker engine
(runner.py); their uids, work directory and hidden host paths beside it."""

from .runner import ProcessRunner

__all__ = ["ProcessRunner"]
