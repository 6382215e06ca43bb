"""How the worker's Redis link reads an error reply: a server that takes no writes for now
is an outage (the worker goes DEGRADED and hands its messages back), any other refusal
concerns that one write. The replies are parsed by redis-py's own parser, as they arrive."""

from __future__ import annotations

import pytest
import redis
from redis._parsers.resp2 import _RESP2Parser

from nanogrid.common.errors import ResultRejected, ResultStoreUnavailable
from nanogrid.worker.redislink import OUTAGE_CODES, RedisLink

REPLIES = {
    "BUSY": "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN "
            "NOSAVE.",
    "CLUSTERDOWN": "CLUSTERDOWN The cluster is down",
    "LOADING": "LOADING Redis is loading the dataset in memory",
    "MASTERDOWN": "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to "
                  "'no'.",
    "MISCONF": "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to "
               "persist to disk.",
    "NOREPLICAS": "NOREPLICAS Not enough good replicas to write.",
    "OOM": "OOM command not allowed when used memory > 'maxmemory'.",
    "READONLY": "READONLY You can't write against a read only replica.",
    "TRYAGAIN": "TRYAGAIN Multiple keys request during rehashing of slot",
}


def reply(text: str) -> redis.RedisError:
    return _RESP2Parser(65536).parse_error(text)


def refused_with(error: redis.RedisError) -> ResultStoreUnavailable:
    """What the link raises when a write meets ``error`` (ResultRejected is a subclass: the
    tests check the exact class)."""
    link = RedisLink("redis://127.0.0.1:1/0")

    def operation(client: redis.Redis) -> None:
        raise error

    with pytest.raises(ResultStoreUnavailable) as caught:
        link.call("write result:r", operation)
    return caught.value


def test_every_outage_code_has_a_reply_here() -> None:
    assert set(REPLIES) == OUTAGE_CODES


@pytest.mark.parametrize("code", sorted(REPLIES))
def test_a_reply_of_a_server_taking_no_writes_is_an_outage_naming_its_code(code: str) -> None:
    error = refused_with(reply(REPLIES[code]))
    assert type(error) is ResultStoreUnavailable
    assert str(error).startswith(f"write result:r: {code} ")


@pytest.mark.parametrize("code", sorted(set(REPLIES) - {"LOADING"}))
def test_the_same_reply_from_inside_a_script_is_an_outage(code: str) -> None:
    """Redis before 7 wraps a refusal met by ``redis.call`` in an ERR naming the script."""
    wrapped = (f"ERR Error running script (call to f_0123): @user_script:1: "
               f"@user_script: 1: -{REPLIES[code]}")
    error = refused_with(reply(wrapped))
    assert type(error) is ResultStoreUnavailable
    assert f"-{code} " in str(error)


@pytest.mark.parametrize("text", [
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    "ERR value is not an integer or out of range",
    "NOSCRIPT No matching script. Please use EVAL.",
    "ERR Error running script: @user_script:1: user_script:1: OOMPH is not a code",
])
def test_any_other_refusal_concerns_only_that_write(text: str) -> None:
    error = refused_with(reply(text))
    assert type(error) is ResultRejected
    assert str(error).startswith("write result:r: Redis refused it: ")
