"""Nothing but loopback: the suite's client processes reach the gateway and nothing else. Used by conftest for
the pytest process, and by the scripts the suite runs in processes of their own."""

from __future__ import annotations

import ipaddress
import sys
import threading
from dataclasses import dataclass, field


def is_loopback(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@dataclass
class NetworkGuard:
    """A Python audit hook on name lookups and socket connects. A lookup of, or a connect to, anything but a
    loopback address is refused (OSError, before any packet leaves) and kept in `refused`; every connect is kept
    in `connects`. Audit hooks cannot be removed: installed once per process."""

    refused: list[str] = field(default_factory=list)
    connects: list[tuple] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self) -> "NetworkGuard":
        sys.addaudithook(self._hook)
        return self

    def take(self) -> tuple[list[str], list[tuple]]:
        """What was refused and connected to since the last take."""
        with self._lock:
            refused, connects = self.refused, self.connects
            self.refused, self.connects = [], []
        return refused, connects

    def _hook(self, event: str, args) -> None:
        if event == "socket.getaddrinfo":
            host, what = args[0], f"lookup of {args[0]!r} port {args[1]!r}"
        elif event in ("socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"):
            host, what = args[0], f"{event.removeprefix('socket.')} {args[0]!r}"
        elif event == "socket.connect":
            address = args[1]
            if not isinstance(address, tuple):  # a Unix socket
                return
            host, what = address[0], f"connect to {address!r}"
            with self._lock:
                self.connects.append(address[:2])
        else:
            return
        if not is_loopback(host):
            with self._lock:
                self.refused.append(what)
            raise OSError(f"tests/sdk: refused {what}: the suite reaches nothing but loopback")
