"""What the cluster declares on the broker, and how it names it.

Every object a cluster uses is named under `faasd.cluster.<name>.` (the
`[cluster] name`), so several clusters can share one broker (or one vhost)
and everything of one cluster is easy to find and to delete:

    faasd.cluster.<name>.fn.<function>               the function's work queue
    faasd.cluster.<name>.node.<node>.fn.<function>   its events only <node> may run (files)
    <work queue>.delay.<ms>                          retries waiting <ms> milliseconds
    faasd.cluster.<name>.dead-letter                 events the broker gave up on
    faasd.cluster.<name>.nodes                       fanout exchange of node heartbeats
    faasd.cluster.<name>.node.<node>.<instance>      a node's inbox (heartbeats, outcomes)
    faasd.cluster.<name>.scheduler                   the schedule lease (single active consumer)
    faasd.cluster.<name>.claim.<node>                a node's hold on its name (exclusive, see claim.py)

Queue types: quorum queues (replicated, durable, with a delivery limit) when
the broker is RabbitMQ 3.10 or later, which is also the first version whose
quorum queues support message TTL and at-least-once dead-lettering, the two
things retries rely on; classic durable queues before that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

PREFIX = "faasd.cluster"
# A message the broker has handed out this many times without an outcome
# (its node died or stopped each time) goes to the dead-letter queue instead
# of circling for ever: an event that kills whichever node runs it must not
# take the whole cluster down one node after the other. Graceful restarts hand
# back what a node had prefetched, which also counts, hence the margin.
MAX_DELIVERIES = 50
# A delay queue is deleted by the broker this long after its last use; it is
# declared again before every publish, so that only empty ones expire.
DELAY_QUEUE_IDLE_MS = 10 * 60 * 1000
# A node's inbox survives a broker reconnect this long (outcomes sent
# meanwhile wait in it); the inbox of a node that died goes away after it.
INBOX_EXPIRES_MS = 60 * 1000
QUORUM_SINCE = (3, 10)


@dataclass(frozen=True, slots=True)
class Names:
    """The broker objects of one cluster."""

    cluster: str

    @property
    def prefix(self) -> str:
        return f"{PREFIX}.{self.cluster}"

    def function(self, function: str) -> str:
        return f"{self.prefix}.fn.{function}"

    def node_function(self, node: str, function: str) -> str:
        return f"{self.prefix}.node.{node}.fn.{function}"

    @staticmethod
    def delay(work_queue: str, delay_ms: int) -> str:
        return f"{work_queue}.delay.{delay_ms}"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}.dead-letter"

    @property
    def nodes(self) -> str:
        return f"{self.prefix}.nodes"

    def inbox(self, node: str, instance: str) -> str:
        return f"{self.prefix}.node.{node}.{instance}"

    @property
    def scheduler(self) -> str:
        return f"{self.prefix}.scheduler"

    def claim(self, node: str) -> str:
        return f"{self.prefix}.claim.{node}"


def broker_version(server_properties: dict[str, Any] | None) -> tuple[int, ...] | None:
    """RabbitMQ's version from the connection's server properties, e.g. (3, 10, 8)."""
    raw = (server_properties or {}).get("version")
    if isinstance(raw, bytes):
        raw = raw.decode(errors="replace")
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", str(raw or ""))
    if not match:
        return None
    return tuple(int(part) for part in match.groups() if part is not None)


def supports_quorum(version: tuple[int, ...] | None) -> bool:
    # An unknown version is a broker that does not say: assume a current one.
    return version is None or version >= QUORUM_SINCE


def _reliable(quorum: bool) -> dict[str, Any]:
    if not quorum:
        return {}
    return {"x-queue-type": "quorum",
            # Dead-lettering out of a quorum queue is at most once unless asked.
            "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


def work_queue_arguments(names: Names, quorum: bool) -> dict[str, Any]:
    arguments: dict[str, Any] = {"x-dead-letter-exchange": "",
                                 "x-dead-letter-routing-key": names.dead_letter}
    if quorum:
        arguments.update(_reliable(True))
        arguments["x-delivery-limit"] = MAX_DELIVERIES
    return arguments


def delay_queue_arguments(work_queue: str, delay_ms: int, quorum: bool) -> dict[str, Any]:
    """A queue where messages wait `delay_ms`, then go back to `work_queue`."""
    return {"x-message-ttl": delay_ms, "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": work_queue,
            "x-expires": delay_ms + DELAY_QUEUE_IDLE_MS, **_reliable(quorum)}


def dead_letter_arguments(quorum: bool) -> dict[str, Any]:
    return {"x-queue-type": "quorum"} if quorum else {}
