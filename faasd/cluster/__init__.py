"""Several faasd nodes sharing RabbitMQ as their work queue (`[cluster] mode = "amqp"`).

Nodes are ordinary faasd daemons, on one machine or many, with the same
functions and the same `[amqp] url` and `[cluster] name`. RabbitMQ is the
whole distributed engine: faasd adds no protocol of its own.

  * Asynchronous work (Event invokes, file, cron and destination events,
    retries) goes to one durable queue per function on the broker (quorum
    queues on RabbitMQ 3.10+); every node that has the function consumes it
    within its own concurrency; an event is acknowledged only once its
    invocation ended, so a node that dies hands its events to the others.
    `daemon.queue` is that queue (faasd/cluster/workqueue.py).
  * Cron fires once per tick in the whole cluster: only the node holding the
    schedule lease (a token in a single-active-consumer queue,
    faasd/cluster/lease.py) queues ticks; when it dies the broker hands the
    token to another node at once, and the node that takes it fires the ticks
    the old owner may not have (at least once, with the same request ids).
  * A node holds its name on the broker while it runs (faasd/cluster/claim.py):
    a second node started under the same `[cluster] node` refuses to run.
  * Nodes announce themselves (faasd/cluster/members.py): `GET /system/cluster`
    and `faasd list --cluster` show the nodes, their functions and their load.
  * Synchronous HTTP is not routed through the broker: put the nodes behind
    the load balancer you already run (README: nginx), health-checked on
    `/readyz`, which fails while a node cannot reach the broker.
  * File triggers are per node: each node watches its own directory (a
    relative `dir` is under its own data dir) and runs the events of the files
    it sees itself, from its own queue of the function on the broker, since
    the file is on its disk. A directory shared by several nodes (NFS) is not
    coordinated: a file seen by two nodes fires on both (inotify does not
    report other machines' writes, and each node's rescan at start fires what
    its own ledger has not seen). Point each node at its own directory.

Without `[cluster] mode = "amqp"` (the default, "local"), the embedded
durable queue (faasd/queue.py) is used and no broker is needed;
`/system/cluster` then shows this one node.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .. import queue as embedded_queue
from .claim import NameClaim
from .lease import ScheduleLease
from .link import BrokerLink
from .members import Membership, announcement, default_node_name
from .topology import Names
from .workqueue import ClusterQueue, ClusterUnavailable

if TYPE_CHECKING:
    from ..daemon import Daemon

__all__ = ["Cluster", "ClusterQueue", "ClusterUnavailable", "Names", "start"]

log = logging.getLogger("faasd.cluster")

DRAIN_POLL_S = 0.2


class Cluster:
    """This node's part in the cluster: the link, the work queue, the lease, the membership."""

    def __init__(self, daemon: "Daemon") -> None:
        settings = daemon.config.cluster
        url = daemon.config.amqp.url
        assert url, "config validation requires [amqp] url in cluster mode"
        self.daemon = daemon
        self.settings = settings
        self.names = Names(settings.name)
        self.node = settings.node or default_node_name(daemon)
        self.instance = uuid.uuid4().hex[:8]
        client = f"faasd {socket.gethostname()} node {self.node}"
        self.link = BrokerLink(url, client)
        self.claim = NameClaim(self.names, self.node, self.instance, on_taken=daemon.halt)
        self.lease = ScheduleLease(self.names, self.node)
        self.queue = ClusterQueue(
            link=self.link, names=self.names, registry=daemon.registry, invoker=daemon.invoker,
            data_dir=daemon.config.paths.data, region=daemon.region, prefetch=settings.prefetch,
            max_concurrency=daemon.config.limits.max_concurrency, node=self.node,
            inbox=self.names.inbox(self.node, self.instance),
            loaded_elsewhere=lambda name: self.loaded_elsewhere(name))
        self.members = Membership(
            daemon=daemon, names=self.names, node=self.node, instance=self.instance,
            heartbeat_s=settings.heartbeat_s, describe_self=self.describe_self,
            on_outcome=self.queue.on_inbox_outcome, on_beat=self._on_beat)
        self._watch: asyncio.Task | None = None

    def describe_self(self) -> dict[str, Any]:
        return announcement(self.daemon, node=self.node, instance=self.instance,
                            heartbeat_s=self.settings.heartbeat_s, schedule_owner=self.lease.owner,
                            running=self.queue.load(), fired_ticks=self.lease.fired_ticks())

    async def _on_beat(self, connection: Any) -> None:
        self.queue.forget_stale_callbacks()
        if connection is None or not self.link.connected:
            return
        await self.queue.refresh_depths(connection)
        live = [n for n in self.members.nodes() if n.get("state") != "lost"]
        await self.lease.on_beat(any(n.get("schedule_owner") for n in live))

    async def open(self) -> None:
        # First: a node whose name is taken does nothing else on the broker.
        self.link.on_connect(self.claim.setup)
        self.link.on_connect(self.queue.setup)
        self.link.on_connect(self.members.setup)
        self.link.on_connect(self.lease.setup)
        self.link.start()
        self._watch = asyncio.get_running_loop().create_task(self._watch_drain(),
                                                             name="faasd-cluster-drain-watch")
        log.info("cluster %s: node %s joining through %s", self.names.cluster, self.node,
                 self.link.state["url"])

    async def _watch_drain(self) -> None:
        """At the start of a drain: take no more events, and let another node fire the schedules."""
        while not self.daemon.invoker.draining:
            await asyncio.sleep(DRAIN_POLL_S)
        await self.queue.stop_consuming()
        await self.lease.release()

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        await self.lease.release()
        await self.queue.close()
        await self.members.close()
        await self.claim.close()
        await self.link.close()

    def readiness(self) -> tuple[bool, str]:
        state = self.link.state
        if self.claim.waiting:
            return False, (f"cluster {self.names.cluster}: waiting for the node name {self.node}, held on "
                           "the broker by another connection (see the log)")
        if not self.link.connected:
            error = state.get("last_error")
            return False, (f"cluster {self.names.cluster}: broker {state['url']} is {state['state']}"
                           + (f" ({error})" if error else ""))
        consuming, detail = self.queue.consuming()
        if not consuming:
            return False, f"cluster {self.names.cluster}: {detail}"
        held = self.queue.held_back()
        if held:
            return False, f"cluster {self.names.cluster}: {held}"
        nodes = [n for n in self.members.nodes() if n.get("state") != "lost"]
        owner = next((n["node"] for n in nodes if n.get("schedule_owner")), None)
        detail = (f"cluster {self.names.cluster}: node {self.node}, {len(nodes)} node(s) up; "
                  f"schedules fired by {owner or 'nobody yet'}")
        # Said, but still ready: the broker refuses every node alike, and
        # synchronous calls, which do not need it, should not lose this node.
        unsent = self.queue.unsent()
        return True, detail + (f"; {unsent}" if unsent else "")

    def _live_peers(self) -> list[dict[str, Any]]:
        return [n for n in self.members.nodes()
                if not n.get("self") and n.get("state") not in ("lost", "unknown")]

    def schedules_held_elsewhere(self) -> bool:
        """Whether another node holds the schedule lease now. Connected, this node
        consumes the lease queue: the broker gives it the token at once unless
        another connection holds it, alive or not yet noticed dead (its
        heartbeats may still say it is alive)."""
        return self.link.connected and not self.lease.owner

    def ticks_fired_elsewhere(self, schedule: str) -> float | None:
        """The last tick of `schedule` another node is known to have fired: as its
        heartbeats said (a lost node's last one too), or the token it handed over."""
        said = [float(tick) for peer in self.members.peers.values()
                if (tick := (peer.get("fired_ticks") or {}).get(schedule)) is not None]
        if schedule in self.lease.handed:
            said.append(self.lease.handed[schedule])
        return max(said, default=None)

    def loaded_elsewhere(self, function: str) -> bool:
        """Whether another live node has `function` loaded (as its last heartbeat says)."""
        return any(function in n.get("functions", ()) for n in self._live_peers())

    def view(self) -> dict[str, Any]:
        nodes = self.members.nodes()
        owner = next((n["node"] for n in nodes if n.get("schedule_owner") and n.get("state") != "lost"),
                     None)
        return {
            "mode": "amqp",
            "cluster": self.names.cluster,
            "node": self.node,
            "broker": dict(self.link.state, version=".".join(map(str, self.link.version or ())) or None),
            "queue_type": "quorum" if self.queue.quorum else "classic",
            "schedule_owner": owner,
            "nodes": nodes,
        }


