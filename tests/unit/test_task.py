"""Task message contract parsing."""

from __future__ import annotations

import json

import pytest

from nanogrid.common.config import from_dict
from nanogrid.common.errors import InvalidMessage, RuntimeNotSupported
from nanogrid.worker import task
from nanogrid.worker.result import TaskIds

CFG = from_dict({"limits": {"default_memory_mb": 128, "default_timeout_ms": 3000}})
GOOD = {
    "requestId": "req-1:a.b_c",
    "functionId": "hello-python",
    "runtime": "python",
    "s3Bucket": "b",
    "s3Key": "functions/hello-python/v1.zip",
}


def body(**changes: object) -> str:
    data = {**GOOD, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not None})


def test_defaults_and_input() -> None:
    t = task.parse(body(extra="ignored"), CFG)
    assert (t.memory_mb, t.timeout_ms, t.input_json) == (128, 3000, b"{}")
    t = task.parse(body(inputData={"name": "Ünï"}, memoryMb=512, timeoutMs=100), CFG)
    assert json.loads(t.input_json) == {"name": "Ünï"} and t.memory_mb == 512


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("not json", "not JSON"),
        ("[1]", "JSON object"),
        (body(requestId=None), "requestId"),
        (body(requestId="x" * 129), "requestId"),
        (body(requestId="has space"), "requestId"),
        (body(functionId=None), "functionId"),
        (body(functionId="a/b"), "functionId"),
        (body(s3Bucket=""), "s3Bucket"),
        (body(s3Key=None), "s3Key"),
        (body(memoryMb="big"), "memoryMb"),
        (body(memoryMb=True), "memoryMb"),
        (body(memoryMb=1), "memoryMb: must be between"),
        (body(timeoutMs=10**9), "timeoutMs"),
    ],
)
def test_invalid_messages(raw: str, needle: str) -> None:
    with pytest.raises(InvalidMessage, match=needle):
        task.parse(raw, CFG)


def test_unknown_runtime() -> None:
    with pytest.raises(RuntimeNotSupported, match="'cobol'.*supported: node, python"):
        task.parse(body(runtime="cobol"), CFG)


def test_peek_ids_only_returns_valid_ids() -> None:
    assert task.peek_ids(body(runtime="cobol")) == TaskIds("req-1:a.b_c", "hello-python", "cobol")
    assert task.peek_ids(body(requestId="bad id")) == TaskIds(None, "hello-python", "python")
    assert task.peek_ids("nope") == TaskIds(None) and task.peek_ids("[]") == TaskIds(None)


DEEP = "[" * 50_000 + "]" * 50_000


@pytest.mark.parametrize(
    ("raw", "needle", "request_id"),
    [
        (body(inputData="\ud800"), "inputData: not valid Unicode", "req-1:a.b_c"),
        (body(s3Key="k\udfff"), "s3Key: not valid Unicode", "req-1:a.b_c"),
        (DEEP, "nested too deeply", None),
        (body()[:-1] + f', "inputData": {DEEP}}}', "nested too deeply", "req-1:a.b_c"),
        (body()[:-1] + ', "memoryMb": 1' + "0" * 5000 + "}", "4300 digits", "req-1:a.b_c"),
        (body()[:-1] + ', "inputData": NaN}', "NaN is not a JSON value", "req-1:a.b_c"),
        ("x" * (task.MAX_BODY_BYTES + 1), "more than SQS's", None),
        ("", "not JSON", None),
        ("null", "JSON object, got NoneType", None),
    ],
    ids=["surrogate", "surrogate-key", "deep", "deep-input", "digits", "nan", "huge", "empty",
         "null"],
)
def test_poison_bodies_raise_only_invalid_message(
    raw: str, needle: str, request_id: str | None
) -> None:
    with pytest.raises(InvalidMessage, match=needle) as caught:
        task.parse(raw, CFG)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300
    assert task.peek_ids(raw).request_id == request_id
