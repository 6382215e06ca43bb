"""systemd's notify protocol (sd_notify(3)): READY, RELOADING, STOPPING, WATCHDOG and STATUS.

Every call is a no-op without ``NOTIFY_SOCKET``, so the supervisor runs the same under
systemd, in a terminal and in tests. A path starting with ``@`` is an abstract socket.
"""

from __future__ import annotations

import os
import socket
import time

from loguru import logger

SEND_TIMEOUT_S = 1.0


def notify(*assignments: str) -> bool:
    """Send ``KEY=value`` lines in one datagram; True when a notify socket took it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # systemd reads its socket all along; a full queue (10 datagrams) that stays full
            # must not stall the arbiter's loop for longer than this.
            sock.settimeout(SEND_TIMEOUT_S)
            sock.connect(target)
            sock.sendall("\n".join(assignments).encode())
    except OSError as exc:
        logger.warning(f"[SYSTEMD] cannot notify {address}: {exc}")
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    """RELOADING=1 with the MONOTONIC_USEC systemd needs in the same datagram."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def stopping() -> bool:
    return notify("STOPPING=1")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when not asked for."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class Notifier:
    """The supervisor's side of the protocol: STATUS only when it changes, READY once at
    start (then once after each RELOADING), WATCHDOG when due."""

    def __init__(self) -> None:
        self.interval = watchdog_interval()
        self.next_ping = 0.0
        self.text = ""
        self.ready_sent = False

    def status(self, text: str) -> None:
        if text != self.text:
            self.text = text
            status(text)

    def ready(self) -> None:
        self.ready_sent = True
        ready(self.text)

    def reloading(self) -> None:
        """RELOADING=1: READY=1 is owed again (the arbiter sends it when the new workers
        serve, or at once when the reload is refused)."""
        self.ready_sent = False
        reloading()

    def ping_if_due(self, now: float) -> None:
        if self.interval is not None and now >= self.next_ping:
            watchdog()
            self.next_ping = now + self.interval

    def next_due(self) -> float | None:
        """When the next WATCHDOG=1 is due (monotonic), or None without a watchdog."""
        return self.next_ping if self.interval is not None else None
