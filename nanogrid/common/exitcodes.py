"""Exit codes of the supervisor and its workers, named (dramatiq's cli.py does the same)."""

EXIT_OK = 0
EXIT_SUPERVISOR_ERROR = 1
"""The supervisor failed: its HTTP port could not be bound, or an unexpected error."""
EXIT_CONFIG = 2
"""The config file is missing or invalid."""
EXIT_BOOT_ERROR = 3
"""A worker could not boot: SQS refuses the queue, or the runner is unusable. (An outage of
Redis or SQS is not a boot error: the worker boots DEGRADED and waits for it.)"""
EXIT_WORKER_CRASH = 4
"""A worker died of an unexpected exception."""

WORKER_EXIT_NAMES = {
    EXIT_OK: "EXIT_OK",
    EXIT_CONFIG: "EXIT_CONFIG",
    EXIT_BOOT_ERROR: "EXIT_BOOT_ERROR",
    EXIT_WORKER_CRASH: "EXIT_WORKER_CRASH",
}
"""A worker's exit code -> its constant's name, for the arbiter's log lines."""
