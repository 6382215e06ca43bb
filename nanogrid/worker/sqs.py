"""The SQS side of a worker: long-poll, delete, release, dead-letter, change visibility (the
calls; visibility.py keeps running messages invisible, deleter.py batches the deletes).

boto3 finds the endpoint and credentials through its own chain (``AWS_ENDPOINT_URL``,
instance profile), so the same code serves real SQS and a local emulator; the region is the
one the agent resolved at start (nanogrid/common/awsregion.py). Heartbeats have a client of their
own with short timeouts and few retries: a renewal stuck behind a long poll or a slow connection
would let a running message become visible.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from nanogrid.common import awsclient
from nanogrid.common.config import QueueConfig
from nanogrid.common.errors import QueueUnavailable

from . import tracecontext
from .tracecontext import TraceContext

DEAD_LETTER_REASON_CHARS = 256
"""The reason a dead-letter copy carries is cut here: attributes count against the size limit."""
HEARTBEAT_TIMEOUTS_S = (2, 5)
"""Connect and read timeouts of the heartbeat client."""
SQS_BATCH_MAX = 10
"""The most messages one SQS batch call takes."""
RECEIVE_SYSTEM_ATTRIBUTES = [
    "ApproximateReceiveCount", "SentTimestamp", tracecontext.AWS_TRACE_HEADER,
]
RECEIVE_MESSAGE_ATTRIBUTES = ["All"]
"""All of them: the trace context is read from them, and a message sent again (redrive.py)
carries the producer's attributes."""
EARLIER_RECEIVES = "nanogridEarlierReceives"
FIRST_SENT = "nanogridFirstSent"
"""Message attributes of a copy sent again (redrive.py): the receives of the messages it
was sent from, and when the first of them was sent (epoch ms)."""


@dataclass(frozen=True)
class Message:
    message_id: str
    receipt_handle: str
    body: str
    receives: int
    """ApproximateReceiveCount: 1 on the first delivery (0 when SQS did not say). Not the
    task's attempt: tries are counted in Redis (claim.py), since a receive handed back
    untried (Redis or the disk away, a duplicate waiting) is no try."""
    received_at: float = field(default_factory=time.time)
    """Epoch seconds when this worker received it."""
    received_mono: float = field(default_factory=time.monotonic)
    """The same moment on the monotonic clock the task's timings use."""
    sent_at: float | None = None
    """Epoch seconds of the SentTimestamp SQS gave it (None when SQS did not say)."""
    trace: TraceContext | None = None
    """The trace context it was sent with (tracecontext.py), None when none."""
    earlier_receives: int = 0
    """The receives of the messages this one was sent again from (redrive.py)."""
    attributes: dict[str, Any] = field(default_factory=dict, compare=False)
    """Its message attributes as SQS gave them (a copy sent again carries them)."""
    trace_header: str | None = field(default=None, compare=False)
    """Its ``AWSTraceHeader`` system attribute, None when it had none."""

    @property
    def trace_id(self) -> str | None:
        return self.trace.trace_id if self.trace is not None else None

    @property
    def all_receives(self) -> int:
        """Its receives, with those of the messages it was sent again from."""
        return self.earlier_receives + self.receives

    @property
    def queued_ms(self) -> float:
        """How long it waited in SQS before this receive (since the first send of a message
        sent again); never negative (clock skew)."""
        if self.sent_at is None:
            return 0.0
        return max(0.0, (self.received_at - self.sent_at) * 1000)


def make_client(
    connect_timeout: float, read_timeout: float, tries: int, region: str | None = None
) -> Any:
    """An SQS client with these timeouts and at most ``tries`` tries per call (retries
    included)."""
    return awsclient.client(
        "sqs",
        region,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"total_max_attempts": tries, "mode": "standard"},
    )


