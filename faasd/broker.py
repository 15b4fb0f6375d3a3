"""One robust RabbitMQ connection, shared code for its two users (AMQP triggers, cluster).

This module owns what both connections have in common: opening the aio-pika
robust connection in the background, retrying with backoff while the broker
does not answer, the optional setup steps run once it first answers (a
failing step is said loudly and retried slowly), the close and reconnect
callbacks, the `state` dict (state, url, since, connects, disconnects,
last_error) that /readyz, /metrics, /system/* and the describers read, the
`ready` event (connected and set up), and closing it all. The users keep what
is their own: the connection url's defaults, the log wording (a prefix and a
few phrases), what they do on each state change, and what they do with the
connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustConnection
from yarl import URL

CONNECT_TIMEOUT_S = 10
RETRY_MAX_S = 30.0
LET_GO_TIMEOUT_S = 5.0

Setup = Callable[[AbstractRobustConnection], Awaitable[None]]


class SetupRefused(Exception):
    """Raised by a setup step when this process must not use the broker at all (the cluster's
    node name is another live node's): the connection is closed and not tried again."""


def redact(url: str) -> str:
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else str(parsed)


def vhost_of(url: str) -> str:
    """The virtual host a broker url names, as aiormq opens it ("/" when none)."""
    path = URL(url).path
    return path[1:].replace("%2F", "/") if path not in ("", "/") else "/"


def vhost_refused(exc: BaseException, url: str) -> str | None:
    """What to fix when connecting failed because the broker refused the url's virtual host."""
    if not (isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc)):
        return None
    # The broker closed the connection where it answers Connection.Open: it
    # refuses the virtual host (aiormq's error shows no more than the frame).
    user = URL(url).user or "guest"
    return (f"the broker refused to open virtual host {vhost_of(url)!r}: it does not exist, or user "
            f"{user!r} has no permission on it (rabbitmqctl list_vhosts, list_permissions)")


async def let_go(call: Awaitable[Any], log: logging.Logger, what: str,
                 timeout: float = LET_GO_TIMEOUT_S) -> bool:
    """Await a broker call that lets something go (a consumer's cancel, a
    channel's close); True if it completed.

    A robust channel's call waits for a lost connection to come back, which
    at shutdown with the broker gone is never: it is given up after
    `timeout`. A failure is logged at debug level only, since the broker lets
    go of whatever a closed connection held anyway.
    """
    try:
        await asyncio.wait_for(call, timeout)
        return True
    except Exception:
        log.debug("%s failed", what, exc_info=True)
        return False


