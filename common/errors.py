"""The agent's own exception tree; peers' errors (botocore, docker, redis) are translated into it.

    NanoGridError
    ├── ConfigError               bad config file or value (refused at start / on reload)
    ├── TaskError                 ends a task with a FAILED result of errorType ``error_type``
    │   ├── InvalidMessage          INVALID_MESSAGE      -> delete (+ dead-letter)
    │   ├── RuntimeNotSupported     RUNTIME_NOT_SUPPORTED -> delete (+ dead-letter)
    │   │   └── RuntimeUnavailable    configured, but cannot start on this host (interpreter
    │   │                             or image missing): the same, with the reason
    │   ├── CodeNotFound            CODE_NOT_FOUND       -> keep for retry until max_attempts
    │   ├── InvalidCodePackage      INVALID_CODE_PACKAGE -> delete
    │   └── InternalError           INTERNAL             -> delete
    │       └── SandboxError          the sandbox broke; it is destroyed, not reused
    ├── ResultStoreUnavailable    Redis is down: the result goes to the on-disk outbox
    └── QueueUnavailable          SQS cannot be reached or refused a call: retried with backoff

The worker decides delete / keep / dead-letter from the class alone, in one place.
"""

from __future__ import annotations


class NanoGridError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(NanoGridError):
    """The config file or one of its values is not acceptable."""


class TaskError(NanoGridError):
    """A task cannot run (or finish); carries the contract errorType."""

    error_type = "INTERNAL"
    retryable = False
    dead_letter = False


class InvalidMessage(TaskError):
    error_type = "INVALID_MESSAGE"
    dead_letter = True


class RuntimeNotSupported(TaskError):
    error_type = "RUNTIME_NOT_SUPPORTED"
    dead_letter = True


class RuntimeUnavailable(RuntimeNotSupported):
    """The runtime is configured but cannot start here (its interpreter or image is missing).

    Dead-lettered like an unknown runtime, so the tasks can be replayed once the host is fixed.
    """


class CodeNotFound(TaskError):
    """The code zip is missing or S3 cannot be reached: worth retrying later."""

    error_type = "CODE_NOT_FOUND"
    retryable = True
    dead_letter = True


class InvalidCodePackage(TaskError):
    error_type = "INVALID_CODE_PACKAGE"


class InternalError(TaskError):
    """The agent failed (not the function, not the message): reported, never crash-looped."""

    error_type = "INTERNAL"


class SandboxError(InternalError):
    """The sandbox could not be created or broke while running; it is not reused."""


class ResultStoreUnavailable(NanoGridError):
    """Redis cannot take the result right now."""


class QueueUnavailable(NanoGridError):
    """SQS could not be reached or refused the call."""
