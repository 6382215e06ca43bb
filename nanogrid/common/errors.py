"""The agent's own exception tree; peers' errors (botocore, docker, redis, the OS) are
translated into it.

    NanoGridError
    ├── ConfigError               bad config file or value (refused at start / on reload)
    ├── TaskError                 ends a task with a FAILED result of errorType ``error_type``
    │   ├── InvalidMessage          INVALID_MESSAGE      -> delete (+ dead-letter)
    │   ├── RuntimeNotSupported     RUNTIME_NOT_SUPPORTED -> delete (+ dead-letter)
    │   │   └── RuntimeUnavailable    configured, but cannot start on this host (interpreter
    │   │                             or image missing): the same, with the reason
    │   ├── CodeNotFound            CODE_NOT_FOUND       -> keep for retry until max_attempts
    │   ├── InvalidCodePackage      INVALID_CODE_PACKAGE -> delete
    │   │   └── CorruptCodePackage    the zip cannot be read (a cached copy: downloaded again
    │   │                             first, the host may have lost part of it)
    │   └── InternalError           INTERNAL             -> delete
    │       ├── SandboxError          the sandbox broke; it is destroyed, not reused
    │       ├── HostFault             I/O error, a transfer cut off: keep for another try
    │       │   │                     (maybe on another host) until max_attempts
    │       │   ├── DiskFull            this host's disk is full: back to the queue with a
    │       │   │                       delay, the try not counted; no new work until space
    │       │   └── SandboxLost         the worker that owns a lent sandbox died under the
    │       │                           run: back to the queue with a delay, to run again
    │       ├── GaveUp                came back more than max_attempts times -> + dead-letter
    │       └── UnexpectedError       a bug while handling one message -> + dead-letter
    ├── ResultStoreUnavailable    Redis cannot take writes (down, failing over, read-only):
    │   │                         results go to the on-disk outbox, no new work is taken
    │   └── ResultRejected          Redis answered but refused this one write
    └── QueueUnavailable          SQS cannot be reached or refused a call: retried with backoff

A class's attributes say what becomes of the message: ``retryable`` (kept for another try
until ``queue.max_attempts``), ``dead_letter`` (copied to the dead-letter queue when it
ends), ``deferred`` (handed back with a delay, not counted as a try unless ``ran``: the
function had begun, so the run counts in ``attempt``).

``as_task_error`` turns whatever a task's handling raised into a TaskError; the worker then
decides keep / delete / dead-letter from the class alone, in one place
(nanogrid/worker/dispositions.py).
"""

from __future__ import annotations

import errno

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
HOST_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM, errno.EMFILE,
     errno.ENFILE}
)
"""OS errors that say this host (its disks, its limits) failed, not the task."""


class NanoGridError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(NanoGridError):
    """The config file or one of its values is not acceptable."""


class TaskError(NanoGridError):
    """A task cannot run (or finish); carries the contract errorType."""

    error_type = "INTERNAL"
    retryable = False
    dead_letter = False
    deferred = False
    ran = False


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


class CorruptCodePackage(InvalidCodePackage):
    """The zip cannot be read (not a zip, a damaged entry). A copy from this host's cache is
    downloaded again before the task fails: the host may have lost part of it (a crash
    before its pages reached the disk; the cache does not fsync)."""


class InternalError(TaskError):
    """The agent failed (not the function, not the message): reported, never crash-looped."""

    error_type = "INTERNAL"


class SandboxError(InternalError):
    """The sandbox could not be created or broke while running; it is not reused."""


class HostFault(InternalError):
    """This host could not do its part (a full or failing disk, a download cut off): another
    try, maybe on a healthy host, may succeed."""

    retryable = True
    dead_letter = True


class DiskFull(HostFault):
    """This host's disk (code cache, sandboxes) is full: the task did not get to run, so it
    goes back to the queue with a delay, this try not counted, and the worker takes no new
    work until a probe write works."""

    deferred = True


class SandboxLost(HostFault):
    """A call ran in an idle sandbox another worker of this host lent it, and that worker
    died during the run, taking the sandbox along: not the function's fault, so the message
    goes back with a delay and runs again (on any host), never FAILED for it. The function
    had begun, so the run counts in ``attempt`` (as a worker killed during a run does)."""

    deferred = True
    ran = True


class GaveUp(InternalError):
    """The message came back more than ``queue.max_attempts`` times (workers killed on it,
    drains that ran out of time, ...): it ends here."""

    dead_letter = True


class UnexpectedError(InternalError):
    """A bug while handling one message: that message ends, the worker goes on."""

    dead_letter = True


class ResultStoreUnavailable(NanoGridError):
    """Redis cannot take results right now (down, failing over, a read-only replica)."""


class ResultRejected(ResultStoreUnavailable):
    """Redis answered but refused this one write (e.g. out of memory, a bad value)."""


class QueueUnavailable(NanoGridError):
    """SQS could not be reached or refused the call."""


def host_fault(exc: OSError, where: str) -> HostFault | None:
    """``exc`` as a HostFault naming ``where`` when it is a host errno, else None."""
    if exc.errno not in HOST_ERRNOS:
        return None
    detail = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
    fault = DiskFull if exc.errno in DISK_FULL_ERRNOS else HostFault
    return fault(f"{where}: {detail}")


def as_task_error(exc: BaseException) -> TaskError:
    """Whatever handling a task raised, as a TaskError: itself, a HostFault for an OS error
    of this host, else an UnexpectedError naming the exception."""
    if isinstance(exc, TaskError):
        return exc
    if isinstance(exc, OSError):
        fault = host_fault(exc, f"host I/O error on {exc.filename or 'a local file'}")
        if fault is not None:
            return fault
    text = " ".join(str(exc).split())[:300]
    return UnexpectedError(f"internal error in the worker: {type(exc).__name__}: {text}")
