"""The cluster's connection to RabbitMQ: opened in the background, kept up by aio-pika.

One robust connection per node carries the work queues, the heartbeats and
the schedule lease, each on channels of its own. It is separate from the AMQP
triggers' connection, so that a trigger's flow control or a channel error
cannot stall the cluster's work. Start does not wait for the broker: until it answers, the
node is not ready (`/readyz`), asynchronous invocations are refused with a
message naming the broker, and the connection is retried with backoff. After
a drop aio-pika reconnects and restores channels, queues and consumers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from yarl import URL

from ..triggers.amqp import redact
from .topology import broker_version

log = logging.getLogger("faasd.cluster")

CONNECT_TIMEOUT_S = 10
RETRY_MAX_S = 30.0
RECONNECT_INTERVAL_S = 1
# AMQP heartbeat: how soon a node that vanished without closing its socket
# (power cut, network partition) loses its unacknowledged events and, when it
# owned the schedules, the lease. A killed process closes its socket at once.
HEARTBEAT_S = 5


def connection_url(url: str, client_name: str, *, robust: bool = True) -> str:
    """`url` with faasd's defaults for what it does not set itself."""
    parsed = URL(url)
    extra: dict[str, str] = {}
    if robust and "reconnect_interval" not in parsed.query:
        extra["reconnect_interval"] = str(RECONNECT_INTERVAL_S)
    if "heartbeat" not in parsed.query:
        extra["heartbeat"] = str(HEARTBEAT_S)
    if "name" not in parsed.query:
        extra["name"] = client_name
    return str(parsed.update_query(extra)) if extra else url


Setup = Callable[[AbstractRobustConnection], Awaitable[None]]


class BrokerLink:
    """The robust connection, its state for /readyz and /system/cluster, and first-connect setup."""

    def __init__(self, url: str, client_name: str) -> None:
        self.url = url
        self.client_name = client_name
        self.connection: AbstractRobustConnection | None = None
        self.version: tuple[int, ...] | None = None
        self.ready = asyncio.Event()  # connected, and every setup step has run
        self.state: dict[str, Any] = {"state": "connecting", "url": redact(url), "since": time.time(),
                                      "connects": 0, "disconnects": 0, "last_error": None}
        self._setups: list[Setup] = []
        self._task: asyncio.Task | None = None
        self._closed = False

    def on_connect(self, setup: Setup) -> None:
        """Run `setup(connection)` once the broker first answers (aio-pika replays it after drops)."""
        self._setups.append(setup)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="faasd-cluster-link")

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

    def _set(self, state: str, error: str | None = None) -> None:
        if self.state["state"] != state:
            self.state["since"] = time.time()
        self.state["state"] = state
        if error is not None:
            self.state["last_error"] = error

    async def _run(self) -> None:
        delay = 1.0
        failures = 0
        while not self._closed:
            try:
                connection = await aio_pika.connect_robust(
                    connection_url(self.url, self.client_name), timeout=CONNECT_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self._set("retrying", f"{type(exc).__name__}: {exc}")
                (log.warning if failures == 1 else log.debug)(
                    "cluster: broker %s not reachable (%s); asynchronous invocations wait for it, "
                    "retrying every %gs at most", self.state["url"], exc, RETRY_MAX_S)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            connection.close_callbacks.add(self._on_close)
            connection.reconnect_callbacks.add(self._on_reconnect)
            self.connection = connection
            self.version = broker_version(connection.transport.connection.server_properties
                                          if connection.transport else None)
            try:
                for setup in self._setups:
                    await setup(connection)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A broker object that exists with other settings, or no rights:
                # said loudly, retried slowly (an operator has to act).
                failures += 1
                self._set("error", f"{type(exc).__name__}: {exc}")
                log.error("cluster: cannot set up on broker %s: %s; retrying in %gs",
                          self.state["url"], exc, RETRY_MAX_S)
                self.connection = None
                await _close_quietly(connection)
                await asyncio.sleep(RETRY_MAX_S)
                continue
            self.state["connects"] += 1
            self._set("connected")
            self.ready.set()
            log.info("cluster: connected to %s (RabbitMQ %s)", self.state["url"],
                     ".".join(map(str, self.version)) if self.version else "of unknown version")
            return

    def _on_close(self, _connection: Any, exc: BaseException | None = None) -> None:
        if self._closed:
            self._set("closed")
            return
        self.state["disconnects"] += 1
        self._set("reconnecting", str(exc) if exc else "connection closed")
        log.warning("cluster: connection to %s lost (%s); reconnecting", self.state["url"], exc)

    def _on_reconnect(self, _connection: Any) -> None:
        self.state["connects"] += 1
        self._set("connected")
        log.info("cluster: reconnected to %s; queues and consumers restored", self.state["url"])

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.connection is not None:
            await _close_quietly(self.connection)
        self._set("closed")


async def _close_quietly(connection: Any) -> None:
    try:
        await asyncio.wait_for(connection.close(), 5)
    except Exception:
        log.debug("closing a broker connection failed", exc_info=True)
