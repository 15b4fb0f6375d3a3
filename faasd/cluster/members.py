"""Who is in the cluster: heartbeats on a fanout exchange, and each node's inbox.

Every `[cluster] heartbeat_s` a node publishes what it is (`announcement()`:
name, address, pid, version, state, the functions it runs and those that
fail to load, its load: invocations in flight against `max_concurrency`,
events running per function, the 1-minute load average, whether it fires
the schedules and the last tick it fired of each) to the fanout exchange `faasd.cluster.<name>.nodes`. Each node
reads them from its inbox, a queue bound to that exchange, which also
receives the outcomes of events it queued with `on_done` (faasd/cluster/
workqueue.py). A node that stops says so (`leaving`) and is forgotten; one
not heard from for three intervals is shown as `lost`, and forgotten after
`FORGET_LOST_S`. Heartbeats are not persisted: a node that misses some is
only as stale as its last one.

A node whose own broker connection is down hears nobody: it does not take
that silence for the others' death. Meanwhile its view shows itself as
`disconnected` and the others as `unknown` (as last heard, with their age);
none is declared lost, nor forgotten. Once it hears again, a node is lost
only if it stays silent for three intervals from then.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any, Callable

import aio_pika
import orjson
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, ExchangeType

from .. import __version__
from .topology import INBOX_EXPIRES_MS, Names
from .workqueue import OUTCOME_TYPE

if TYPE_CHECKING:
    from ..daemon import Daemon

log = logging.getLogger("faasd.cluster")

HEARTBEAT_TYPE = "faasd.heartbeat"
LEAVING_TYPE = "faasd.leaving"
LOST_AFTER_BEATS = 3
FORGET_LOST_S = 300.0


def node_address(daemon: "Daemon") -> str | None:
    """The URL other machines reach this node at: `[cluster] address`, else the listener's."""
    configured = daemon.config.cluster.address
    if configured:
        return configured.rstrip("/")
    if daemon.address is None:
        return None
    host, port = daemon.address[0], daemon.address[1]
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def default_node_name(daemon: "Daemon") -> str:
    port = daemon.config.server.port
    return f"{socket.gethostname()}:{port}" if port else f"{socket.gethostname()}-{os.getpid()}"


def announcement(daemon: "Daemon", *, node: str, instance: str, heartbeat_s: float,
                 schedule_owner: bool, running: dict[str, int],
                 fired_ticks: dict[str, float] | None = None) -> dict[str, Any]:
    """What this node says about itself."""
    specs = daemon.registry.specs
    try:
        loadavg = round(os.getloadavg()[0], 2)
    except OSError:
        loadavg = None
    return {
        "node": node,
        "instance": instance,
        "address": node_address(daemon),
        "pid": os.getpid(),
        "version": __version__,
        "started_at": daemon.started_at,
        "state": "draining" if daemon.invoker.draining else "ready" if daemon.ready else "starting",
        "heartbeat_s": heartbeat_s,
        "functions": sorted(name for name, spec in specs.items() if spec.ok),
        "failing": sorted(name for name, spec in specs.items() if not spec.ok),
        "load": {
            "inflight": daemon.invoker.inflight,
            "max_concurrency": daemon.invoker.global_limit.limit or daemon.config.limits.max_concurrency,
            "running": running,
            "loadavg_1m": loadavg,
        },
        "schedule_owner": schedule_owner,
        # {function|schedule|time zone: instant}: a node that takes the schedules
        # over fires what came after (faasd/triggers/cron.py).
        "fired_ticks": fired_ticks or {},
    }


