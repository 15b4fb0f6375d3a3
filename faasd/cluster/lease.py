"""The schedule lease: which node of the cluster fires cron ticks.

The lease is a token: one message in `faasd.cluster.<name>.scheduler`, a
durable single-active-consumer queue that every node consumes. RabbitMQ
delivers only to the active consumer, so the node holding the token
(unacknowledged) is the one that fires the schedules. When that node's
connection ends (kill -9 or a crash: its socket closes at once; a power cut
or a partition: when the AMQP heartbeat, 5 s, runs out), the broker puts the
token back and makes the next consumer active, which receives it at once:
cron resumes on another node within a second. A node that stops gives the
token back first (`release`).

Ownership follows the token exactly: `owner` turns False in the connection's
and the channel's close callbacks, before any reconnect, and True again only
when a token is delivered. Each node offers a token when it connects (the
owner acknowledges spare ones as they arrive, keeping one), and again when
no node has owned the schedules for a few heartbeats, so that a lost token
(the queue deleted by hand) heals by itself.

The queue is classic, not quorum: a quorum queue counts every hand-over of
the token as a redelivery, and brokers that cap redeliveries (RabbitMQ 4's
default delivery limit) would eventually drop it.

What the owner has fired is known to the others (faasd/triggers/cron.py):
each heartbeat says the last tick it fired of each schedule (`fired_ticks`),
and a node that stops hands over a fresh token that says so too, since its
last heartbeat may be older than its last tick. The node that takes the
token fires the ticks that passed since while it waited (a dead owner holds
the token until the broker notices): delivery is at least once. A tick the
old owner fired after its last heartbeat runs twice, with the same request
id (cron's ids are derived from the schedule and the instant); so can one
during a network partition, where the old owner may fire until its
heartbeat runs out while the new one already does.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage

from ..broker import let_go
from .topology import Names

log = logging.getLogger("faasd.cluster")

TOKEN_TYPE = "faasd.schedule-token"
# The token's header with the ticks its last owner fired ({schedule: instant}, JSON).
FIRED_HEADER = "x-faasd-fired-ticks"
# Heartbeats without any node owning the schedules before a new token is offered.
OWNERLESS_BEATS = 3


class ScheduleLease:
    def __init__(self, names: Names, node: str) -> None:
        self.names = names
        self.node = node
        self.owner = False
        self.since: float | None = None
        self.acquired = 0  # how many times this node took the lease
        self._token: AbstractIncomingMessage | None = None
        self._channel: Any = None
        self._queue: Any = None
        self._tag: str | None = None
        self._released = False
        self._ownerless_beats = 0
        # Called each time this node takes the lease (cron fires what no node fired).
        self.taken: list[Callable[[], None]] = []
        # Each says the last tick this node fired of its schedules (cron), for the others.
        self.fired: list[Callable[[], dict[str, float]]] = []
        # The last ticks the token's previous owners said they fired when they let it go.
        self.handed: dict[str, float] = {}

    def is_owner(self) -> bool:
        return self.owner

    async def setup(self, connection: Any) -> None:
        """On the first connect: consume the lease queue and offer a token (aio-pika replays it)."""
        channel = await connection.channel()
        # Two: the token held, plus room to receive (and discard) a spare one.
        await channel.set_qos(prefetch_count=2)
        queue = await channel.declare_queue(self.names.scheduler, durable=True,
                                            arguments={"x-single-active-consumer": True})
        connection.close_callbacks.add(self._closed)
        channel.close_callbacks.add(self._closed)
        self._channel, self._queue = channel, queue
        self._tag = await queue.consume(self._on_token)
        await self.offer_token()

    def fired_ticks(self) -> dict[str, float]:
        """The last tick this node fired of each schedule."""
        merged: dict[str, float] = {}
        for source in self.fired:
            for key, tick in source().items():
                merged[key] = max(tick, merged.get(key, tick))
        return merged

    async def offer_token(self) -> None:
        """Publish a token; harmless when one exists (the owner discards spares)."""
        if self._channel is None or self._released:
            return
        await self._publish_token({})

    async def _publish_token(self, fired: dict[str, float]) -> None:
        headers = {FIRED_HEADER: orjson.dumps(fired).decode()} if fired else None
        await self._channel.default_exchange.publish(
            aio_pika.Message(self.node.encode(), type=TOKEN_TYPE, app_id="faasd", headers=headers,
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=self.names.scheduler)

    async def on_beat(self, owned: bool) -> None:
        """Once a heartbeat, told whether any live node owns the schedules: a
        cluster where none has for OWNERLESS_BEATS beats lost its token, and
        gets one offered. A node that has given the lease back (it is
        stopping) leaves that to the others."""
        if owned or self._released:
            self._ownerless_beats = 0
            return
        self._ownerless_beats += 1
        if self._ownerless_beats >= OWNERLESS_BEATS:
            self._ownerless_beats = 0
            log.warning("cluster %s: no node has fired the schedules for %d heartbeats; "
                        "offering a new schedule token", self.names.cluster, OWNERLESS_BEATS)
            await self.offer_token()

    async def _on_token(self, message: AbstractIncomingMessage) -> None:
        if self._released:
            await _quietly(message.nack(requeue=True))
            return
        if self._token is not None:
            await _quietly(message.ack())  # a spare: one token is enough
            return
        self._token = message
        self._note_handed(message)
        self.owner = True
        self.since = time.time()
        self.acquired += 1
        log.info("cluster: node %s now fires the cluster's schedules", self.node)
        for callback in self.taken:
            try:
                callback()
            except Exception:
                log.exception("cluster: a callback on taking the schedules failed")

    def _note_handed(self, token: AbstractIncomingMessage) -> None:
        try:
            fired = orjson.loads(str((token.headers or {}).get(FIRED_HEADER) or "{}"))
            for key, tick in fired.items():
                self.handed[str(key)] = max(float(tick), self.handed.get(str(key), float(tick)))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            log.debug("cluster: a schedule token with unreadable %s; ignored", FIRED_HEADER)

    def _closed(self, *_args: Any) -> None:
        # The broker has the token back already; say so before any reconnect.
        if self.owner and not self._released:
            log.info("cluster: node %s no longer fires the schedules (its broker connection closed)",
                     self.node)
        self._token = None
        self.owner = False
        self.since = None

    async def release(self) -> None:
        """Give the token back (the daemon is stopping): the next node takes it at once."""
        if self._released:
            return
        self._released = True
        was_owner = self.owner
        self.owner = False
        self.since = None
        if self._queue is not None and self._tag is not None:
            await _quietly(self._queue.cancel(self._tag))
        token, self._token = self._token, None
        if token is not None:
            await self._hand_over(token)
        if was_owner:
            log.info("cluster: node %s handed the schedules over", self.node)
        if self._channel is not None:
            await _quietly(self._channel.close())


    async def _hand_over(self, token: AbstractIncomingMessage) -> None:
        """Let the token go as a fresh one that says which ticks this node fired
        (its last heartbeat may not): the next owner fires the ticks after
        those, no more, no fewer. Failing that, the token as it was: the next
        owner then goes by this node's heartbeats."""
        fired = self.fired_ticks()
        if fired and self._channel is not None and await let_go(
                self._publish_token(fired), log, "cluster: handing the schedule token over"):
            await _quietly(token.ack())
        else:
            await _quietly(token.nack(requeue=True))


async def _quietly(operation: Any) -> None:
    await let_go(operation, log, "cluster: schedule lease: a broker call")
