"""This node's claim on its name: an exclusive queue named after it, held while it runs.

Two nodes with the same `[cluster] node` (a config copied from another
machine) would otherwise both run: each replaces the other in every node's
view at each heartbeat, both consume the node's own queues (file events), and
the cluster shows one node that changes its address and pid every second.

The broker settles it. A node's first step on the broker, before it takes
any event, announces itself or asks for the schedules, is to declare
`faasd.cluster.<name>.claim.<node>`, an exclusive queue: RabbitMQ refuses a
second connection that declares it (RESOURCE_LOCKED) for as long as the
first one lives, and deletes it the moment that connection closes. So:

  * A node restarted at once after kill -9 or a crash reuses its name: the
    kernel closed the dead process's socket, the broker dropped its claim.
  * A node whose old connection the broker still holds (a machine that hung
    or lost its network: the broker notices when the AMQP heartbeat runs
    out, ~10 s) waits for it, not ready, trying again each CLAIM_RETRY_S.
  * A node whose name a live node holds hears that node's heartbeats, which
    name its pid and address, and refuses to run (`NodeNameTaken`): the
    running node is not disturbed.

While it waits, the claimant listens to the cluster's heartbeats on a queue
of its own; a heartbeat from another instance under its name is the proof
that the holder is alive. After a lost connection the claim is made again
the same way, and the node that comes second stops.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractIncomingMessage, ExchangeType

from ..broker import SetupRefused, let_go
from .members import HEARTBEAT_TYPE
from .topology import Names

log = logging.getLogger("faasd.cluster")

CLAIM_RETRY_S = 0.5


class NodeNameTaken(SetupRefused):
    """Another live node holds this node's name."""


class NameClaim:
    """Holds `Names.claim(node)` on the broker for as long as the connection lives."""

    def __init__(self, names: Names, node: str, instance: str,
                 on_taken: Callable[[str], None]) -> None:
        self.names = names
        self.node = node
        self.instance = instance
        self.queue = names.claim(node)
        self.on_taken = on_taken  # told why, when the name is found taken after a reconnect
        self.held = False
        self.waiting = False  # the name is held by another connection: waiting for it
        self._reclaim: asyncio.Task | None = None

    async def setup(self, connection: Any) -> None:
        """The first step on a new connection: hold the name, or raise NodeNameTaken
        (after telling `on_taken`), which ends the broker link."""
        try:
            await self._claim(connection)
        except NodeNameTaken as exc:
            self.on_taken(str(exc))
            raise
        connection.reconnect_callbacks.add(self._reconnected)
        connection.close_callbacks.add(self._lost)

    def _lost(self, *_args: Any) -> None:
        self.held = False  # the broker deleted the exclusive queue with the connection

    def _reconnected(self, connection: Any) -> None:
        if self._reclaim is None or self._reclaim.done():
            self._reclaim = asyncio.get_running_loop().create_task(self._claim_again(connection),
                                                                   name="faasd-cluster-claim")

    async def _claim_again(self, connection: Any) -> None:
        try:
            await self._claim(connection)
        except NodeNameTaken as exc:
            self.on_taken(str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The connection dropped again: its own reconnect claims again.
            log.debug("cluster: claiming the node name again failed: %s", exc)

    async def _claim(self, connection: Any) -> None:
        listener: Any = None
        twin: dict[str, Any] = {}
        waited = False
        try:
            while True:
                channel = await _plain_channel(connection)
                try:
                    # The queue belongs to the connection, not to the channel.
                    await channel.declare_queue(self.queue, exclusive=True, durable=False,
                                                auto_delete=False)
                except aiormq.exceptions.ChannelLockedResource:
                    pass  # the broker closed the channel
                else:
                    await _close(channel)
                    self.held = True
                    if waited:
                        log.info("cluster: node name %s is free again: this node takes it", self.node)
                    return
                if twin:
                    raise NodeNameTaken(self._taken_message(twin))
                if listener is None:
                    waited = self.waiting = True
                    log.warning("cluster: the node name %s is held on the broker by another connection: "
                                "another node running under the same [cluster] node name, or this "
                                "node's previous connection, which the broker has not closed yet; "
                                "waiting for it (not ready meanwhile)", self.node)
                    listener = await self._listen(connection, twin)
                await asyncio.sleep(CLAIM_RETRY_S)
        finally:
            self.waiting = False
            if listener is not None:
                await _close(listener)

    async def _listen(self, connection: Any, twin: dict[str, Any]) -> Any:
        """A channel with a queue of its own on the heartbeats; `twin` gets the first heartbeat
        of another instance under this node's name."""
        channel = await _plain_channel(connection)
        exchange = await channel.declare_exchange(self.names.nodes, ExchangeType.FANOUT, durable=True)
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await queue.bind(exchange)

        async def heard(message: AbstractIncomingMessage) -> None:
            if message.type != HEARTBEAT_TYPE or twin:
                return
            try:
                body = orjson.loads(message.body)
            except orjson.JSONDecodeError:
                return
            if isinstance(body, dict) and body.get("node") == self.node \
                    and body.get("instance") != self.instance:
                twin.update(body)

        await queue.consume(heard, no_ack=True)
        return channel

    def _taken_message(self, twin: dict[str, Any]) -> str:
        return (f"cluster {self.names.cluster}: another node is running as {self.node!r} "
                f"(pid {twin.get('pid')} at {twin.get('address') or 'an unknown address'}, "
                f"instance {twin.get('instance')}); node names must be unique: set [cluster] node "
                f"(or FAASD_CLUSTER_NODE) to a name of this node's own")

    async def close(self) -> None:
        if self._reclaim is not None:
            self._reclaim.cancel()
            await asyncio.gather(self._reclaim, return_exceptions=True)


async def _plain_channel(connection: Any) -> aio_pika.Channel:
    """A channel that is not restored after a reconnect (the claim is made again instead), nor
    reopened when the broker closes it, as it does on RESOURCE_LOCKED."""
    channel = aio_pika.Channel(connection, publisher_confirms=False)
    await channel
    return channel


async def _close(channel: Any) -> None:
    if channel is None or channel.is_closed:
        return
    await let_go(channel.close(), log, "cluster: closing a channel of the name claim")
