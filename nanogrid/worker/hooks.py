"""Hooks around the stages of a message's run: the worker's seam (dramatiq's Middleware).

A stage is one named step of ``MessageRun.run`` (pipeline.py), in this order: ``claim``,
``fetch``, ``sandbox`` (a sandbox taken, a cold one made), ``unpack``, ``run``, ``end``
(the result published, the message deleted or handed back); ``message`` wraps them all.
A hook sees each stage's start and end, with the error that ended it, if any, and each
receive of the worker's loop. Timing,
tracing and the benchmark's spans are hooks; a new per-stage concern is a new hook, not an
edit of the pipeline.

Hooks are per worker and shared by the threads that run messages: keep per-message state
on the ``MessageRun`` (its ``notes``), not on the hook. A hook must not raise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .phases import PHASES, PhaseClock
from .result import Result
from .sqs import Message
from .task import Task
from .tracecontext import TraceContext

STAGES = ("message", "claim", "fetch", "sandbox", "unpack", "run", "end")


class MessageRun(Protocol):
    """What a hook sees of a message's run (pipeline.py's MessageRun)."""

    message: Message
    task: Task | None
    """None while the body is not (or could not be) parsed."""
    clock: PhaseClock
    notes: dict[str, Any]
    """Per-message state of hooks, by a key of each hook's own."""
    trace: TraceContext | None
    """The trace context the function is given; a hook may put a span of its own there."""
    result: Result | None
    """The result, once the run has one (set as its ``end`` starts)."""


class Hook:
    """Base of every hook: each method does nothing."""

    def received(self, messages: Sequence[Message], started: float) -> None:
        """A receive that began at ``started`` (time.monotonic) returned ``messages``."""

    def before(self, stage: str, run: MessageRun) -> None:
        """``stage`` of ``run`` starts."""

    def after(self, stage: str, run: MessageRun, error: BaseException | None) -> None:
        """``stage`` of ``run`` ended (``error``: what it raised, None when it did not)."""

    def close(self) -> None:
        """The worker stops (after its runs ended): flush what the hook holds."""


class PhaseTimer(Hook):
    """The result's ``timings``: how long a message spent fetching, unpacking and in its
    sandbox (``MessageRun.clock``)."""

    def before(self, stage: str, run: MessageRun) -> None:
        if stage in PHASES:
            run.clock.start(stage)

    def after(self, stage: str, run: MessageRun, error: BaseException | None) -> None:
        if stage in PHASES:
            run.clock.stop(stage)


class ReadyAtRun(Hook):
    """Tells the worker's loop that a run is ready (``Inflight.ready``) as its function starts
    in its sandbox: claim, code, sandbox and unpack done. What the worker's other threads do
    from then on (the loop's next receive, a millisecond of boto3) shares the interpreter
    with no step of this run's (inflight.py)."""

    def __init__(self, ready: Callable[[], None]) -> None:
        self._ready = ready

    def before(self, stage: str, run: MessageRun) -> None:
        if stage == "run":
            self._ready()
