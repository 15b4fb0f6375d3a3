"""Unit tests of faasd.cluster.lease: when a node offers the cluster a new schedule token."""

from __future__ import annotations

import asyncio
import logging

from faasd.cluster.lease import OWNERLESS_BEATS, TOKEN_TYPE, ScheduleLease
from faasd.cluster.topology import Names


class Exchange:
    def __init__(self) -> None:
        self.published: list[tuple[str, str]] = []

    async def publish(self, message, routing_key: str) -> None:
        self.published.append((message.type, routing_key))


class Channel:
    def __init__(self) -> None:
        self.default_exchange = Exchange()

    async def close(self) -> None:
        pass


def lease_on_a_channel() -> tuple[ScheduleLease, Exchange]:
    lease = ScheduleLease(Names("unit"), "node-a")
    lease._channel = Channel()
    return lease, lease._channel.default_exchange


def beats(lease: ScheduleLease, owned: list[bool]) -> None:
    async def run() -> None:
        for owner_seen in owned:
            await lease.on_beat(owner_seen)
    asyncio.run(run())


def test_a_token_is_offered_after_ownerless_beats_in_a_row(caplog):
    lease, exchange = lease_on_a_channel()
    caplog.set_level(logging.WARNING, "faasd.cluster")
    # An owner seen in between starts the count again.
    beats(lease, [False] * (OWNERLESS_BEATS - 1) + [True] + [False] * (OWNERLESS_BEATS - 1))
    assert exchange.published == [] and "offering a new schedule token" not in caplog.text
    beats(lease, [False])
    assert exchange.published == [(TOKEN_TYPE, Names("unit").scheduler)]
    assert caplog.text.count("offering a new schedule token") == 1


def test_a_node_that_gave_the_lease_back_neither_offers_nor_says_it_does(caplog):
    lease, exchange = lease_on_a_channel()
    caplog.set_level(logging.INFO, "faasd.cluster")
    asyncio.run(lease.release())
    beats(lease, [False] * (OWNERLESS_BEATS * 3))
    assert exchange.published == []
    assert "schedule token" not in caplog.text
