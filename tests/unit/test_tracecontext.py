"""The trace context a message arrives with: W3C traceparent, else X-Ray's AWSTraceHeader."""

from __future__ import annotations

import pytest

from nanogrid.runners.base import Invocation
from nanogrid.worker import tracecontext
from nanogrid.worker.tracecontext import TraceContext

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def attribute(value: str) -> dict[str, str]:
    return {"DataType": "String", "StringValue": value}


@pytest.mark.parametrize(("value", "expected"), [
    (f"00-{TRACE}-{SPAN}-01", TraceContext(TRACE, SPAN, True)),
    (f"00-{TRACE}-{SPAN}-00", TraceContext(TRACE, SPAN, False)),
    (f" 00-{TRACE}-{SPAN}-01 ", TraceContext(TRACE, SPAN, True)),
    (f"01-{TRACE}-{SPAN}-03-future", TraceContext(TRACE, SPAN, True)),  # a later version
    (f"00-{TRACE}-{SPAN}-01-extra", None),  # version 00 has exactly four parts
    (f"ff-{TRACE}-{SPAN}-01", None),
    (f"00-{'0' * 32}-{SPAN}-01", None),
    (f"00-{TRACE}-{'0' * 16}-01", None),
    (f"00-{TRACE.upper()}-{SPAN}-01", None),  # W3C: lowercase only
    (f"00-{TRACE[:-1]}-{SPAN}-01", None),
    ("", None),
    (None, None),
])
def test_traceparent(value: object, expected: TraceContext | None) -> None:
    assert tracecontext.parse_traceparent(value) == expected


@pytest.mark.parametrize(("header", "expected"), [
    (f"Root=1-{TRACE[:8]}-{TRACE[8:]};Parent={SPAN};Sampled=1", TraceContext(TRACE, SPAN)),
    (f"Root=1-{TRACE[:8].upper()}-{TRACE[8:]};Parent={SPAN};Sampled=0",
     TraceContext(TRACE, SPAN, False)),
    (f"Sampled=1; Root=1-{TRACE[:8]}-{TRACE[8:]}", TraceContext(TRACE, None)),
    (f"Root=1-{TRACE[:8]}-{TRACE[8:]};Parent=xyz", TraceContext(TRACE, None)),
    (f"Root=2-{TRACE[:8]}-{TRACE[8:]}", None),
    ("Parent=53995c3f42cd8ad8", None),
    ("garbage", None),
])
def test_aws_trace_header(header: str, expected: TraceContext | None) -> None:
    assert tracecontext.parse_aws_trace_header(header) == expected


def test_traceparent_wins_over_the_aws_trace_header_and_bad_values_fall_through() -> None:
    other = "5759e988bd862e3fe1be46a994272793"
    xray = f"Root=1-{other[:8]}-{other[8:]};Parent=53995c3f42cd8ad8;Sampled=1"
    both = {
        "MessageAttributes": {"traceparent": attribute(f"00-{TRACE}-{SPAN}-01"),
                              "tracestate": attribute("congo=t61rcWkgMzE")},
        "Attributes": {"AWSTraceHeader": xray},
    }
    found = tracecontext.from_sqs(both)
    assert found == TraceContext(TRACE, SPAN, True, "congo=t61rcWkgMzE")
    both["MessageAttributes"]["traceparent"] = attribute("not-a-traceparent")
    assert tracecontext.from_sqs(both) == TraceContext(other, "53995c3f42cd8ad8", True)
    assert tracecontext.from_sqs({"Attributes": {"SentTimestamp": "1"}}) is None
    assert tracecontext.from_sqs({"MessageAttributes": {"traceparent": {"BinaryValue": b"x"}}}
                                 ) is None


def test_the_function_gets_traceparent_only_with_a_parent_span() -> None:
    base = Invocation("r", "f", ("python3", "main.py"), b"{}", 128, 1000, 1024, 64)
    plain = base.environment("/bin", "/tmp")
    assert "TRACEPARENT" not in plain and "TRACESTATE" not in plain
    context = TraceContext(TRACE, SPAN, True, "k=v")
    traced = Invocation("r", "f", ("python3", "main.py"), b"{}", 128, 1000, 1024, 64,
                        context.traceparent, context.tracestate).environment("/bin", "/tmp")
    assert traced == {**plain, "TRACEPARENT": f"00-{TRACE}-{SPAN}-01", "TRACESTATE": "k=v"}
    assert TraceContext(TRACE).traceparent is None
