"""systemd's service notification protocol (``sd_notify(3)``), without libsystemd.

With ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``: an AF_UNIX datagram socket (a path,
or an abstract name written with a leading ``@``).  A service sends newline-separated
``KEY=VALUE`` assignments to it: ``READY=1`` once it serves, ``STATUS=...`` for
``systemctl status``, ``WATCHDOG=1`` at least every ``$WATCHDOG_USEC`` microseconds when the
unit sets ``WatchdogSec=``, ``STOPPING=1`` on the way out.  ``$WATCHDOG_PID``, when set,
names the process the watchdog is meant for.  Sending never blocks and never raises: a
missing or full socket only loses that notification (systemd then sees a missed watchdog,
which is what it is for).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class SystemdNotifier:
    """A connected datagram socket to ``$NOTIFY_SOCKET``."""

    def __init__(self, address: str) -> None:
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.sent = 0
        self.lost = 0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier | None:
        """A notifier if the service manager asked for notifications (``$NOTIFY_SOCKET``), else None."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if not address or not (address.startswith("/") or address.startswith("@")):
            return None  # unset, or a vsock address this implementation does not speak
        return cls(address)

    def notify(self, state: str) -> bool:
        try:
            self._sock.sendto(state.encode(), self.address)
        except OSError:
            self.lost += 1
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self._sock.close()


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pets (half systemd's timeout), or None without a watchdog."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (e.g. a wrapper's)
    return usec / 2e6
