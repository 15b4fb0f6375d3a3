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

import logging

from aio_pika.abc import AbstractRobustConnection
from yarl import URL

from ..broker import BrokerConnection
from .topology import broker_version

log = logging.getLogger("faasd.cluster")

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


class BrokerLink(BrokerConnection):
    """The cluster's broker connection (see faasd.broker), with its url defaults and the broker's version."""

    def __init__(self, url: str, client_name: str) -> None:
        super().__init__(url, connect_url=lambda: connection_url(url, client_name), log=log,
                         prefix="cluster: ", waiting="asynchronous invocations wait for it",
                         restored="queues and consumers restored", task_name="faasd-cluster-link",
                         close_timeout=5)
        self.client_name = client_name
        self.version: tuple[int, ...] | None = None

    def opened(self, connection: AbstractRobustConnection) -> None:
        self.version = broker_version(connection.transport.connection.server_properties
                                      if connection.transport else None)

    def connected_detail(self) -> str:
        return " (RabbitMQ %s)" % (".".join(map(str, self.version)) if self.version else "of unknown version")