class BrokerConnection:
    """The robust connection, its reconnect loop with backoff, its state and its close.

    `url` None means no broker is configured: the state says "disabled" and
    nothing is ever opened. `connect_url()` gives the url to connect with
    (the user's defaults added). Log lines start with `prefix` ("AMQP ",
    "cluster: "); `waiting` says who waits for the broker, `restored` what a
    reconnect restores. `on_state(state)` is called after every state change.
    """

    def __init__(self, url: str | None, *, connect_url: Callable[[], str], log: logging.Logger,
                 prefix: str, waiting: str, restored: str, initial: str = "connecting",
                 on_state: Callable[[str], None] | None = None, task_name: str | None = None,
                 close_timeout: float | None = None, close_error: str = "closing a broker connection failed",
                 ) -> None:
        self.url = url
        self.connection: AbstractRobustConnection | None = None
        self.ready = asyncio.Event()  # connected, and every setup step has run
        self.state: dict[str, Any] = {
            "state": initial if url else "disabled",
            "url": redact(url) if url else None,
            "since": time.time(),
            "connects": 0,
            "disconnects": 0,
            "last_error": None,
        }
        self._connect_url = connect_url
        self._log = log
        self._prefix = prefix
        self._waiting = waiting
        self._restored = restored
        self._on_state = on_state
        self._task_name = task_name
        self._close_timeout = close_timeout
        self._close_error = close_error
        self._setups: list[Setup] = []
        self._task: asyncio.Task | None = None
        self._closed = False

    # -- what users call -----------------------------------------------------------------

    def on_connect(self, setup: Setup) -> None:
        """Run `setup(connection)` once the broker first answers (aio-pika replays it after drops)."""
        self._setups.append(setup)

    def start(self) -> None:
        """Open the connection in the background (once; never without a url or after close)."""
        if self.url and self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self._task_name)

    @property
    def connected(self) -> bool:
        return self.ready.is_set() and self.state["state"] == "connected"

    async def wait(self, timeout: float | None) -> AbstractRobustConnection | None:
        """The connection once it is up and set up; None if that takes longer than `timeout`."""
        if not self.connected:
            try:
                await asyncio.wait_for(self.ready.wait(), timeout)
            except asyncio.TimeoutError:
                return None
        return self.connection if self.state["state"] == "connected" else None

    def closing(self) -> None:
        """From now on a lost connection is a closed one, and no retry starts."""
        self._closed = True

    async def close(self, final: str = "closed") -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.connection is not None:
            await self._close_quietly(self.connection)
        self.set_state(final)

    def set_state(self, state: str, error: str | None = None) -> None:
        if self.state["state"] != state:
            self.state["since"] = time.time()
        self.state["state"] = state
        if error is not None:
            self.state["last_error"] = error
        if self._on_state is not None:
            self._on_state(state)

    # -- what users may refine -----------------------------------------------------------

    def opened(self, connection: AbstractRobustConnection) -> None:
        """Called when a connection is opened, before the setup steps."""

    def connected_detail(self) -> str:
        """Appended to the "connected to" log line."""
        return ""

    # -- the loop and the callbacks ------------------------------------------------------

    async def _run(self) -> None:
        log = self._log
        delay = 1.0
        failures = 0
        self.set_state("connecting")
        while not self._closed:
            try:
                connection = await aio_pika.connect_robust(self._connect_url(), timeout=CONNECT_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                refused = vhost_refused(exc, self.url or "")
                self.set_state("retrying", refused or f"{type(exc).__name__}: {exc}")
                # Said once; the retries that follow are debug noise.
                (log.warning if failures == 1 else log.debug)(
                    "%sbroker %s not reachable (%s); %s, retrying every %gs at most",
                    self._prefix, self.state["url"], refused or exc, self._waiting, RETRY_MAX_S)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            connection.close_callbacks.add(self._on_close)
            connection.reconnect_callbacks.add(self._on_reconnect)
            self.connection = connection
            self.opened(connection)
            try:
                for setup in self._setups:
                    await setup(connection)
            except asyncio.CancelledError:
                raise
            except SetupRefused as exc:
                self._closed = True
                self.connection = None
                await self._close_quietly(connection)
                self.set_state("refused", str(exc))
                return
            except Exception as exc:
                # A broker object that exists with other settings, or no rights:
                # said loudly, retried slowly (an operator has to act).
                failures += 1
                self.set_state("error", f"{type(exc).__name__}: {exc}")
                log.error("%scannot set up on broker %s: %s; retrying in %gs",
                          self._prefix, self.state["url"], exc, RETRY_MAX_S)
                self.connection = None
                await self._close_quietly(connection)
                await asyncio.sleep(RETRY_MAX_S)
                continue
            self.state["connects"] += 1
            self.set_state("connected")
            self.ready.set()
            log.info("%sconnected to %s%s", self._prefix, self.state["url"], self.connected_detail())
            return

    def _on_close(self, _connection: Any, exc: BaseException | None = None) -> None:
        if self._closed:
            self.set_state("closed")
            return
        reason = str(exc) if exc else "connection closed"
        if self.state["state"] == "reconnecting":
            # Each failed attempt closes it again: the loss has been told.
            self.state["last_error"] = reason
            self._log.debug("%sreconnecting to %s failed (%s)", self._prefix, self.state["url"], reason)
            return
        self.state["disconnects"] += 1
        self.set_state("reconnecting", reason)
        self._log.warning("%sconnection to %s lost (%s); reconnecting", self._prefix, self.state["url"], exc)

    def _on_reconnect(self, _connection: Any) -> None:
        self.state["connects"] += 1
        self.set_state("connected")
        self._log.info("%sreconnected to %s; %s", self._prefix, self.state["url"], self._restored)

    async def _close_quietly(self, connection: Any) -> None:
        try:
            if self._close_timeout is None:
                await connection.close()
            else:
                await asyncio.wait_for(connection.close(), self._close_timeout)
        except Exception:
            self._log.debug(self._close_error, exc_info=True)