class TaskQueue:
    def __init__(self, config: QueueConfig, client: Any = None, region: str | None = None) -> None:
        self.config = config
        self._client = client or make_client(
            2, config.wait_time_seconds + 10, tries=3, region=region
        )
        self.errors = 0
        """Calls SQS failed (after boto3's retries): /metrics."""
        self.dead_lettered = 0

    @classmethod
    def for_heartbeats(cls, config: QueueConfig, region: str | None = None) -> TaskQueue:
        """A queue on a client of its own with short timeouts, for visibility renewals."""
        return cls(config, make_client(*HEARTBEAT_TIMEOUTS_S, tries=2, region=region))

    def check(self) -> str | None:
        """At boot: raise QueueUnavailable when SQS refuses the queue (missing, no access: a
        config error to fail fast on); return why when SQS cannot be reached now (connection,
        5xx, throttling: trouble that passes, which the receive loop waits out); else None."""
        try:
            self._client.get_queue_attributes(QueueUrl=self.config.url, AttributeNames=["QueueArn"])
        except (BotoCoreError, ClientError) as exc:
            if _passing(exc):
                return f"SQS get_queue_attributes failed: {exc}"
            raise QueueUnavailable(f"SQS get_queue_attributes failed: {exc}") from None
        return None

    def check_dead_letter(self) -> list[str]:
        """What is wrong with the dead-letter set-up, one line each (empty when all is well).

        The dead-letter queue must exist and take plain messages (a FIFO queue refuses them),
        and the task queue's own redrive policy must not move a message to its dead-letter
        queue before this agent has had its ``max_attempts`` tries.
        """
        problems = []
        url = self.config.dead_letter_url
        if url is not None:
            try:
                attrs = self._call(
                    "get_queue_attributes", QueueUrl=url, AttributeNames=["FifoQueue"]
                ).get("Attributes", {})
                if attrs.get("FifoQueue") == "true":
                    problems.append(
                        f"queue.dead_letter_url {url} is a FIFO queue: it refuses the copies"
                    )
            except QueueUnavailable as exc:
                problems.append(
                    f"queue.dead_letter_url {url} cannot be used ({exc}): copies will fail"
                )
        try:
            count = self.redrive_limit()
        except QueueUnavailable as exc:
            problems.append(str(exc))
            return problems
        if count and count < self.config.max_attempts:
            problems.append(
                f"the task queue's redrive policy moves a message to its dead-letter queue "
                f"after {count} receives, before queue.max_attempts ({self.config.max_attempts})"
            )
        return problems

    def redrive_limit(self) -> int:
        """The task queue's redrive policy's maxReceiveCount (0: it has none); raises
        QueueUnavailable when it cannot be read."""
        try:
            attrs = self._call(
                "get_queue_attributes", QueueUrl=self.config.url, AttributeNames=["RedrivePolicy"]
            ).get("Attributes", {})
            return int(json.loads(attrs.get("RedrivePolicy") or "{}").get("maxReceiveCount", 0))
        except (QueueUnavailable, ValueError, TypeError, AttributeError) as exc:
            raise QueueUnavailable(f"cannot read the task queue's redrive policy: {exc}") from None

    def receive(self, max_messages: int = 1, wait_seconds: int | None = None) -> list[Message]:
        """Long-poll for up to ``max_messages`` (``wait_time_seconds`` unless told otherwise)."""
        wait = self.config.wait_time_seconds if wait_seconds is None else wait_seconds
        reply = self._call(
            "receive_message",
            QueueUrl=self.config.url,
            MaxNumberOfMessages=max_messages,
            WaitTimeSeconds=wait,
            VisibilityTimeout=self.config.visibility_timeout_seconds,
            MessageSystemAttributeNames=RECEIVE_SYSTEM_ATTRIBUTES,
            MessageAttributeNames=RECEIVE_MESSAGE_ATTRIBUTES,
        )
        received_at, received_mono = time.time(), time.monotonic()
        return [_message(m, received_at, received_mono) for m in reply.get("Messages", [])]

    def delete(self, message: Message) -> None:
        self._call("delete_message", QueueUrl=self.config.url, ReceiptHandle=message.receipt_handle)

    def delete_batch(self, messages: list[Message]) -> None:
        """Delete up to 10 messages in one call; raise QueueUnavailable naming any that failed."""
        reply = self._call(
            "delete_message_batch",
            QueueUrl=self.config.url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": m.receipt_handle} for i, m in enumerate(messages)
            ],
        )
        failed = reply.get("Failed", [])
        if failed:
            ids = ", ".join(messages[int(f["Id"])].message_id for f in failed)
            raise QueueUnavailable(f"SQS could not delete {ids}: {failed[0].get('Message', '')}")

    def release(self, message: Message) -> None:
        """Make the message visible again at once (we will not run it)."""
        self.extend(message, 0)

    def extend(self, message: Message, seconds: int) -> None:
        self._call(
            "change_message_visibility",
            QueueUrl=self.config.url,
            ReceiptHandle=message.receipt_handle,
            VisibilityTimeout=seconds,
        )

    def extend_batch(self, messages: list[Message], seconds: int) -> dict[Message, str]:
        """Change the visibility of up to 10 messages in one call; the ones SQS refused ->
        why. Raises QueueUnavailable when the call itself failed."""
        reply = self._call(
            "change_message_visibility_batch",
            QueueUrl=self.config.url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": m.receipt_handle, "VisibilityTimeout": seconds}
                for i, m in enumerate(messages)
            ],
        )
        return {
            messages[int(f["Id"])]: f"{f.get('Code', '')} {f.get('Message', '')}".strip()
            for f in reply.get("Failed", [])
        }

    def send(self, body: str, delay: int, attributes: dict[str, Any],
             system_attributes: dict[str, Any]) -> str:
        """Send a message to the task queue, due in ``delay`` seconds (0-900); its MessageId."""
        params: dict[str, Any] = {"QueueUrl": self.config.url, "MessageBody": body,
                                  "DelaySeconds": delay}
        if attributes:
            params["MessageAttributes"] = attributes
        if system_attributes:
            params["MessageSystemAttributes"] = system_attributes
        return str(self._call("send_message", **params)["MessageId"])

    def dead_letter(self, message: Message, reason: str) -> bool:
        """Copy the message to the dead-letter queue; False when none is configured.

        The copy is the body as received plus three short attributes (the reason cut at
        DEAD_LETTER_REASON_CHARS), so a body near SQS's size limit still fits.
        """
        if self.config.dead_letter_url is None:
            return False
        self._call(
            "send_message",
            QueueUrl=self.config.dead_letter_url,
            MessageBody=message.body or "<empty>",
            MessageAttributes={
                "nanogridError": {
                    "DataType": "String",
                    "StringValue": reason[:DEAD_LETTER_REASON_CHARS] or "-",
                },
                "originalMessageId": {"DataType": "String", "StringValue": message.message_id},
                "receiveCount": {"DataType": "Number", "StringValue": str(message.receives)},
            },
        )
        self.dead_lettered += 1
        return True

    def _call(self, operation: str, **params: Any) -> Any:
        try:
            return getattr(self._client, operation)(**params)
        except (BotoCoreError, ClientError) as exc:
            self.errors += 1
            raise QueueUnavailable(f"SQS {operation} failed: {exc}") from None


def _passing(exc: BotoCoreError | ClientError) -> bool:
    """True for trouble that may pass on its own: no connection, a 5xx, throttling."""
    if isinstance(exc, awsclient.UNREACHABLE):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or "Throttl" in exc.response.get("Error", {}).get("Code", "")
    return False


def _message(m: dict[str, Any], received_at: float, received_mono: float) -> Message:
    system, attributes = m.get("Attributes", {}), m.get("MessageAttributes", {})
    first_sent = attributes.get(FIRST_SENT, {}).get("StringValue")
    return Message(
        message_id=m["MessageId"],
        receipt_handle=m["ReceiptHandle"],
        body=m.get("Body", ""),
        receives=_number(system.get("ApproximateReceiveCount")),
        earlier_receives=_number(attributes.get(EARLIER_RECEIVES, {}).get("StringValue")),
        received_at=received_at,
        received_mono=received_mono,
        sent_at=_epoch_s(first_sent or system.get("SentTimestamp")),
        trace=tracecontext.from_sqs(m),
        attributes=attributes,
        trace_header=system.get(tracecontext.AWS_TRACE_HEADER),
    )


def _number(text: Any) -> int:
    """A count SQS gave as text; 0 when it did not say (a receive count is only reported:
    tries are counted in Redis)."""
    try:
        return max(0, int(text))
    except (TypeError, ValueError):
        return 0


def _epoch_s(millis: str | None) -> float | None:
    """SQS timestamps are epoch milliseconds as strings."""
    try:
        return int(millis) / 1000 if millis is not None else None
    except ValueError:
        return None
