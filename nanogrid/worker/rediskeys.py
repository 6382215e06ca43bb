"""Every Redis key and channel name the agent uses, in one place.

``result:{requestId}`` (a key and a channel of the same name) is a contract with the
controller; the others are the agent's own.
"""

from __future__ import annotations

import os
import socket


def result(request_id: str) -> str:
    """The stored result (a key) and the channel it is published on (contract)."""
    return f"result:{request_id}"


def claim(request_id: str) -> str:
    """Who runs ``request_id`` now: ``host:pid:token`` with a lease (claim.py)."""
    return f"claim:{request_id}"


def runs(request_id: str) -> str:
    """How many times ``request_id`` was tried (its result's ``attempt``; claim.py)."""
    return f"runs:{request_id}"


def peaks(function_id: str, runtime: str) -> str:
    """The function's recent peak memory on ``runtime``, newest first (autotuner.py). Neither
    name holds a ``:`` (task.py, config.py), so the key is unambiguous."""
    return f"autotuner:peaks:{function_id}:{runtime}"


def probe() -> str:
    """This worker process's probe-write key (does Redis take writes now?)."""
    return f"nanogrid:probe:{socket.gethostname()}:{os.getpid()}"


CONCURRENCY = "nanogrid:concurrency"
"""The per-function caps across all hosts: a hash of functionId -> cap (contract; written by
the controller or ``nanogrid-limits``)."""


def running(function_id: str) -> str:
    """The function's runs in flight on every host: a sorted set of claim tokens scored by
    when each one's lease ends (caps.py)."""
    return f"nanogrid:running:{function_id}"