async def start(daemon: "Daemon") -> None:
    """Extension: the asynchronous queue (embedded, or the cluster's) and GET /system/cluster."""
    settings = daemon.config.cluster
    cluster: Cluster | None = None
    if settings.mode == "amqp":
        cluster = Cluster(daemon)
        await cluster.open()
        daemon.queue = cluster.queue
        daemon.on_cleanup(cluster.close)
        # faasd/triggers/cron.py asks these at each tick, says what it fired, and
        # fires what the old owner may not have when this node takes the lease.
        daemon.schedule_owner = cluster.lease.is_owner  # type: ignore[attr-defined]
        daemon.schedules_elsewhere = cluster.schedules_held_elsewhere  # type: ignore[attr-defined]
        daemon.schedules_fired_elsewhere = cluster.ticks_fired_elsewhere  # type: ignore[attr-defined]
        daemon.schedules_taken = cluster.lease.taken  # type: ignore[attr-defined]
        daemon.schedules_fired = cluster.lease.fired  # type: ignore[attr-defined]
        daemon.readiness_checks["async_queue"] = cluster.readiness

        def describe(name: str, view: dict) -> None:
            view["queue"] = cluster.queue.function_stats(name)  # type: ignore[union-attr]

        daemon.describers.append(describe)
    else:
        await embedded_queue.start(daemon)
    daemon.cluster = cluster  # type: ignore[attr-defined]
    node = settings.node or default_node_name(daemon)

    async def cluster_view(request: web.Request) -> web.Response:
        from ..api import json_response

        if cluster is not None:
            return json_response(cluster.view())
        stats = getattr(daemon.queue, "stats", None)
        running = {name: int(s.get("running", 0)) for name, s in (stats() if stats else {}).items()
                   if s.get("running")}
        me = announcement(daemon, node=node, instance="local", heartbeat_s=0.0,
                          schedule_owner=True, running=running)
        return json_response({"mode": "local", "cluster": None, "node": node, "broker": None,
                              "schedule_owner": node,
                              "nodes": [dict(me, last_seen_s=0.0, self=True)]})

    daemon.route_hooks.append(lambda app: app.router.add_get("/system/cluster", cluster_view))
