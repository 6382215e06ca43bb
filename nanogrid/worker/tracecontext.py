"""The trace context a task message arrives with, read once at receive.

A controller sends it as the W3C ``traceparent`` (and ``tracestate``) message attribute, or
SQS carries X-Ray's ``AWSTraceHeader`` system attribute (``Root=1-5759e988-bd862e3f...;
Parent=53995c3f42cd8ad8;Sampled=1``, as Lambda and the X-Ray SDKs send it); ``traceparent``
wins when both are there. Its trace id goes into the result (``traceId``), every log line of
the invocation and, with a parent span, into the function's ``TRACEPARENT``. Malformed values
are ignored: a bad header never fails a task.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
AWS_TRACE_HEADER = "AWSTraceHeader"
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_XRAY_ROOT = re.compile(r"1-([0-9a-fA-F]{8})-([0-9a-fA-F]{24})")
_HEX16 = re.compile(r"[0-9a-fA-F]{16}")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
MAX_TRACESTATE = 512
"""W3C allows 32 list members; longer values are cut (the function gets what fits)."""


@dataclass(frozen=True)
class TraceContext:
    trace_id: str
    """32 lowercase hex digits (W3C)."""
    span_id: str | None = None
    """The parent span (16 lowercase hex), None when the producer named none."""
    sampled: bool = True
    tracestate: str | None = None

    @property
    def traceparent(self) -> str | None:
        """The W3C ``traceparent`` a child of this span uses; None without a parent span."""
        if self.span_id is None:
            return None
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def parse_traceparent(value: Any, tracestate: Any = None) -> TraceContext | None:
    """A W3C ``traceparent`` (version 00, or a later one read as 00); None when invalid."""
    if not isinstance(value, str):
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    state = tracestate.strip()[:MAX_TRACESTATE] if isinstance(tracestate, str) else None
    return TraceContext(trace_id, span_id, bool(int(flags, 16) & 1), state or None)


def parse_aws_trace_header(value: Any) -> TraceContext | None:
    """X-Ray's ``Root=1-{8 hex time}-{24 hex};Parent={16 hex};Sampled=0|1``; None when it
    holds no valid Root."""
    if not isinstance(value, str):
        return None
    fields = {}
    for part in value.split(";"):
        key, _, val = part.strip().partition("=")
        fields[key] = val.strip()
    root = _XRAY_ROOT.fullmatch(fields.get("Root", ""))
    if root is None:
        return None
    trace_id = (root.group(1) + root.group(2)).lower()
    if trace_id == _ZERO_TRACE:
        return None
    parent = fields.get("Parent", "")
    span_id = parent.lower() if _HEX16.fullmatch(parent) and parent != _ZERO_SPAN else None
    return TraceContext(trace_id, span_id, fields.get("Sampled", "1") != "0")


def from_sqs(message: dict[str, Any]) -> TraceContext | None:
    """The trace context of one message of a ReceiveMessage reply: ``traceparent`` (a
    String message attribute), else ``AWSTraceHeader``; None when it carries none."""
    attributes = message.get("MessageAttributes")
    if attributes:
        found = parse_traceparent(
            _string(attributes.get(TRACEPARENT)), _string(attributes.get(TRACESTATE))
        )
        if found is not None:
            return found
    header = message.get("Attributes", {}).get(AWS_TRACE_HEADER)
    return parse_aws_trace_header(header) if header else None


def _string(attribute: Any) -> str | None:
    return attribute.get("StringValue") if isinstance(attribute, dict) else None
