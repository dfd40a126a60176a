"""The systemd notify protocol, spoken directly: one datagram per message to $NOTIFY_SOCKET
(a path, or an abstract socket when it starts with '@'). Without $NOTIFY_SOCKET every call is a
no-op, so the daemon runs the same by hand."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)


class SystemdNotifier:
    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)
        self.watchdog_interval_seconds = self._watchdog_interval(environ)

    @staticmethod
    def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
        """Half the watchdog period systemd asks for, if it asks this process."""
        usec = environ.get("WATCHDOG_USEC")
        pid = environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 1_000_000 / 2
        except ValueError:
            return None

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, *assignments: str) -> None:
        if self._socket is None:
            return
        message = "\n".join(assignments).encode()
        try:
            self._socket.sendto(message, self._address)
        except OSError as exc:  # systemd gone or socket full: never a reason to stop serving
            log.warning("systemd_notify_failed", error=str(exc))

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