class Membership:
    """This node's heartbeats and inbox, and what it heard from the others."""

    def __init__(self, *, daemon: "Daemon", names: Names, node: str, instance: str,
                 heartbeat_s: float, describe_self: Callable[[], dict[str, Any]],
                 on_outcome: Callable[[AbstractIncomingMessage], Any],
                 on_beat: Callable[[Any], Any]) -> None:
        self.daemon = daemon
        self.names = names
        self.node = node
        self.instance = instance
        self.heartbeat_s = heartbeat_s
        self.inbox = names.inbox(node, instance)
        self.describe_self = describe_self
        self.on_outcome = on_outcome
        self.on_beat = on_beat
        self.peers: dict[str, dict[str, Any]] = {}  # node name -> its last heartbeat + "seen_at"
        self._exchange: AbstractExchange | None = None
        self._channel: Any = None
        self._inbox_queue: Any = None
        self._inbox_tag: str | None = None
        self._connection: Any = None
        self._task: asyncio.Task | None = None
        self._warned_twins: set[str] = set()
        self._lost: set[str] = set()  # peers said to be lost, until heard from or forgotten
        # Since when this node hears the others: None while its broker connection is down.
        self._hearing_since: float | None = None

    async def setup(self, connection: Any) -> None:
        channel = await connection.channel(publisher_confirms=False)
        exchange = await channel.declare_exchange(self.names.nodes, ExchangeType.FANOUT, durable=True)
        inbox = await channel.declare_queue(self.inbox, durable=False, auto_delete=False,
                                            arguments={"x-expires": INBOX_EXPIRES_MS})
        await inbox.bind(exchange)
        self._inbox_tag = await inbox.consume(self._on_message, no_ack=True)
        self._inbox_queue = inbox
        self._exchange = exchange
        self._channel = channel
        self._connection = connection
        self._hearing_since = time.time()
        connection.close_callbacks.add(self._deaf)
        connection.reconnect_callbacks.add(self._hearing_again)
        await self._publish(HEARTBEAT_TYPE, self.describe_self())
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._beat_forever(),
                                                                name="faasd-cluster-heartbeat")

    async def _publish(self, kind: str, body: dict[str, Any]) -> None:
        if self._exchange is None:
            return
        await self._exchange.publish(
            aio_pika.Message(orjson.dumps(body), type=kind, app_id="faasd", content_type="application/json",
                             expiration=max(1.0, self.heartbeat_s * LOST_AFTER_BEATS)),
            routing_key="")

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.on_beat(self._connection)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("cluster: refreshing queue depths failed: %s", exc)
            try:
                await self._publish(HEARTBEAT_TYPE, self.describe_self())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The connection is down: aio-pika reconnects; the next beat tries again.
                log.debug("cluster: heartbeat not sent: %s", exc)
            self._forget_lost()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if message.type == OUTCOME_TYPE:
            await self.on_outcome(message)
            return
        try:
            body = orjson.loads(message.body)
            name = str(body["node"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.debug("cluster: a malformed %s message in the inbox; ignored", message.type)
            return
        if name == self.node and body.get("instance") == self.instance:
            return  # our own heartbeat, back through the fanout
        if message.type == LEAVING_TYPE:
            if self.peers.get(name, {}).get("instance") == body.get("instance"):
                self.peers.pop(name, None)
                log.info("cluster: node %s left", name)
            return
        if message.type != HEARTBEAT_TYPE:
            return
        known = self.peers.get(name)
        if name == self.node and body.get("instance") != self.instance and name not in self._warned_twins:
            self._warned_twins.add(name)
            log.error("cluster: another node also calls itself %s (pid %s at %s); give each node its "
                      "own [cluster] node name", name, body.get("pid"), body.get("address"))
        if known is None and name != self.node:
            log.info("cluster: node %s joined (%s)", name, body.get("address"))
        elif name in self._lost:
            self._lost.discard(name)
            log.info("cluster: node %s is heard from again", name)
        body["seen_at"] = time.time()
        self.peers[name] = body

    def _deaf(self, *_args: Any) -> None:
        self._hearing_since = None

    def _hearing_again(self, *_args: Any) -> None:
        self._hearing_since = time.time()

    @property
    def hearing(self) -> bool:
        """Whether this node hears the others (its broker connection is up)."""
        return self._hearing_since is not None

    def _silent_for(self, peer: dict[str, Any], now: float) -> float:
        """How long `peer` has been silent while this node could hear it."""
        return now - max(peer["seen_at"], self._hearing_since or 0.0)

    def _forget_lost(self) -> None:
        if self._hearing_since is None:
            return  # deaf: the others' silence says nothing
        now = time.time()
        for name, peer in list(self.peers.items()):
            age = self._silent_for(peer, now)
            if age > FORGET_LOST_S:
                log.info("cluster: forgetting node %s, not heard from for %ds", name, age)
                del self.peers[name]
                self._lost.discard(name)
            elif age > float(peer.get("heartbeat_s") or self.heartbeat_s) * LOST_AFTER_BEATS \
                    and name not in self._lost:
                self._lost.add(name)
                log.warning("cluster: node %s is lost, not heard from for %ds; the broker gives the "
                            "events it held to the other nodes once its connection closes", name, age)

    def nodes(self) -> list[dict[str, Any]]:
        """Every node known, this one first (as it is now), then by name."""
        now = time.time()
        me = dict(self.describe_self(), seen_at=now, last_seen_s=0.0, self=True)
        hearing = self.hearing
        if not hearing and me["state"] == "ready":
            me["state"] = "disconnected"  # serving HTTP, but cut off from the cluster
        others = []
        for name, peer in sorted(self.peers.items()):
            beat = float(peer.get("heartbeat_s") or self.heartbeat_s)
            entry = dict(peer, last_seen_s=round(now - peer["seen_at"], 3), self=False)
            if not hearing:
                entry["state"] = "unknown"
                entry["schedule_owner"] = False
            elif self._silent_for(peer, now) > beat * LOST_AFTER_BEATS:
                entry["state"] = "lost"
                entry["schedule_owner"] = False
            others.append(entry)
        return [me, *others]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await asyncio.wait_for(self._publish(LEAVING_TYPE, {"node": self.node,
                                                                "instance": self.instance}), 2)
            # The inbox would expire by itself (INBOX_EXPIRES_MS); a clean stop leaves nothing.
            if self._inbox_queue is not None and self._inbox_tag is not None:
                await asyncio.wait_for(self._inbox_queue.cancel(self._inbox_tag), 2)
                await asyncio.wait_for(self._channel.queue_delete(self.inbox), 2)
        except Exception:
            log.debug("cluster: could not say goodbye", exc_info=True)
