"""The daemon's side of systemd's service protocols: sd_notify and socket activation.

sd_notify (see sd_notify(3)): the service manager passes `NOTIFY_SOCKET`, a
unix datagram socket (a path, or `@name` in the abstract namespace); the
daemon sends newline-separated `KEY=VALUE` assignments to it:

    READY=1                      listening, functions loaded
    STATUS=...                   one line shown by `systemctl status`
    RELOADING=1 + MONOTONIC_USEC reloading the config (READY=1 again when done)
    STOPPING=1                   shutting down
    WATCHDOG=1                   alive; sent every WATCHDOG_USEC / 2

Watchdog pings come from a task on the event loop, never from a thread: a
loop that is blocked stops pinging, and systemd restarts the daemon.

Socket activation (see sd_listen_fds(3)): `LISTEN_PID` names our pid and
`LISTEN_FDS` counts the listening sockets passed from fd 3 on.

Both read their variables once and remove them from the environment, so the
workers the daemon starts never see them. Without systemd every call here is
a no-op: `faasd serve` runs the same in a terminal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Callable, MutableMapping

log = logging.getLogger("faasd.sdnotify")

SD_LISTEN_FDS_START = 3


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares MONOTONIC_USEC with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends sd_notify messages; does nothing when not started by systemd."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None
        self._warned = False
        if address:
            # Abstract-namespace sockets are spelled with a leading '@'.
            self._target = "\0" + address[1:] if address.startswith("@") else address
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None,
                         *, unset: bool = True) -> "Notifier":
        """The notifier systemd asked for, if any; its variables are taken out of `environ`."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        watchdog_usec: int | None = None
        raw_usec, raw_pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if raw_usec:
            try:
                usec = int(raw_usec)
                # WATCHDOG_PID, when set, names the process that must ping.
                if usec > 0 and (not raw_pid or int(raw_pid) == os.getpid()):
                    watchdog_usec = usec
            except ValueError:
                log.warning("ignoring malformed WATCHDOG_USEC=%r / WATCHDOG_PID=%r", raw_usec, raw_pid)
        if unset:
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(key, None)
        if address and not (address.startswith("/") or address.startswith("@")):
            log.warning("ignoring NOTIFY_SOCKET=%r: not an absolute path or @abstract name", address)
            address = None
        return cls(address, watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the deadline), or None without a watchdog."""
        if not self.enabled or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def send(self, *assignments: str) -> bool:
        """Send one datagram of `KEY=VALUE` lines. True if it was delivered."""
        if self._socket is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            self._socket.sendto(message, self._target)
            return True
        except OSError as exc:
            # The manager may be restarting; systemd itself treats notify as best effort.
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self.address, exc)
                self._warned = True
            return False

    @staticmethod
    def _status(text: str) -> str:
        return "STATUS=" + " ".join(text.split())  # one line: newlines would end the field

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([self._status(status)] if status else []))

    def reloading(self, status: str | None = None) -> bool:
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}",
                         *([self._status(status)] if status else []))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([self._status(status)] if status else []))

    def status(self, text: str) -> bool:
        return self.send(self._status(text))

    def ping(self) -> bool:
        return self.send("WATCHDOG=1")

    async def run_watchdog(self) -> None:
        """Ping every half watchdog period until cancelled; returns at once without a watchdog."""
        interval = self.watchdog_interval
        if interval is None:
            return
        log.info("systemd watchdog: pinging every %.3gs", interval)
        while True:
            self.ping()
            await asyncio.sleep(interval)

    async def keep_status(self, describe: Callable[[], str], interval: float = 10.0) -> None:
        """Send STATUS=describe() whenever it changes (checked every `interval` s) until cancelled."""
        if not self.enabled:
            return
        last = describe()  # what READY=1 just said
        while True:
            await asyncio.sleep(interval)
            try:
                text = describe()
            except Exception:
                log.exception("cannot describe the daemon's status")
                continue
            if text != last:
                self.status(text)
                last = text

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def listen_sockets(environ: MutableMapping[str, str] | None = None,
                   *, unset: bool = True) -> list[socket.socket]:
    """The listening sockets systemd passed us (LISTEN_FDS), in order; [] if none.

    Each is made non-blocking and close-on-exec, so workers never inherit them.
    """
    env = os.environ if environ is None else environ
    raw_pid, raw_fds = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if not raw_pid or not raw_fds:
        return []
    try:
        pid, count = int(raw_pid), int(raw_fds)
    except ValueError:
        log.warning("ignoring malformed LISTEN_PID=%r / LISTEN_FDS=%r", raw_pid, raw_fds)
        return []
    if pid != os.getpid():
        return []  # meant for another process (we were started by one that got them)
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets
