"""bin/nanogrid-limits against a real redis-server: set, get, ls, rm, and bad input in one
line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[2]


def limits(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "bin" / "nanogrid-limits"), "--redis-url", redis_url, *args],
        capture_output=True, text=True, timeout=30,
    )


def test_set_get_ls_rm(redis_url: str) -> None:
    assert limits(redis_url, "set", "resize-image", "5").stdout == (
        "resize-image: at most 5 at once on all hosts\n")
    assert redis.Redis.from_url(redis_url).hget("nanogrid:concurrency", "resize-image") == b"5"
    assert limits(redis_url, "get", "resize-image").stdout == "resize-image: 5\n"
    limits(redis_url, "set", "audit", "0")
    assert limits(redis_url, "ls").stdout == "audit\t0\t0 running\nresize-image\t5\t0 running\n"
    assert limits(redis_url, "rm", "audit").stdout == "audit: cap removed\n"
    missing = limits(redis_url, "get", "audit")
    assert (missing.returncode, missing.stdout) == (1, "audit: no cap of its own\n")


def test_bad_input_is_one_line(redis_url: str) -> None:
    for args, needle in [
        (("set", "bad/id", "3"), "function id 'bad/id': must be 1-64 of"),
        (("set", "f", "-1"), "cap: must be 0 or more, got -1"),
    ]:
        done = limits(redis_url, *args)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert needle in done.stderr
    down = limits("redis://127.0.0.1:1/0", "ls")
    assert down.returncode == 1 and down.stderr.startswith("nanogrid-limits: ")
    assert "Traceback" not in down.stderr and down.stderr.count("\n") == 1
